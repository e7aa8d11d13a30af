using Onnx;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Graphs;

/// <summary>Element type and shape of one value; <see cref="Dims"/> is null when even the rank is unknown.</summary>
public sealed record ValueShape(int ElemType, Dim[]? Dims)
{
    public int? Rank => Dims?.Length;
    /// <summary>True when every dim is a known number.</summary>
    public bool IsStatic => Dims is not null && Dims.All(d => d.IsKnown);
    public override string ToString() => Dims is null ? $"{(DataType)ElemType}[?]" : $"{(DataType)ElemType}[{string.Join(", ", Dims)}]";
}

/// <summary>A node whose outputs shape inference could not infer, and why.</summary>
public sealed record NotInferredNode(NodeProto Node, string Reason)
{
    public override string ToString() => $"{Node.Describe()}: {Reason}";
}

/// <summary>
/// Shape and rank inference for the op set of exported GPT models. Known dims stay numbers, symbolic dims keep
/// their names, and anything this pass cannot see becomes an unknown dim (rank is kept wherever it follows).
/// Small int64 vectors (the Shape/Gather/Concat chains that feed Reshape) are tracked symbolically, so a
/// Reshape to [batch, seq, 12, 64] keeps "batch" and "seq". Declared value_info fills in what inference misses.
/// </summary>
public sealed class ShapeInference
{
    readonly Dictionary<string, ValueShape> _shapes = new();
    // symbolic contents of small int64 tensors (shapes, axes); scalars are stored as one element
    readonly Dictionary<string, Dim[]> _values = new();
    readonly long _opset;

    ShapeInference(ModelProto model)
    {
        _opset = model.OpsetImport.FirstOrDefault(o => o.Domain is "" or "ai.onnx")?.Version ?? 0;
    }

    /// <summary>Infers every value of the main graph (inputs, initializers and node outputs).</summary>
    public static IReadOnlyDictionary<string, ValueShape> Infer(ModelProto model) => Run(model)._shapes;

    /// <summary>Infers the graph and returns the inference (for symbolic values of small int tensors as well).</summary>
    public static ShapeInference Run(ModelProto model)
    {
        var s = new ShapeInference(model);
        var g = model.Graph;
        var declared = g.ValueInfo.Concat(g.Output).Concat(g.Input).GroupBy(v => v.Name).ToDictionary(x => x.Key, x => x.First());
        foreach (var i in g.Input) s._shapes[i.Name] = new ValueShape(ValueInfos.ElemType(i), ValueInfos.Dims(i));
        var inputs = g.Input.Select(i => i.Name).ToHashSet();
        // an initializer that is also a graph input is a default: its shape holds, its values do not
        foreach (var t in g.Initializer) if (inputs.Contains(t.Name)) s._shapes[t.Name] = Merge(new ValueShape(t.DataType, t.Dims.Select(d => new Dim(d)).ToArray()), g.Input.First(i => i.Name == t.Name)); else s.SetTensor(t.Name, t);
        foreach (var n in new GraphEditor(model).TopologicalOrder())
        {
            var outs = s.InferNode(n);
            for (int k = 0; k < n.Output.Count; k++)
            {
                var name = n.Output[k];
                if (name.Length == 0) continue;
                var inferred = k < outs.Length ? outs[k] : null;
                s._shapes[name] = s.NameUnknowns(Merge(inferred, declared.GetValueOrDefault(name)));
            }
        }
        return s;
    }

    int _unknowns;
    readonly List<NotInferredNode> _notInferred = new();

    /// <summary>
    /// Nodes whose outputs this pass could not infer (an op with no inferer, or a malformed node), in graph order.
    /// Their outputs keep only what value_info declares; the backward pass then reads such shapes at run time.
    /// </summary>
    public IReadOnlyList<NotInferredNode> NotInferred => _notInferred;

    // An unknown dim gets a fresh symbol, so that values derived from it (elementwise ops, reshapes that copy it)
    // are known to share it; two different symbols say nothing either way.
    ValueShape NameUnknowns(ValueShape s) =>
        s.Dims is null || s.Dims.All(d => d.IsKnown || d.Param is not null) ? s
            : s with { Dims = s.Dims.Select(d => d.IsKnown || d.Param is not null ? d : new Dim(null, $"unk__{++_unknowns}")).ToArray() };

    public IReadOnlyDictionary<string, ValueShape> Shapes => _shapes;
    public ValueShape? ShapeOf(string value) => _shapes.GetValueOrDefault(value);
    /// <summary>The symbolic contents of a small int64 tensor (a shape or axes), when tracked.</summary>
    public Dim[]? ValueOf(string value) => _values.GetValueOrDefault(value);

    static ValueShape Merge(ValueShape? inferred, ValueInfoProto? declared)
    {
        var dDims = declared is null ? null : ValueInfos.Dims(declared);
        int dType = declared is null ? 0 : ValueInfos.ElemType(declared);
        if (inferred is null) return new ValueShape(dType, dDims);
        var type = inferred.ElemType != 0 ? inferred.ElemType : dType;
        if (dDims is null) return inferred with { ElemType = type };
        if (inferred.Dims is null || inferred.Dims.Length != dDims.Length) return new ValueShape(type, dDims);
        return new ValueShape(type, inferred.Dims.Zip(dDims, (a, b) => a.IsKnown ? a : b.IsKnown || b.Param is not null ? b : a).ToArray());
    }

    void SetTensor(string name, TensorProto t)
    {
        _shapes[name] = new ValueShape(t.DataType, t.Dims.Select(d => new Dim(d)).ToArray());
        if ((DataType)t.DataType is DataType.Int64 or DataType.Int32 && Tensors.ElementCount(t) <= 64)
            _values[name] = Tensors.ToInt64s(t).Select(v => new Dim(v)).ToArray();
    }

    ValueShape? In(NodeProto n, int i) => n.InputOrNull(i) is { } name ? _shapes.GetValueOrDefault(name) : null;
    Dim[]? Val(NodeProto n, int i) => n.InputOrNull(i) is { } name ? _values.GetValueOrDefault(name) : null;
    long[]? Ints(NodeProto n, int i) => Val(n, i) is { } v && v.All(d => d.IsKnown) ? v.Select(d => d.Value!.Value).ToArray() : null;
    int TypeOf(NodeProto n, int i) => In(n, i)?.ElemType ?? 0;

    // a shape tensor declared longer than any real rank (a malformed model) is not expanded into that many dims
    const long MaxRank = 64;

    static ValueShape?[] One(ValueShape? s) => [s];
    static ValueShape Shape(int type, IEnumerable<Dim>? dims) => new(type, dims?.ToArray());
    static Dim Unknown => new(null);
    static int Norm(long axis, int rank) => (int)(axis < 0 ? axis + rank : axis);

    /// <summary>Infers one node's outputs; <see cref="ShapeInference"/> and the node are its whole context.</summary>
    delegate ValueShape?[] Inferer(ShapeInference s, NodeProto n);

    // Every op inference knows, alphabetically, one line each (as GradientRegistry is for gradients). An op with
    // no entry gets unknown outputs and is listed in NotInferred.
    static readonly Dictionary<string, Inferer> Inferers = new()
    {
        ["Abs"] = SameAsInput,
        ["Add"] = static (s, n) => s.Arithmetic(n),
        ["And"] = static (s, n) => s.Comparison(n),
        ["ArgMax"] = static (s, n) => s.ArgReduce(n),
        ["ArgMin"] = static (s, n) => s.ArgReduce(n),
        ["Cast"] = static (s, n) => s.Cast(n),
        ["CastLike"] = static (s, n) => One(Shape(s.TypeOf(n, 1), s.In(n, 0)?.Dims)),
        ["Ceil"] = SameAsInput,
        ["Clip"] = SameAsInput,
        ["Concat"] = static (s, n) => s.Concat(n),
        ["Constant"] = static (s, n) => One(s.ConstantShape(n)),
        ["ConstantOfShape"] = static (s, n) => s.ConstantOfShape(n),
        ["Cos"] = SameAsInput,
        ["CumSum"] = SameAsInput,
        ["Div"] = static (s, n) => s.Arithmetic(n),
        ["Dropout"] = static (s, n) => s.In(n, 0) is { } x ? [x, x with { ElemType = (int)DataType.Bool }] : [null, null],
        ["Elu"] = SameAsInput,
        ["Equal"] = static (s, n) => s.Comparison(n),
        ["Erf"] = SameAsInput,
        ["Exp"] = SameAsInput,
        ["Expand"] = static (s, n) => s.Expand(n),
        ["Flatten"] = static (s, n) => s.Flatten(n),
        ["Floor"] = SameAsInput,
        ["Gather"] = static (s, n) => s.Gather(n),
        ["GatherElements"] = static (s, n) => One(Shape(s.TypeOf(n, 0), s.In(n, 1)?.Dims)),
        ["Gelu"] = SameAsInput,
        ["Gemm"] = static (s, n) => s.Gemm(n),
        ["Greater"] = static (s, n) => s.Comparison(n),
        ["GreaterOrEqual"] = static (s, n) => s.Comparison(n),
        ["HardSigmoid"] = SameAsInput,
        ["Identity"] = static (s, n) => s.Identity(n),
        ["LayerNormalization"] = static (s, n) => s.LayerNormalization(n),
        ["LeakyRelu"] = SameAsInput,
        ["Less"] = static (s, n) => s.Comparison(n),
        ["LessOrEqual"] = static (s, n) => s.Comparison(n),
        ["Log"] = SameAsInput,
        ["LogSoftmax"] = SameAsInput,
        ["MatMul"] = static (s, n) => s.MatMul(n),
        ["Max"] = static (s, n) => s.Arithmetic(n),
        ["Mean"] = static (s, n) => s.Arithmetic(n),
        ["Min"] = static (s, n) => s.Arithmetic(n),
        ["Mod"] = static (s, n) => s.Arithmetic(n),
        ["Mul"] = static (s, n) => s.Arithmetic(n),
        ["Neg"] = static (s, n) => s.Neg(n),
        ["NonZero"] = static (s, n) => One(Shape((int)DataType.Int64, [s.In(n, 0)?.Rank is int r ? new Dim(r) : Unknown, Unknown])),
        ["Not"] = SameAsInput,
        ["OneHot"] = static (s, n) => s.OneHot(n),
        ["Or"] = static (s, n) => s.Comparison(n),
        ["Pad"] = SameRankUnknownDims,
        ["Pow"] = static (s, n) => s.Arithmetic(n),
        ["Range"] = static (s, n) => s.Range(n),
        ["Reciprocal"] = SameAsInput,
        ["ReduceL1"] = static (s, n) => s.Reduce(n),
        ["ReduceL2"] = static (s, n) => s.Reduce(n),
        ["ReduceLogSum"] = static (s, n) => s.Reduce(n),
        ["ReduceLogSumExp"] = static (s, n) => s.Reduce(n),
        ["ReduceMax"] = static (s, n) => s.Reduce(n),
        ["ReduceMean"] = static (s, n) => s.Reduce(n),
        ["ReduceMin"] = static (s, n) => s.Reduce(n),
        ["ReduceProd"] = static (s, n) => s.Reduce(n),
        ["ReduceSum"] = static (s, n) => s.Reduce(n),
        ["ReduceSumSquare"] = static (s, n) => s.Reduce(n),
        ["Relu"] = SameAsInput,
        ["Reshape"] = static (s, n) => One(Shape(s.TypeOf(n, 0), ReshapeDims(s.In(n, 0)?.Dims, s.Val(n, 1), n.GetInt("allowzero", 0) != 0))),
        ["Round"] = SameAsInput,
        ["ScatterElements"] = SameAsInput,
        ["ScatterND"] = SameAsInput,
        ["Shape"] = static (s, n) => s.ShapeOp(n),
        ["Sigmoid"] = SameAsInput,
        ["Sign"] = SameAsInput,
        ["Sin"] = SameAsInput,
        ["Size"] = static (s, n) => One(Shape((int)DataType.Int64, [])),
        ["Slice"] = static (s, n) => s.Slice(n),
        ["Softmax"] = SameAsInput,
        ["Softplus"] = SameAsInput,
        ["Split"] = static (s, n) => s.SplitShapes(n, s.In(n, 0)),
        ["Sqrt"] = SameAsInput,
        ["Squeeze"] = static (s, n) => s.Squeeze(n),
        ["Sub"] = static (s, n) => s.Arithmetic(n),
        ["Sum"] = static (s, n) => s.Arithmetic(n),
        ["Tanh"] = SameAsInput,
        ["Tile"] = SameRankUnknownDims,
        ["Transpose"] = static (s, n) => s.Transpose(n),
        ["Trilu"] = SameAsInput,
        ["Unsqueeze"] = static (s, n) => s.Unsqueeze(n),
        ["Where"] = static (s, n) => One(Shape(s.TypeOf(n, 1), Broadcast([s.In(n, 0), s.In(n, 1), s.In(n, 2)]))),
        ["Xor"] = static (s, n) => s.Comparison(n),
        ["com.microsoft.BiasGelu"] = SameAsInput,
        ["com.microsoft.FastGelu"] = SameAsInput,
        ["com.microsoft.FusedMatMul"] = static (s, n) => s.MatMul(n),
        ["com.microsoft.Gelu"] = SameAsInput,
        ["com.microsoft.QuickGelu"] = SameAsInput,
    };

    ValueShape?[] InferNode(NodeProto n)
    {
        if (!Inferers.TryGetValue(NodeAttributes.OpKey(n.Domain, n.OpType), out var infer))
        {
            _notInferred.Add(new NotInferredNode(n, "no shape inferer for this op"));
            return new ValueShape?[n.Output.Count];
        }
        try { return infer(this, n); }
        // what a malformed node raises (an axis or perm index out of range, a split list too short): its outputs
        // become unknown, reported here; any other exception is a bug in an inferer and propagates
        catch (Exception e) when (e is IndexOutOfRangeException or ArgumentException or OverflowException)
        {
            _notInferred.Add(new NotInferredNode(n, e.Message));
            return new ValueShape?[n.Output.Count];
        }
    }

    static ValueShape?[] SameAsInput(ShapeInference s, NodeProto n) => One(s.In(n, 0));

    static ValueShape?[] SameRankUnknownDims(ShapeInference s, NodeProto n) => One(Shape(s.TypeOf(n, 0), s.In(n, 0)?.Dims?.Select(_ => Unknown)));

    ValueShape?[] Identity(NodeProto n)
    {
        if (Val(n, 0) is { } v) _values[n.Output[0]] = v;
        return One(In(n, 0));
    }

    ValueShape?[] Neg(NodeProto n)
    {
        if (Ints(n, 0) is { } v) _values[n.Output[0]] = v.Select(x => new Dim(-x)).ToArray();
        return One(In(n, 0));
    }

    ValueShape?[] Cast(NodeProto n)
    {
        if (Val(n, 0) is { } v) _values[n.Output[0]] = v;
        return One(Shape((int)n.GetInt("to", 0), In(n, 0)?.Dims));
    }

    ValueShape?[] Arithmetic(NodeProto n)
    {
        FoldArithmetic(n);
        return One(Shape(TypeOf(n, 0), Broadcast(Enumerable.Range(0, n.Input.Count).Select(i => In(n, i)))));
    }

    ValueShape?[] Comparison(NodeProto n) => One(Shape((int)DataType.Bool, Broadcast([In(n, 0), In(n, 1)])));

    ValueShape?[] MatMul(NodeProto n) =>
        One(Shape(TypeOf(n, 0), MatMulDims(In(n, 0), In(n, 1), n.GetInt("transA", 0) != 0, n.GetInt("transB", 0) != 0)));

    ValueShape?[] Gemm(NodeProto n)
    {
        var a = In(n, 0)?.Dims; var b = In(n, 1)?.Dims;
        Dim m = a is { Length: 2 } ? a[n.GetInt("transA", 0) != 0 ? 1 : 0] : Unknown;
        Dim k = b is { Length: 2 } ? b[n.GetInt("transB", 0) != 0 ? 0 : 1] : Unknown;
        return One(Shape(TypeOf(n, 0), [m, k]));
    }

    ValueShape?[] Flatten(NodeProto n)
    {
        int t0 = TypeOf(n, 0);
        if (In(n, 0)?.Dims is not { } d) return One(Shape(t0, [Unknown, Unknown]));
        int axis = Norm(n.GetInt("axis", 1), d.Length);
        return One(Shape(t0, [Product(d[..axis]), Product(d[axis..])]));
    }

    ValueShape?[] Transpose(NodeProto n)
    {
        int t0 = TypeOf(n, 0);
        if (In(n, 0)?.Dims is not { } d) return One(Shape(t0, null));
        var perm = n.GetInts("perm") ?? Enumerable.Range(0, d.Length).Reverse().Select(i => (long)i).ToArray();
        return One(Shape(t0, perm.Select(p => d[p])));
    }

    ValueShape?[] Squeeze(NodeProto n)
    {
        int t0 = TypeOf(n, 0);
        var axes = _opset >= 13 ? (n.InputOrNull(1) is null ? [] : Ints(n, 1)) : n.GetInts("axes") ?? [];
        if (Val(n, 0) is { Length: 1 } v) _values[n.Output[0]] = v;
        if (In(n, 0)?.Dims is not { } d || axes is null) return One(Shape(t0, null));
        var drop = axes.Length == 0 ? Enumerable.Range(0, d.Length).Where(i => d[i].Value == 1).ToHashSet() : axes.Select(a => Norm(a, d.Length)).ToHashSet();
        return One(Shape(t0, d.Where((_, i) => !drop.Contains(i))));
    }

    ValueShape?[] Unsqueeze(NodeProto n)
    {
        int t0 = TypeOf(n, 0);
        var x = In(n, 0);
        var axes = _opset >= 13 ? Ints(n, 1) : n.GetInts("axes");
        if (Val(n, 0) is { Length: 1 } v && x?.Rank == 0) _values[n.Output[0]] = v;
        if (x?.Dims is not { } d || axes is null) return One(Shape(t0, null));
        int rank = d.Length + axes.Length;
        var at = axes.Select(a => Norm(a, rank)).ToHashSet();
        var dims = new List<Dim>(); int j = 0;
        for (int i = 0; i < rank; i++) dims.Add(at.Contains(i) ? new Dim(1) : d[j++]);
        return One(Shape(t0, dims));
    }

    ValueShape?[] Slice(NodeProto n)
    {
        if (Val(n, 0) is { } v && Ints(n, 1) is [var ss] && Ints(n, 2) is [var se]
            && (n.InputOrNull(3) is null || Ints(n, 3) is [0] or [-1]) && (n.InputOrNull(4) is null || Ints(n, 4) is [1]))
        {
            int len = v.Length;
            long lo = Math.Clamp(ss < 0 ? ss + len : ss, 0, len), hi = Math.Clamp(se < 0 ? se + len : se, 0, len);
            _values[n.Output[0]] = v[(int)lo..(int)Math.Max(lo, hi)];
        }
        return One(Shape(TypeOf(n, 0), SliceDims(n, In(n, 0)?.Dims)));
    }

    ValueShape?[] Concat(NodeProto n)
    {
        int t0 = TypeOf(n, 0);
        var parts = Enumerable.Range(0, n.Input.Count).Select(i => In(n, i)).ToArray();
        var vals = Enumerable.Range(0, n.Input.Count).Select(i => Val(n, i)).ToArray();
        if (vals.All(v => v is not null)) _values[n.Output[0]] = vals.SelectMany(v => v!).ToArray();
        var first = parts.FirstOrDefault(p => p?.Dims is not null)?.Dims;
        if (first is null) return One(Shape(t0, null));
        int axis = Norm(n.GetInt("axis", 0), first.Length);
        var dims = first.ToArray();
        dims[axis] = parts.All(p => p?.Dims is not null && p.Dims[axis].IsKnown) ? new Dim(parts.Sum(p => p!.Dims![axis].Value!.Value)) : Unknown;
        return One(Shape(t0, dims));
    }

    ValueShape?[] Gather(NodeProto n)
    {
        int t0 = TypeOf(n, 0);
        if (In(n, 0)?.Dims is not { } d || In(n, 1)?.Dims is not { } q) return One(Shape(t0, null));
        int axis = Norm(n.GetInt("axis", 0), d.Length);
        if (axis == 0 && Val(n, 0) is { } v && Ints(n, 1) is { } idx)
            _values[n.Output[0]] = idx.Select(i => v[Norm(i, v.Length)]).ToArray();
        return One(Shape(t0, d[..axis].Concat(q).Concat(d[(axis + 1)..])));
    }

    ValueShape?[] Expand(NodeProto n)
    {
        // the target shape: its tracked contents, else its length as that many unknown dims
        var target = Val(n, 1) is { } v ? new ValueShape(0, v)
            : In(n, 1)?.Dims is [{ Value: long len and >= 0 and <= MaxRank }] ? new ValueShape(0, Enumerable.Repeat(Unknown, (int)len).ToArray()) : null;
        return One(Shape(TypeOf(n, 0), Broadcast([In(n, 0), target])));
    }

    ValueShape?[] Reduce(NodeProto n) => One(Shape(TypeOf(n, 0), ReduceDims(n, In(n, 0)?.Dims)));

    ValueShape?[] ArgReduce(NodeProto n)
    {
        if (In(n, 0)?.Dims is not { } d) return One(Shape((int)DataType.Int64, null));
        int axis = Norm(n.GetInt("axis", 0), d.Length);
        bool keep = n.GetInt("keepdims", 1) != 0;
        return One(Shape((int)DataType.Int64, d.Select((v, i) => (v, i)).Where(p => keep || p.i != axis).Select(p => p.i == axis ? new Dim(1) : p.v)));
    }

    ValueShape?[] LayerNormalization(NodeProto n)
    {
        var x = In(n, 0);
        if (x?.Dims is not { } d) return [x, null, null];
        int axis = Norm(n.GetInt("axis", -1), d.Length);
        int stash = (int)n.GetInt("stash_type", 1) == 1 ? (int)DataType.Float : x.ElemType;
        var stat = Shape(stash, d.Select((v, i) => i >= axis ? new Dim(1) : v));
        return [x, stat, stat];
    }

    ValueShape?[] ShapeOp(NodeProto n)
    {
        if (In(n, 0)?.Dims is not { } d) return One(Shape((int)DataType.Int64, [Unknown]));
        long start = n.GetInt("start", 0), end = n.GetInt("end", d.Length);
        int s0 = Math.Clamp(Norm(start, d.Length), 0, d.Length), e0 = Math.Clamp(Norm(end, d.Length), 0, d.Length);
        var dims = d[s0..Math.Max(s0, e0)];
        _values[n.Output[0]] = dims;
        return One(Shape((int)DataType.Int64, [new Dim(dims.Length)]));
    }

    ValueShape?[] ConstantOfShape(NodeProto n)
    {
        int type = n.GetTensor("value")?.DataType ?? (int)DataType.Float;
        if (Val(n, 0) is { } v) return One(Shape(type, v));
        return One(Shape(type, In(n, 0)?.Dims is [{ Value: long len and >= 0 and <= MaxRank }] ? Enumerable.Repeat(Unknown, (int)len) : null));
    }

    ValueShape?[] Range(NodeProto n)
    {
        int t0 = TypeOf(n, 0);
        if (Ints(n, 0) is [var s] && Ints(n, 1) is [var e] && Ints(n, 2) is [var st] && st != 0)
            return One(Shape(t0, [new Dim(Math.Max(0, (e - s + st - (st > 0 ? 1 : -1)) / st))]));
        if (Ints(n, 0) is [0] && Ints(n, 2) is [1] && Val(n, 1) is [var limit]) return One(Shape(t0, [limit]));   // arange(seq)
        return One(Shape(t0, [Unknown]));
    }

    ValueShape?[] OneHot(NodeProto n) =>
        One(Shape(TypeOf(n, 2), In(n, 0)?.Dims is { } d ? d.Append(Ints(n, 1) is [var depth] ? new Dim(depth) : Unknown) : null));

    // Tracks Add/Sub/Mul/Div on small known int vectors (shape arithmetic in exports).
    void FoldArithmetic(NodeProto n)
    {
        if (n.Input.Count != 2 || Ints(n, 0) is not { } a || Ints(n, 1) is not { } b) return;
        if (a.Length != b.Length && a.Length != 1 && b.Length != 1) return;
        int len = Math.Max(a.Length, b.Length);
        Func<long, long, long>? f = n.OpType switch { "Add" => (p, q) => p + q, "Sub" => (p, q) => p - q, "Mul" => (p, q) => p * q, "Div" => (p, q) => q == 0 ? 0 : p / q, _ => null };
        if (f is null) return;
        _values[n.Output[0]] = Enumerable.Range(0, len).Select(i => new Dim(f(a[a.Length == 1 ? 0 : i], b[b.Length == 1 ? 0 : i]))).ToArray();
    }

    ValueShape ConstantShape(NodeProto n)
    {
        if (n.GetTensor("value") is { } t) { SetTensor(n.Output[0], t); return _shapes[n.Output[0]]; }
        if (n.Attribute("value_int") is { } vi) { _values[n.Output[0]] = [new Dim(vi.I)]; return Shape((int)DataType.Int64, []); }
        if (n.Attribute("value_ints") is { } vis) { _values[n.Output[0]] = vis.Ints.Select(v => new Dim(v)).ToArray(); return Shape((int)DataType.Int64, [new Dim(vis.Ints.Count)]); }
        if (n.Attribute("value_float") is not null) return Shape((int)DataType.Float, []);
        if (n.Attribute("value_floats") is { } vfs) return Shape((int)DataType.Float, [new Dim(vfs.Floats.Count)]);
        return Shape(0, null);
    }

    /// <summary>Numpy broadcasting of several shapes; null when any rank is unknown.</summary>
    public static Dim[]? Broadcast(IEnumerable<ValueShape?> shapes)
    {
        var list = shapes.ToList();
        if (list.Any(s => s?.Dims is null)) return null;
        int rank = list.Max(s => s!.Dims!.Length);
        var result = new Dim[rank];
        for (int i = 0; i < rank; i++)
        {
            Dim? acc = null;
            foreach (var s in list)
            {
                int j = i - (rank - s!.Dims!.Length);
                if (j < 0) continue;
                acc = acc is null ? s.Dims[j] : BroadcastDim(acc.Value, s.Dims[j]);
            }
            result[i] = acc ?? new Dim(1);
        }
        return result;
    }

    static Dim BroadcastDim(Dim a, Dim b)
    {
        if (a.Value == 1) return b;
        if (b.Value == 1) return a;
        if (a.IsKnown) return a;
        if (b.IsKnown) return b;
        return a.Param is not null && a.Param == b.Param ? a : new Dim(null);
    }

    static Dim Product(IEnumerable<Dim> dims)
    {
        long p = 1;
        foreach (var d in dims) { if (!d.IsKnown) return new Dim(null); p *= d.Value!.Value; }
        return new Dim(p);
    }

    static Dim[]? MatMulDims(ValueShape? a, ValueShape? b, bool transA, bool transB)
    {
        if (a?.Dims is not { } x || b?.Dims is not { } y) return null;
        if (x.Length == 1 || y.Length == 1)
        {
            if (x.Length == 1 && y.Length == 1) return [];
            if (x.Length == 1) return y[..^2].Append(y[transB ? ^2 : ^1]).ToArray();
            return x[..^2].Append(x[transA ? ^1 : ^2]).ToArray();
        }
        var batch = Broadcast([new ValueShape(0, x[..^2]), new ValueShape(0, y[..^2])])!;
        return batch.Append(x[transA ? ^1 : ^2]).Append(y[transB ? ^2 : ^1]).ToArray();
    }

    static Dim[]? ReshapeDims(Dim[]? input, Dim[]? target, bool allowZero)
    {
        if (target is null) return null;
        var dims = target.Select((d, i) => !allowZero && d.Value == 0 && input is not null && i < input.Length ? input[i] : d).ToArray();
        int minus = Array.FindIndex(dims, d => d.Value == -1);
        if (minus >= 0)
        {
            var total = input is null ? new Dim(null) : Product(input);
            var rest = Product(dims.Where((_, i) => i != minus));
            dims[minus] = total.IsKnown && rest.IsKnown && rest.Value != 0 ? new Dim(total.Value!.Value / rest.Value!.Value) : new Dim(null);
            // [batch, seq, d] → [-1, d] keeps nothing symbolic; [b·s, d] → [b, s, -1] may recover the last dim
            if (!dims[minus].IsKnown && input is not null && dims.Length == input.Length && input.Length > 0)
            {
                var others = dims.Where((_, i) => i != minus).ToList();
                var inOthers = input.Where((_, i) => i != minus).ToList();
                if (others.SequenceEqual(inOthers)) dims[minus] = input[minus];
            }
        }
        return dims;
    }

    Dim[]? SliceDims(NodeProto n, Dim[]? d)
    {
        if (d is null) return null;
        long[]? starts, ends, axes, steps;
        if (_opset >= 10) { starts = Ints(n, 1); ends = Ints(n, 2); axes = n.InputOrNull(3) is null ? null : Ints(n, 3); steps = n.InputOrNull(4) is null ? null : Ints(n, 4); }
        else { starts = n.GetInts("starts"); ends = n.GetInts("ends"); axes = n.GetInts("axes"); steps = null; }
        var result = d.ToArray();
        if (starts is null || ends is null || (n.InputOrNull(3) is not null && axes is null) || (n.InputOrNull(4) is not null && steps is null))
        {
            // which axes change is unknown unless axes are known
            if (axes is not null) foreach (var a in axes) result[Norm(a, d.Length)] = new Dim(null);
            else return d.Select(_ => new Dim(null)).ToArray();
            return result;
        }
        axes ??= Enumerable.Range(0, starts.Length).Select(i => (long)i).ToArray();
        for (int k = 0; k < starts.Length; k++)
        {
            int a = Norm(axes[k], d.Length);
            long step = steps?[k] ?? 1;
            if (d[a].Value is not long size) { result[a] = new Dim(null); continue; }
            long s = starts[k] < 0 ? starts[k] + size : starts[k], e = ends[k] < 0 ? ends[k] + size : ends[k];
            if (step > 0) { s = Math.Clamp(s, 0, size); e = Math.Clamp(e, 0, size); result[a] = new Dim(Math.Max(0, (e - s + step - 1) / step)); }
            else { s = Math.Clamp(s, 0, size - 1); e = Math.Clamp(e, -1, size - 1); result[a] = new Dim(Math.Max(0, (s - e - step - 1) / -step)); }
        }
        return result;
    }

    ValueShape?[] SplitShapes(NodeProto n, ValueShape? x)
    {
        int outs = n.Output.Count;
        var result = new ValueShape?[outs];
        if (x?.Dims is not { } d) { for (int i = 0; i < outs; i++) result[i] = x; return result; }
        int axis = Norm(n.GetInt("axis", 0), d.Length);
        var split = _opset >= 13 ? (n.InputOrNull(1) is null ? null : Ints(n, 1)) : n.GetInts("split");
        for (int i = 0; i < outs; i++)
        {
            var dims = d.ToArray();
            if (split is not null) dims[axis] = new Dim(split[i]);
            else if (d[axis].Value is long size)
            {
                long chunk = (size + outs - 1) / outs;
                dims[axis] = new Dim(i < outs - 1 ? chunk : size - chunk * (outs - 1));
            }
            else dims[axis] = new Dim(null);
            result[i] = new ValueShape(x.ElemType, dims);
        }
        return result;
    }

    Dim[]? ReduceDims(NodeProto n, Dim[]? d)
    {
        if (d is null) return null;
        bool axesAsInput = n.OpType == "ReduceSum" ? _opset >= 13 : _opset >= 18;
        long[]? axes = axesAsInput ? (n.InputOrNull(1) is null ? [] : Ints(n, 1)) : n.GetInts("axes") ?? [];
        bool keep = n.GetInt("keepdims", 1) != 0;
        if (axes is null) return keep ? d.Select(_ => new Dim(null)).ToArray() : null;
        if (axes.Length == 0 && n.GetInt("noop_with_empty_axes", 0) != 0) return d;
        var set = axes.Length == 0 ? Enumerable.Range(0, d.Length).ToHashSet() : axes.Select(a => Norm(a, d.Length)).ToHashSet();
        return d.Select((v, i) => (v, i)).Where(p => keep || !set.Contains(p.i)).Select(p => set.Contains(p.i) ? new Dim(1) : p.v).ToArray();
    }
}
