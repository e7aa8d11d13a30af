using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Autodiff;

/// <summary>
/// What a <see cref="IGradientRule"/> sees of one forward node, in ORT's gradient-builder vocabulary:
/// <see cref="Input"/> (I), <see cref="Output"/> (O), <see cref="OutputGrad"/> (GO), <see cref="SetInputGrad"/> (GI),
/// plus emitters for the standard ops rules are written in. Every emitted node lands in the same graph.
/// </summary>
public sealed class GradientContext
{
    readonly GradientEmitter _emit;
    readonly string?[] _outputGrads;
    readonly bool[] _needs;
    internal readonly string?[] InputGrads;

    internal GradientContext(GradientEmitter emit, NodeProto node, string?[] outputGrads, bool[] needs)
    {
        _emit = emit; Node = node; _outputGrads = outputGrads; _needs = needs;
        InputGrads = new string?[node.Input.Count];
    }

    public NodeProto Node { get; }
    public GradientEmitter Emit => _emit;
    public string Input(int i) => Node.Input[i];
    public string? InputOrNull(int i) => Node.InputOrNull(i);
    public string Output(int i) => Node.Output[i];
    /// <summary>The gradient flowing into output <paramref name="i"/>, or null when none does.</summary>
    public string? OutputGrad(int i) => i < _outputGrads.Length ? _outputGrads[i] : null;
    /// <summary>True when some parameter that requires grad depends on input <paramref name="i"/>.</summary>
    public bool NeedsInputGrad(int i) => i < _needs.Length && _needs[i];
    public void SetInputGrad(int i, string grad) => InputGrads[i] = grad;

    public ValueShape? ShapeOf(string value) => _emit.ShapeOf(value);
    public int RankOf(string value) => _emit.RankOf(value) ?? throw new GradientException(
        $"{Node.Describe()}: the rank of '{value}' is unknown; declare its shape in value_info or give the graph inputs shapes");
    public int ElemTypeOf(string value) => _emit.ElemTypeOf(value);

    /// <summary>Normalizes a possibly negative axis against the rank of <paramref name="value"/>.</summary>
    public int Axis(long axis, string value) => (int)(axis < 0 ? axis + RankOf(value) : axis);

    /// <summary>The constant int64 contents of an input (axes, shapes, starts…), or null when it is computed at run time.</summary>
    public long[]? ConstInts(string value) => _emit.ConstInts(value);

    /// <summary>Names optional output <paramref name="index"/> of the forward node (adding it if absent).</summary>
    public string EnsureForwardOutput(int index, string hint) => _emit.EnsureNodeOutput(Node, index, hint);

    // the emitters rules use, forwarded so a rule reads g.Mul(…) rather than g.Emit.Mul(…)
    public string Op(string op, string[] inputs, params AttributeProto[] attrs) => _emit.Op(op, inputs, attrs);
    public string Add(string a, string b) => _emit.Op("Add", [a, b]);
    public string Sub(string a, string b) => _emit.Op("Sub", [a, b]);
    public string Mul(string a, string b) => _emit.Op("Mul", [a, b]);
    public string Div(string a, string b) => _emit.Op("Div", [a, b]);
    public string Neg(string a) => _emit.Op("Neg", [a]);
    /// <summary>A scalar constant with the element type of <paramref name="like"/>.</summary>
    public string Scalar(double value, string like) => _emit.Scalar(value, _emit.ElemTypeOf(like));
    public string ShapeOfValue(string value) => _emit.Op("Shape", [value]);
    public string ReshapeLike(string value, string like) => _emit.Op("Reshape", [value, _emit.Op("Shape", [like])]);
    public string ReduceSum(string x, long[] axes, bool keepDims) => _emit.ReduceSum(x, axes, keepDims);
    public string ReduceMean(string x, long[] axes, bool keepDims) => _emit.ReduceMean(x, axes, keepDims);
    public string Unsqueeze(string x, long[] axes) => _emit.Unsqueeze(x, axes);
    public string Unbroadcast(string grad, string like, string? gradLike = null) => _emit.Unbroadcast(grad, like, gradLike ?? Output(0));
    public string MatMul(string a, string b, bool transA = false, bool transB = false, double alpha = 1) => _emit.MatMul(a, b, transA, transB, alpha);
    public string Flatten2D(string x) => _emit.Flatten2D(x);
    public string ZerosLike(string value) => _emit.ZerosLike(value);
    public string CastTo(string value, int elemType) => _emit.CastTo(value, elemType);
    public string Const(TensorProto t, string hint = "const") => _emit.Const(t, hint);
    public string Ints(params long[] values) => _emit.Ints(values);
}

/// <summary>Thrown when a backward graph cannot be built; the message names the op, node and path.</summary>
public sealed class GradientException(string message) : Exception(message);

/// <summary>
/// Emits the standard-ONNX building blocks of backward graphs into one model, choosing the form the model's
/// opset wants (axes as inputs from opset 13/18 on), and knowing shapes from <see cref="ShapeInference"/>.
/// </summary>
public sealed class GradientEmitter
{
    readonly GraphEditor _g;
    readonly Dictionary<string, ValueShape> _shapes;
    readonly ShapeInference _inference;
    readonly Dictionary<string, int> _ranks = new();
    readonly Dictionary<string, string> _constCache = new();
    readonly long _opset;

    internal GradientEmitter(GraphEditor g, ShapeInference inference, bool plainMatMul, string prefix)
    {
        _g = g; _inference = inference; _shapes = new(inference.Shapes); PlainMatMul = plainMatMul; Prefix = prefix;
        _opset = g.Opset("");
        if (_opset < 13) throw new GradientException($"model opset {_opset} is older than 13; backward graphs need opset 13 or newer (re-export with opset_version>=14)");
    }

    public GraphEditor Graph => _g;
    public long Opset => _opset;
    /// <summary>Test-only: spell FusedMatMul as Transpose + MatMul, for kernels (float64) that FusedMatMul lacks.</summary>
    public bool PlainMatMul { get; }
    /// <summary>Name prefix of every emitted value ("grad/").</summary>
    public string Prefix { get; }

    public ValueShape? ShapeOf(string v) => _shapes.GetValueOrDefault(v);
    public int? RankOf(string v) => _shapes.GetValueOrDefault(v)?.Rank ?? (_ranks.TryGetValue(v, out var r) ? r : null);
    public int ElemTypeOf(string v)
    {
        var t = _shapes.GetValueOrDefault(v)?.ElemType ?? 0;
        return t != 0 ? t : _g.ElemTypeOf(v);
    }
    /// <summary>Records what the emitter knows about a value it made (a gradient has its forward value's shape).</summary>
    public void Declare(string value, ValueShape? shape) { if (shape is not null) _shapes[value] = shape; }
    public void DeclareRank(string value, int rank) => _ranks[value] = rank;
    public long[]? ConstInts(string v)
    {
        if (_g.IsGraphInput(v)) return null;   // an initializer that is also an input is only a default
        if (_g.Initializer(v) is { } t) return Tensors.ToInt64s(t);
        var vals = _inference.ValueOf(v);
        return vals is not null && vals.All(d => d.IsKnown) ? vals.Select(d => d.Value!.Value).ToArray() : null;
    }

    public string EnsureNodeOutput(NodeProto node, int index, string hint) => _g.EnsureNodeOutput(node, index, hint);

    public string Op(string op, string[] inputs, params AttributeProto[] attrs) => OpDomain(op, "", inputs, attrs);

    public string OpDomain(string op, string domain, string[] inputs, params AttributeProto[] attrs)
    {
        var output = _g.UniqueName(Prefix + op);
        _g.AddNode(op, inputs, [output], Prefix + op, domain, attrs);
        return output;
    }

    public string[] OpN(string op, string[] inputs, int outputs, params AttributeProto[] attrs)
    {
        var names = Enumerable.Range(0, outputs).Select(_ => _g.UniqueName(Prefix + op)).ToArray();
        _g.AddNode(op, inputs, names, Prefix + op, "", attrs);
        return names;
    }

    public string Const(TensorProto t, string hint = "const") => _g.AddConstant(Prefix + hint, t);

    public string Ints(params long[] values)
    {
        var key = "i64:" + string.Join(",", values);
        if (!_constCache.TryGetValue(key, out var name))
            _constCache[key] = name = Const(Tensors.Int64Vector("", values), "ints");
        return name;
    }

    public string Scalar(double value, int elemType)
    {
        if (elemType == 0) elemType = (int)DataType.Float;
        var key = $"{elemType}:{value:R}";
        if (!_constCache.TryGetValue(key, out var name))
            _constCache[key] = name = Const(Tensors.Scalar("", (DataType)elemType, value), "scalar");
        return name;
    }

    public string CastTo(string value, int elemType) => Op("Cast", [value], Attr.Int("to", elemType));

    public string ZerosLike(string value)
    {
        var zero = Tensors.Scalar("", (DataType)ElemTypeOf(value), 0);
        zero.Dims.Clear(); zero.Dims.Add(1);
        return Op("ConstantOfShape", [Op("Shape", [value])], Attr.Tensor("value", zero));
    }

    public string ReduceSum(string x, long[] axes, bool keepDims) =>
        _opset >= 13 ? Op("ReduceSum", [x, Ints(axes)], Attr.Int("keepdims", keepDims ? 1 : 0))
                     : Op("ReduceSum", [x], Attr.Ints("axes", axes), Attr.Int("keepdims", keepDims ? 1 : 0));

    public string ReduceMean(string x, long[] axes, bool keepDims) =>
        _opset >= 18 ? Op("ReduceMean", [x, Ints(axes)], Attr.Int("keepdims", keepDims ? 1 : 0))
                     : Op("ReduceMean", [x], Attr.Ints("axes", axes), Attr.Int("keepdims", keepDims ? 1 : 0));

    public string Unsqueeze(string x, long[] axes) => Op("Unsqueeze", [x, Ints(axes)]);

    /// <summary>[…, k] → [N, k] (rank from shape inference).</summary>
    public string Flatten2D(string x)
    {
        int rank = RankOf(x) ?? throw new GradientException($"rank of '{x}' is unknown");
        var y = Op("Flatten", [x], Attr.Int("axis", Math.Max(rank - 1, 0)));
        DeclareRank(y, 2);
        return y;
    }

    /// <summary>
    /// alpha·op(a)·op(b) with op = transpose of the last two dims: com.microsoft.FusedMatMul, so that no transposed
    /// copy of a weight is ever made. In the test-only <see cref="PlainMatMul"/> mode: Transpose + MatMul (+ Mul).
    /// </summary>
    public string MatMul(string a, string b, bool transA, bool transB, double alpha)
    {
        int? ra = RankOf(a), rb = RankOf(b);
        string y;
        if (!transA && !transB && alpha == 1) y = Op("MatMul", [a, b]);
        else if (!PlainMatMul)
        {
            _g.EnsureOpset("com.microsoft", 1);
            y = OpDomain("FusedMatMul", "com.microsoft", [a, b], Attr.Int("transA", transA ? 1 : 0), Attr.Int("transB", transB ? 1 : 0), Attr.Float("alpha", (float)alpha));
        }
        else
        {
            var ta = transA ? SwapLast(a) : a;
            var tb = transB ? SwapLast(b) : b;
            y = Op("MatMul", [ta, tb]);
            if (alpha != 1) y = Op("Mul", [y, Scalar(alpha, ElemTypeOf(a))]);
        }
        if (ra is int x && rb is int z) DeclareRank(y, Math.Max(x, z));
        return y;
    }

    string SwapLast(string v)
    {
        int rank = RankOf(v) ?? throw new GradientException($"rank of '{v}' is unknown");
        var perm = Enumerable.Range(0, rank).Select(i => (long)i).ToArray();
        (perm[^1], perm[^2]) = (perm[^2], perm[^1]);
        return Op("Transpose", [v], Attr.Ints("perm", perm));
    }

    /// <summary>
    /// Sums a gradient of shape like <paramref name="gradLike"/> down to the shape of <paramref name="like"/>
    /// (undoing numpy broadcasting). Static axes when shapes say enough; otherwise the axes are computed at run time
    /// from Shape(grad) and Shape(like) (plain ORT has no BroadcastGradientArgs).
    /// </summary>
    public string Unbroadcast(string grad, string like, string gradLike)
    {
        var x = ShapeOf(like)?.Dims;
        var y = ShapeOf(gradLike)?.Dims;
        if (x is not null && y is not null && x.Length <= y.Length)
        {
            int lead = y.Length - x.Length;
            var axes = new List<long>();
            bool dynamic = false;
            for (int i = 0; i < y.Length; i++)
            {
                if (i < lead) { axes.Add(i); continue; }
                Dim dx = x[i - lead], dy = y[i];
                if (dy.Value == 1) continue;
                if (dx.Value == 1) axes.Add(i);
                else if (dx.IsKnown && dx.Value == dy.Value) continue;
                else if (dx.Param is not null && dx.Param == dy.Param) continue;
                else if (dx.IsKnown && dx.Value != 1) continue;  // equal by the forward op's broadcasting rule
                else dynamic = true;
            }
            if (!dynamic)
            {
                if (axes.Count == 0) return grad;
                var summed = ReduceSum(grad, axes.ToArray(), keepDims: true);
                return lead == 0 ? summed : Op("Reshape", [summed, ShapeOfLike(like, x)]);
            }
        }
        // run-time axes: pad Shape(like) with leading ones, compare with Shape(grad), sum where they differ
        var sy = Op("Shape", [grad]);
        var sx = Op("Shape", [like]);
        var padCount = Op("Sub", [Op("Size", [sy]), Op("Size", [sx])]);
        var one = Tensors.Int64("", [1], [1]);
        var ones = Op("ConstantOfShape", [Unsqueeze(padCount, [0])], Attr.Tensor("value", one));
        var sxp = Op("Concat", [ones, sx], Attr.Int("axis", 0));
        var dynAxes = Op("Reshape", [Op("NonZero", [Op("Not", [Op("Equal", [sxp, sy])])]), Ints(-1)]);
        var reduced = Op("ReduceSum", [grad, dynAxes], Attr.Int("keepdims", 1), Attr.Int("noop_with_empty_axes", 1));
        return Op("Reshape", [reduced, sx]);
    }

    string ShapeOfLike(string like, Dim[] dims) =>
        dims.All(d => d.IsKnown) ? Ints(dims.Select(d => d.Value!.Value).ToArray()) : Op("Shape", [like]);
}
