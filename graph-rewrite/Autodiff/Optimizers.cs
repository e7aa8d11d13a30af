using System.Text.Json.Serialization;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Autodiff;

/// <summary>The optimizers an optimizer graph can implement; the attribute is its spelling in files and flags.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<OptimizerKind>))]
public enum OptimizerKind
{
    /// <summary>torch.optim.AdamW: decoupled weight decay p ← p·(1 − lr·wd), bias-corrected moments, eps outside the sqrt.</summary>
    [JsonStringEnumMemberName("adamw")] AdamW,
    /// <summary>torch.optim.SGD without momentum: g ← g + wd·p (coupled L2), p ← p − lr·g.</summary>
    [JsonStringEnumMemberName("sgd")] Sgd,
}

/// <summary>A tensor the optimizer updates: its name, element type and shape.</summary>
public sealed record ParamInfo(string Name, int ElemType, long[] Shape);

/// <summary>
/// Builds optimizer graphs. Inputs: the scalars <c>learning_rate</c>, <c>step</c> (1-based, int64), <c>weight_decay</c>,
/// <c>grad_scale</c> (multiplies every gradient first: 1/K after K accumulated micro-batches) and <c>max_grad_norm</c>
/// (global-norm clipping as torch.nn.utils.clip_grad_norm_; +∞ turns it off), then per parameter
/// <c>p</c>, <c>p.grad</c> (+ <c>p.exp_avg</c>, <c>p.exp_avg_sq</c> for AdamW). Outputs: <c>p.updated</c>
/// (+ <c>p.exp_avg.updated</c>, <c>p.exp_avg_sq.updated</c>) and <c>grad_norm</c> (the norm before clipping).
/// </summary>
public static class Optimizers
{
    public const string LearningRate = "learning_rate", Step = "step", WeightDecay = "weight_decay",
                        GradScale = "grad_scale", MaxGradNorm = "max_grad_norm", GradNorm = "grad_norm";
    public static string Grad(string p) => p + ".grad";
    public static string ExpAvg(string p) => p + ".exp_avg";
    public static string ExpAvgSq(string p) => p + ".exp_avg_sq";
    public static string Updated(string v) => v + ".updated";

    /// <summary>Names of the moment tensors an optimizer keeps per parameter (none for SGD).</summary>
    public static string[] Moments(OptimizerKind kind, string p) => kind == OptimizerKind.AdamW ? [ExpAvg(p), ExpAvgSq(p)] : [];

    /// <summary>The optimizer graph for <paramref name="parameters"/> (all float32).</summary>
    public static ModelProto Build(OptimizerKind kind, IReadOnlyList<ParamInfo> parameters, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8)
    {
        if (parameters.Count == 0) throw new ArgumentException("an optimizer graph needs at least one parameter", nameof(parameters));
        if (parameters.Any(p => p.ElemType != (int)DataType.Float))
            throw new NotSupportedException($"optimizer graphs are float32; '{parameters.First(p => p.ElemType != (int)DataType.Float).Name}' is {(DataType)parameters.First(p => p.ElemType != (int)DataType.Float).ElemType}");
        var model = new ModelProto { IrVersion = 8, ProducerName = "onnxlora", Graph = new GraphProto { Name = $"{kind.ToString().ToLowerInvariant()}_step" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(model);
        foreach (var s in new[] { LearningRate, WeightDecay, GradScale, MaxGradNorm }) g.AddInput(ValueInfos.Tensor(s, DataType.Float));
        g.AddInput(ValueInfos.Tensor(Step, DataType.Int64));
        foreach (var p in parameters)
        {
            var dims = p.Shape.Select(d => new Dim(d)).ToArray();
            foreach (var v in new[] { p.Name, Grad(p.Name) }.Concat(Moments(kind, p.Name))) g.AddInput(ValueInfos.Tensor(v, DataType.Float, dims));
        }
        var e = new GradientEmitter(g, ShapeInference.Run(model), plainMatMul: false, "opt/");
        string F(double v) => e.Scalar(v, (int)DataType.Float);

        // g ← g·scale; global norm over all gradients; coefficient min(1, max_norm / (norm + 1e-6)) as PyTorch
        var scaled = parameters.ToDictionary(p => p.Name, p => e.Op("Mul", [Grad(p.Name), GradScale]));
        var squares = parameters.Select(p => e.Op("ReduceSumSquare", [scaled[p.Name]], Attr.Int("keepdims", 0))).ToArray();
        var norm = e.Op("Sqrt", [squares.Length == 1 ? squares[0] : e.Op("Sum", squares)]);
        var coef = e.Op("Min", [F(1), e.Op("Div", [MaxGradNorm, e.Op("Add", [norm, F(1e-6)])])]);
        g.AddNode("Identity", [norm], [GradNorm], "grad_norm");
        g.AddOutput(ValueInfos.Tensor(GradNorm, DataType.Float));

        // bias corrections in float64, as PyTorch computes them in Python floats: 1 − 0.999³ loses ~2e-5 in float32
        string D(double v) => e.Scalar(v, (int)DataType.Double);
        var t = e.CastTo(Step, (int)DataType.Double);
        var bc1 = e.Op("Sub", [D(1), e.Op("Pow", [D(beta1), t])]);
        var bc2Sqrt = e.CastTo(e.Op("Sqrt", [e.Op("Sub", [D(1), e.Op("Pow", [D(beta2), t])])]), (int)DataType.Float);
        var stepSize = e.CastTo(e.Op("Div", [e.CastTo(LearningRate, (int)DataType.Double), bc1]), (int)DataType.Float);
        var decay = e.Op("Sub", [F(1), e.Op("Mul", [LearningRate, WeightDecay])]);
        foreach (var p in parameters)
        {
            var grad = e.Op("Mul", [scaled[p.Name], coef]);
            var dims = p.Shape.Select(d => new Dim(d)).ToArray();
            if (kind == OptimizerKind.Sgd)
            {
                var withDecay = e.Op("Add", [grad, e.Op("Mul", [p.Name, WeightDecay])]);
                Output(g, e.Op("Sub", [p.Name, e.Op("Mul", [withDecay, LearningRate])]), Updated(p.Name), dims);
                continue;
            }
            // AdamW, as torch 1.13's _single_tensor_adamw
            var m = e.Op("Add", [e.Op("Mul", [ExpAvg(p.Name), F(beta1)]), e.Op("Mul", [grad, F(1 - beta1)])]);
            var v = e.Op("Add", [e.Op("Mul", [ExpAvgSq(p.Name), F(beta2)]), e.Op("Mul", [e.Op("Mul", [grad, grad]), F(1 - beta2)])]);
            var denom = e.Op("Add", [e.Op("Div", [e.Op("Sqrt", [v]), bc2Sqrt]), F(eps)]);
            var decayed = e.Op("Mul", [p.Name, decay]);
            Output(g, e.Op("Sub", [decayed, e.Op("Mul", [e.Op("Div", [m, denom]), stepSize])]), Updated(p.Name), dims);
            Output(g, m, Updated(ExpAvg(p.Name)), dims);
            Output(g, v, Updated(ExpAvgSq(p.Name)), dims);
        }
        return model;
    }

    static void Output(GraphEditor g, string value, string name, Dim[] dims)
    {
        g.AddNode("Identity", [value], [name], name);
        g.AddOutput(ValueInfos.Tensor(name, DataType.Float, dims));
    }
}
