using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>
/// Pass: builds the training view. Functional (the input model is not changed; a modified copy is returned).
/// For each target: A [in, r] and B [r, out] become graph inputs with same-named initializers holding their initial
/// values (A from <see cref="LoraConfig.Init"/> and the seed, B zeros), and every node that uses the weight gets
/// <c>y = x·W (+ b) + scale·((dropout(x)·A)·B)</c>. Cases:
/// 1. MatMul/FusedMatMul on any rank: the branch multiplies the same x.
/// 2. Gemm on a 2-D view (Conv1D exports): the branch multiplies the 2-D input; the bias stays in the Gemm.
/// 3. Transposed weights (Gemm transB, a Transpose in front): A/B are still [in, r]/[r, out]; W is never touched.
/// 4. A weight used by several nodes: one A/B pair, a branch at every use.
/// The scale is a constant Mul, left out when it is 1. With <see cref="LoraConfig.Dropout"/> &gt; 0 each branch input
/// goes through Dropout(ratio, training_mode) where training_mode is the shared bool input
/// <see cref="DropoutTrainingModeInput"/> (default false: off, so evaluation needs no feed).
/// </summary>
public static class InjectLora
{
    /// <summary>Name of the bool scalar input that turns the LoRA Dropout nodes on.</summary>
    public const string DropoutTrainingModeInput = "lora_dropout.training_mode";

    public static (ModelProto Model, bool Modified) Run(ModelProto model, IReadOnlyList<LoraSelection> targets, LoraConfig config)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(targets);
        ArgumentNullException.ThrowIfNull(config);
        if (targets.Count == 0) return (model, false);
        LoraBranch.CheckIrVersion(model);
        var copy = model.Clone();
        var g = new GraphEditor(copy);

        (string Ratio, string TrainingMode, long Seed)? dropout = null;
        if (config.Dropout > 0)
        {
            if (g.Opset() < 12)
                throw new NotSupportedException($"LoRA dropout needs Dropout with a training_mode input (opset ≥ 12); the model imports opset {g.Opset()}. Use --dropout 0.");
            LoraBranch.AddParameter(g, Tensors.Bool(DropoutTrainingModeInput, [], [false]));
            var ratio = g.AddConstant("lora_dropout.ratio", Tensors.Scalar("", DataType.Float, config.Dropout));
            dropout = (ratio, DropoutTrainingModeInput, config.Seed);
        }

        int dropoutNodes = 0;
        foreach (var t in targets)
        {
            var layer = t.Layer;
            var a = LoraInitialValues.A(layer.In, t.Rank, config.Init, config.Seed, layer.Module);
            LoraBranch.AddParameter(g, Tensors.FromDoubles(t.LoraA, (DataType)layer.ComputeType, [layer.In, t.Rank], a));            // [in, r]
            LoraBranch.AddParameter(g, Tensors.FromDoubles(t.LoraB, (DataType)layer.ComputeType, [t.Rank, layer.Out], new double[t.Rank * layer.Out])); // [r, out]
            double? scale = t.Scale == 1 ? null : t.Scale;
            foreach (var use in layer.Uses)
            {
                // each Dropout node draws its own mask stream
                var d = dropout is { } dd ? dd with { Seed = dd.Seed + ++dropoutNodes } : dropout;
                LoraBranch.Add(g, layer.Module, use, t.LoraA, t.LoraB, layer.ComputeType, scale, d);
            }
        }
        g.SortTopologically();
        return (copy, true);
    }
}
