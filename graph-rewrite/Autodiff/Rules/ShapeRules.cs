using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Autodiff.Rules;

/// <summary>Reshape, Flatten, Squeeze, Unsqueeze move no data  ⇒  dX = reshape(dY, shape(X)).</summary>
sealed class ReshapeLikeInputRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.ReshapeLike(g.OutputGrad(0)!, g.Input(0)));
}

/// <summary>Y = transpose(X, p)  ⇒  dX = transpose(dY, p⁻¹).</summary>
sealed class TransposeRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        var perm = g.Node.GetInts("perm") ?? Enumerable.Range(0, g.RankOf(g.Input(0))).Reverse().Select(i => (long)i).ToArray();
        var inverse = new long[perm.Length];
        for (int i = 0; i < perm.Length; i++) inverse[perm[i]] = i;
        g.SetInputGrad(0, g.Op("Transpose", [g.OutputGrad(0)!], Attr.Ints("perm", inverse)));
    }
}

/// <summary>
/// Y = X[starts:ends:steps] ⇒ dX = scatter(0, dY) at the sliced positions. The positions come from slicing an index
/// tensor with the node's own starts/ends/axes/steps, so negative, clamped and strided slices need no case analysis.
/// </summary>
sealed class SliceRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string x = g.Input(0);
        var size = g.Op("Size", [x]);                                                  // scalar N
        var index = g.Op("Reshape", [g.Op("Range", [Scalar(g, 0), size, Scalar(g, 1)]), g.ShapeOfValue(x)]);
        var sliced = g.Op("Slice", g.Node.Input.Select((v, i) => i == 0 ? index : v).ToArray());
        var positions = g.Unsqueeze(g.Op("Reshape", [sliced, g.Ints(-1)]), [-1]);         // [k, 1]
        var zeros = g.Op("ConstantOfShape", [g.Unsqueeze(size, [0])], Attr.Tensor("value", ZeroOf(g, x)));
        var flat = g.Op("ScatterND", [zeros, positions, g.Op("Reshape", [g.OutputGrad(0)!, g.Ints(-1)])]);
        g.SetInputGrad(0, g.ReshapeLike(flat, x));
    }

    static string Scalar(GradientContext g, long v) => g.Const(Tensors.Int64("", [], [v]), "index");
    internal static Onnx.TensorProto ZeroOf(GradientContext g, string like)
    {
        var t = Tensors.Scalar("", (DataType)g.ElemTypeOf(like), 0);
        t.Dims.Add(1);
        return t;
    }
}

/// <summary>[Y₀, Y₁, …] = split(X, axis)  ⇒  dX = concat(dYᵢ or zeros, axis).</summary>
sealed class SplitRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        var parts = g.Node.Output.Select((o, i) => g.OutputGrad(i) ?? g.ZerosLike(o)).ToArray();
        g.SetInputGrad(0, g.Op("Concat", parts, Attr.Int("axis", g.Node.GetInt("axis", 0))));
    }
}

/// <summary>Y = concat(X₀, X₁, …, axis)  ⇒  [dX₀, dX₁, …] = split(dY, sizes of Xᵢ along axis).</summary>
sealed class ConcatRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        long axis = g.Node.GetInt("axis", 0);
        int n = g.Node.Input.Count;
        var dims = g.Node.Input.Select(x => g.ShapeOf(x)?.Dims is { } d ? d[(int)(axis < 0 ? axis + d.Length : axis)] : new Dim(null)).ToArray();
        string sizes = dims.All(d => d.IsKnown)
            ? g.Ints(dims.Select(d => d.Value!.Value).ToArray())
            : g.Op("Concat", g.Node.Input.Select(x => g.Op("Gather", [g.ShapeOfValue(x), g.Ints(axis)])).ToArray(), Attr.Int("axis", 0));
        var grads = g.Emit.OpN("Split", [g.OutputGrad(0)!, sizes], n, Attr.Int("axis", axis));
        for (int i = 0; i < n; i++) if (g.NeedsInputGrad(i)) g.SetInputGrad(i, grads[i]);
    }
}

/// <summary>Y = gather(D, I) on axis 0 (embeddings)  ⇒  dD = scatter-add(zeros(D), I, dY).</summary>
sealed class GatherRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        if (!g.NeedsInputGrad(0)) return;
        string data = g.Input(0);
        if (g.Axis(g.Node.GetInt("axis", 0), data) != 0)
            throw new GradientException($"{g.Node.Describe()}: Gather gradient w.r.t. data is implemented for axis 0 only");
        if (g.Emit.Opset < 16)
            throw new GradientException($"{g.Node.Describe()}: Gather gradient needs opset 16 (ScatterND reduction='add'); the model has {g.Emit.Opset}");
        var idx = g.CastTo(g.Input(1), (int)DataType.Int64);
        var rows = g.Op("Gather", [g.ShapeOfValue(data), g.Const(Tensors.Int64("", [], [0]), "axis0")]);
        idx = g.Op("Where", [g.Op("Less", [idx, g.Const(Tensors.Int64("", [], [0]), "zero")]), g.Add(idx, rows), idx]);
        var zeros = g.ZerosLike(data);
        g.SetInputGrad(0, g.Op("ScatterND", [zeros, g.Unsqueeze(idx, [-1]), g.OutputGrad(0)!], Attr.Str("reduction", "add")));
    }
}

/// <summary>
/// Y = Σ_axes X (ReduceSum) or its mean (ReduceMean)  ⇒  dX = expand(unsqueeze(dY, axes) when keepdims=0, shape(X)),
/// divided by the number of summed elements for the mean.
/// </summary>
sealed class ReduceRule(bool mean) : IGradientRule
{
    public void Build(GradientContext g)
    {
        string x = g.Input(0), dy = g.OutputGrad(0)!;
        bool axesAsInput = g.Node.OpType == "ReduceSum" ? g.Emit.Opset >= 13 : g.Emit.Opset >= 18;
        string? axesInput = axesAsInput ? g.InputOrNull(1) : (g.Node.GetInts("axes") is { Length: > 0 } a ? g.Ints(a) : null);
        if (axesInput is null && g.Node.GetInt("noop_with_empty_axes", 0) != 0) { g.SetInputGrad(0, dy); return; }
        if (g.Node.GetInt("keepdims", 1) == 0 && axesInput is not null) dy = g.Op("Unsqueeze", [dy, axesInput]);
        var dx = g.Op("Expand", [dy, g.ShapeOfValue(x)]);
        if (mean)
        {
            var count = g.Div(g.CastTo(g.Op("Size", [x]), g.ElemTypeOf(x)), g.CastTo(g.Op("Size", [g.Output(0)]), g.ElemTypeOf(x)));
            dx = g.Div(dx, count);
        }
        g.SetInputGrad(0, dx);
    }
}

/// <summary>
/// LayerNormalization over axes a… with its Mean μ and InvStdDev σ⁻¹ outputs (added when absent):
/// x̂ = (x − μ)·σ⁻¹, g = dY ⊙ γ  ⇒  dX = σ⁻¹·(g − mean(g) − x̂·mean(g ⊙ x̂)), dγ = Σ dY ⊙ x̂, dβ = Σ dY.
/// </summary>
sealed class LayerNormalizationRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string x = g.Input(0), gamma = g.Input(1), dy = g.OutputGrad(0)!;
        int rank = g.RankOf(x), axis = g.Axis(g.Node.GetInt("axis", -1), x);
        var axes = Enumerable.Range(axis, rank - axis).Select(i => (long)i).ToArray();
        int type = g.ElemTypeOf(x);
        var mu = g.CastTo(g.EnsureForwardOutput(1, g.Output(0) + "_mean"), type);
        var inv = g.CastTo(g.EnsureForwardOutput(2, g.Output(0) + "_invstddev"), type);
        var xhat = g.Mul(g.Sub(x, mu), inv);
        if (g.NeedsInputGrad(0))
        {
            var gy = g.Mul(dy, gamma);
            var meanG = g.ReduceMean(gy, axes, keepDims: true);
            var meanGx = g.ReduceMean(g.Mul(gy, xhat), axes, keepDims: true);
            g.SetInputGrad(0, g.Mul(inv, g.Sub(g.Sub(gy, meanG), g.Mul(xhat, meanGx))));
        }
        if (g.NeedsInputGrad(1)) g.SetInputGrad(1, g.Unbroadcast(g.Mul(dy, xhat), gamma, gradLike: x));
        if (g.InputOrNull(2) is { } beta && g.NeedsInputGrad(2)) g.SetInputGrad(2, g.Unbroadcast(dy, beta, gradLike: x));
    }
}
