using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Autodiff;

/// <summary>
/// Loss graphs, written stably (log-sum-exp) in standard ONNX, with their gradient w.r.t. the logits as one fused
/// rule: for L = Σᵢ wᵢ·(lse(zᵢ) − zᵢ[yᵢ]),  dz = (softmax(z) − onehot(y))·w. Differentiating through Gather and
/// LogSoftmax instead would keep several logits-sized temporaries; this keeps one (the softmax).
/// </summary>
public static class Losses
{
    /// <summary>The label value that marks a position the loss ignores (PyTorch's ignore_index).</summary>
    public const long IgnoreIndex = -100;

    /// <summary>A built loss: the scalar loss value, and what the gradient pass needs to seed the logits.</summary>
    public sealed record CrossEntropy(string Loss, string Logits, string SafeLabels, string Weights);

    /// <summary>
    /// Causal-LM cross-entropy: logits [batch, seq, vocab] at position t predict labels[t+1]; labels equal to
    /// <see cref="IgnoreIndex"/> (padding, prompt tokens) are not counted; the mean is over counted positions.
    /// The labels are shifted rather than the logits, so no logits-sized slice is made.
    /// </summary>
    public static CrossEntropy CausalLm(GradientEmitter e, string logits, string labels)
    {
        var type = e.ElemTypeOf(logits);
        // shifted[b, t] = labels[b, t+1]; the last position has no target
        var next = e.Op("Slice", [labels, e.Ints(1), e.Ints(long.MaxValue), e.Ints(1)]);                          // [batch, seq-1]
        var batchOne = e.Op("Concat", [e.Op("Slice", [e.Op("Shape", [labels]), e.Ints(0), e.Ints(1)]), e.Ints(1)], Attr.Int("axis", 0));
        var pad = e.Op("ConstantOfShape", [batchOne], Attr.Tensor("value", Tensors.Int64("", [1], [IgnoreIndex])));   // [batch, 1]
        var shifted = e.Op("Concat", [next, pad], Attr.Int("axis", 1));                                               // [batch, seq]
        var counted = e.Op("Not", [e.Op("Equal", [shifted, e.Const(Tensors.Int64("", [], [IgnoreIndex]), "ignore")])]);
        var mask = e.CastTo(counted, type);                                                                            // [batch, seq]
        var count = e.Op("Max", [e.ReduceSum(mask, [0, 1], keepDims: false), e.Scalar(1, type)]);
        var weights = e.Unsqueeze(e.Op("Div", [mask, count]), [-1]);                                                  // [batch, seq, 1]
        var safe = e.Unsqueeze(e.Op("Where", [counted, shifted, e.Const(Tensors.Int64("", [], [0]), "zero")]), [-1]); // [batch, seq, 1]
        return Weighted(e, logits, safe, weights);
    }

    /// <summary>
    /// Mean cross-entropy of class logits [batch, classes] against labels [batch] (int64).
    /// </summary>
    public static CrossEntropy Classification(GradientEmitter e, string logits, string labels)
    {
        var type = e.ElemTypeOf(logits);
        var weight = e.Op("Reciprocal", [e.CastTo(e.Op("Size", [labels]), type)]);                                  // scalar 1/batch
        return Weighted(e, logits, e.Unsqueeze(labels, [-1]), weight);
    }

    // L = Σ w·(lse(z) − z[y]) over the last axis; safe labels [..., 1], weights broadcastable to [..., 1]
    static CrossEntropy Weighted(GradientEmitter e, string logits, string safe, string weights)
    {
        var lse = e.Opset >= 18
            ? e.Op("ReduceLogSumExp", [logits, e.Ints(-1)], Attr.Int("keepdims", 1))
            : e.Op("ReduceLogSumExp", [logits], Attr.Ints("axes", -1), Attr.Int("keepdims", 1));                     // [..., 1]
        var picked = e.Op("GatherElements", [logits, safe], Attr.Int("axis", -1));                                   // [..., 1]
        var terms = e.Op("Mul", [e.Op("Sub", [lse, picked]), weights]);
        int rank = e.RankOf(logits) ?? 3;
        var loss = e.ReduceSum(terms, Enumerable.Range(0, rank).Select(i => (long)i).ToArray(), keepDims: false);
        return new CrossEntropy(loss, logits, safe, weights);
    }

    /// <summary>dz = (softmax(z) − onehot(y))·w, written as a scatter into the weighted softmax (no one-hot tensor).</summary>
    public static string LogitsGradient(GradientEmitter e, CrossEntropy ce)
    {
        var pw = e.Op("Mul", [e.Op("Softmax", [ce.Logits], Attr.Int("axis", -1)), ce.Weights]);                   // [..., vocab]
        var atLabel = e.Op("Sub", [e.Op("GatherElements", [pw, ce.SafeLabels], Attr.Int("axis", -1)), ce.Weights]);
        var dz = e.Op("ScatterElements", [pw, ce.SafeLabels, atLabel], Attr.Int("axis", -1));
        e.Declare(dz, e.ShapeOf(ce.Logits));
        return dz;
    }

    /// <summary>An emitter for loss and optimizer graphs outside the gradient pass.</summary>
    public static GradientEmitter Emitter(ModelProto model, string prefix) =>
        new(new GraphEditor(model), ShapeInference.Run(model), plainMatMul: false, prefix);
}
