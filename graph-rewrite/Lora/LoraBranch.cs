using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>
/// The one line that is LoRA, as graph nodes: <c>y = base(x) + [scale ·] ((dropout(x)·A)·B)</c>. The base node keeps
/// computing <c>x·W (+ b)</c> into a renamed output; an Add named "&lt;module&gt;/lora/Add" writes the original output name,
/// so consumers and graph outputs are untouched.
/// </summary>
internal static class LoraBranch
{
    /// <summary>Adds the branch at one use of the weight. <paramref name="scale"/> null = no Mul node.</summary>
    public static void Add(GraphEditor g, string module, LinearUse use, string loraA, string loraB, int computeType,
                           double? scale, (string Ratio, string TrainingMode, long Seed)? dropout)
    {
        var node = g.Producer(use.Output) ?? throw new InvalidOperationException($"no node produces '{use.Output}' (node '{use.Node}')");
        var output = use.Output;
        var baseOut = g.UniqueName(output + "/base");
        g.RenameNodeOutput(node, 0, baseOut);

        var x = use.Activation;                                   // [..., in]
        if (dropout is { } d)
        {
            var dropped = g.UniqueName(module + "/lora/dropout");
            g.AddNode("Dropout", [x, d.Ratio, d.TrainingMode], [dropped], module + "/lora/Dropout", "", Attr.Int("seed", d.Seed));
            x = dropped;
        }
        var h = g.Op("MatMul", [x, loraA], module + "/lora/h");   // [..., r]
        var delta = g.Op("MatMul", [h, loraB], module + "/lora/delta"); // [..., out]
        if (scale is double s)
        {
            var scaleConst = g.AddConstant(module + "/lora/scale", Tensors.Scalar("", (DataType)computeType, s));
            delta = g.Op("Mul", [delta, scaleConst], module + "/lora/scaled");
        }
        g.AddNode("Add", [baseOut, delta], [output], module + "/lora/Add");
    }

    /// <summary>Declares a LoRA parameter as a graph input with a same-named default initializer.</summary>
    public static void AddParameter(GraphEditor g, TensorProto initial)
    {
        if (g.IsInitializer(initial.Name) || g.IsGraphInput(initial.Name) || g.Producer(initial.Name) is not null)
            throw new InvalidOperationException($"the model already has a value named '{initial.Name}'; was it rewritten already? Rewrite the base model instead.");
        g.AddInitializer(initial);
        g.AddInput(ValueInfos.Tensor(initial.Name, initial.DataType, initial.Dims.Select(d => new Dim(d)).ToArray()));
    }

    /// <summary>LoRA parameters are graph inputs with defaults, which ONNX allows from IR version 4 on.</summary>
    public static void CheckIrVersion(ModelProto model)
    {
        if (model.IrVersion < 4)
            throw new NotSupportedException($"the model has IR version {model.IrVersion}; LoRA parameters need graph inputs with default initializers (IR ≥ 4). Re-export the model with a newer exporter.");
    }
}
