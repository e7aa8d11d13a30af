using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>
/// Pass: builds the deployable model. Functional (returns a modified copy). Each target's A and B become graph inputs
/// with same-named zero-rank default initializers (A [in, 0], B [0, out]) and every use of the weight gets
/// <c>y = x·W (+ b) + (x·A)·B</c> with NO scale node and no Dropout: an adapter carries scale·B (as Olive writes them), so
/// adapters of any alpha share this model. With no adapter fed, x·A·B is [..., 0]·[0, out] = 0 and the model computes
/// exactly the base model; ORT's OrtLoraAdapter + RunOptions.AddActiveLoraAdapter feed adapters by input name.
/// </summary>
public static class BuildDeployable
{
    public static (ModelProto Model, bool Modified) Run(ModelProto model, IReadOnlyList<LoraSelection> targets)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(targets);
        if (targets.Count == 0) return (model, false);
        LoraBranch.CheckIrVersion(model);
        var copy = model.Clone();
        var g = new GraphEditor(copy);
        foreach (var t in targets)
        {
            var layer = t.Layer;
            var type = (DataType)layer.ComputeType;
            LoraBranch.AddParameter(g, Tensors.Raw(t.LoraA, type, [layer.In, 0], []));   // [in, 0]
            LoraBranch.AddParameter(g, Tensors.Raw(t.LoraB, type, [0, layer.Out], []));  // [0, out]
            // the graph inputs declare a symbolic rank so an adapter of any r is accepted
            var rankDim = t.Layer.Module + ".lora_rank";
            SetDims(g, t.LoraA, new Dim(layer.In), new Dim(null, rankDim));
            SetDims(g, t.LoraB, new Dim(null, rankDim), new Dim(layer.Out));
            foreach (var use in layer.Uses)
                LoraBranch.Add(g, layer.Module, use, t.LoraA, t.LoraB, layer.ComputeType, scale: null, dropout: null);
        }
        g.SortTopologically();
        return (copy, true);
    }

    static void SetDims(GraphEditor g, string input, Dim rows, Dim cols)
    {
        var info = g.Graph.Input.First(i => i.Name == input);
        var replacement = ValueInfos.Tensor(input, ValueInfos.ElemType(info), [rows, cols]);
        info.Type = replacement.Type;
    }
}
