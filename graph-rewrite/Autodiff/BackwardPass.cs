using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Autodiff;

/// <summary>
/// The backward step of a train model, in place: the loss's fused logits gradient seeds <see cref="GradientBuilder"/>,
/// whose parameter gradients dp leave the model as <c>p.grad</c>. With accumulation the model takes
/// <see cref="ResetGrad"/> and <c>p.grad.in</c> and outputs p.grad = reset_grad ? dp : p.grad.in + dp, so micro-batches
/// sum inside the graph (2 ms a step, no extra session; README.md).
/// </summary>
public static class BackwardPass
{
    public const string ResetGrad = "reset_grad";
    public static string GradIn(string p) => p + ".grad.in";

    public static void Add(ModelProto model, Losses.CrossEntropy loss, IReadOnlyList<ParamInfo> parameters, bool accumulate)
    {
        var dz = Losses.LogitsGradient(Losses.Emitter(model, "loss_grad/"), loss);
        var grads = GradientBuilder.Build(model, new Dictionary<string, string> { [loss.Logits] = dz }, parameters.Select(p => p.Name).ToList());
        var g = new GraphEditor(model);
        if (accumulate) g.AddInput(ValueInfos.Tensor(ResetGrad, DataType.Bool));
        foreach (var p in parameters)
        {
            var dims = p.Shape.Select(d => new Dim(d)).ToArray();
            var grad = grads[p.Name];
            if (accumulate)
            {
                g.AddInput(ValueInfos.Tensor(GradIn(p.Name), p.ElemType, dims));
                grad = g.Op("Where", [ResetGrad, grad, g.Op("Add", [grad, GradIn(p.Name)], "grad/accumulate")], "grad/accumulate");
            }
            g.AddNode("Identity", [grad], [Optimizers.Grad(p.Name)], Optimizers.Grad(p.Name));
            g.AddOutput(ValueInfos.Tensor(Optimizers.Grad(p.Name), p.ElemType, dims));
        }
    }
}
