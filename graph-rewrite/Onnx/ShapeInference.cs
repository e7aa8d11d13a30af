using Onnx;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Onnx;

/// <summary>Element type and shape of one value; <see cref="Dims"/> is null when even the rank is unknown.</summary>
public sealed record ValueShape(int ElemType, Dim[]? Dims)
{
    public int? Rank => Dims?.Length;
    /// <summary>True when every dim is a known number.</summary>
    public bool IsStatic => Dims is not null && Dims.All(d => d.IsKnown);
    public override string ToString() => Dims is null ? $"{(DataType)ElemType}[?]" : $"{(DataType)ElemType}[{string.Join(", ", Dims)}]";
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
            ValueShape?[] outs;
            try { outs = s.InferNode(n); }
            catch (Exception e) when (e is not OnnxFormatException) { outs = new ValueShape?[n.Output.Count]; }
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

    static ValueShape?[] One(ValueShape? s) => [s];
    static ValueShape Shape(int type, IEnumerable<Dim>? dims) => new(type, dims?.ToArray());
    static Dim Unknown => new(null);
    static int Norm(long axis, int rank) => (int)(axis < 0 ? axis + rank : axis);

    ValueShape?[] InferNode(NodeProto n)
    {
        var x = In(n, 0);
        int t0 = TypeOf(n, 0);
        switch (n.OpType)
        {
            case "Identity" or "Neg" or "Sqrt" or "Reciprocal" or "Exp" or "Log" or "Tanh" or "Erf" or "Sigmoid" or "Relu"
                or "Gelu" or "FastGelu" or "Abs" or "Softmax" or "LogSoftmax" or "Floor" or "Ceil" or "Sin" or "Cos" or "Clip"
                or "LeakyRelu" or "Trilu" or "CumSum" or "Not" or "Round" or "Sign" or "Elu" or "Softplus" or "HardSigmoid"
                or "BiasGelu" or "QuickGelu":
                if (n.OpType == "Identity" && Val(n, 0) is { } iv) _values[n.Output[0]] = iv;
                if (n.OpType == "Neg" && Ints(n, 0) is { } nv) _values[n.Output[0]] = nv.Select(v => new Dim(-v)).ToArray();
                return One(x);
            case "Dropout":
                return [x, x is null ? null : x with { ElemType = (int)DataType.Bool }];
            case "Cast":
                if (Val(n, 0) is { } cv) _values[n.Output[0]] = cv;
                return One(Shape((int)n.GetInt("to", 0), x?.Dims));
            case "CastLike":
                return One(Shape(TypeOf(n, 1), x?.Dims));
            case "Add" or "Sub" or "Mul" or "Div" or "Pow" or "Max" or "Min" or "Sum" or "Mean" or "Mod":
                FoldArithmetic(n);
                return One(Shape(t0, Broadcast(Enumerable.Range(0, n.Input.Count).Select(i => In(n, i)))));
            case "Equal" or "Less" or "Greater" or "LessOrEqual" or "GreaterOrEqual" or "And" or "Or" or "Xor":
                return One(Shape((int)DataType.Bool, Broadcast([In(n, 0), In(n, 1)])));
            case "Where":
                return One(Shape(TypeOf(n, 1), Broadcast([In(n, 0), In(n, 1), In(n, 2)])));
            case "MatMul" or "FusedMatMul":
                return One(Shape(t0, MatMulDims(x, In(n, 1), n.GetInt("transA", 0) != 0, n.GetInt("transB", 0) != 0)));
            case "Gemm":
            {
                var a = x?.Dims; var b = In(n, 1)?.Dims;
                Dim m = a is { Length: 2 } ? a[n.GetInt("transA", 0) != 0 ? 1 : 0] : Unknown;
                Dim k = b is { Length: 2 } ? b[n.GetInt("transB", 0) != 0 ? 0 : 1] : Unknown;
                return One(Shape(t0, [m, k]));
            }
            case "Reshape": return One(Shape(t0, ReshapeDims(x?.Dims, Val(n, 1), n.GetInt("allowzero", 0) != 0)));
            case "Flatten":
            {
                if (x?.Dims is not { } d) return One(Shape(t0, [Unknown, Unknown]));
                int axis = Norm(n.GetInt("axis", 1), d.Length);
                return One(Shape(t0, [Product(d[..axis]), Product(d[axis..])]));
            }
            case "Transpose":
            {
                if (x?.Dims is not { } d) return One(Shape(t0, null));
                var perm = n.GetInts("perm") ?? Enumerable.Range(0, d.Length).Reverse().Select(i => (long)i).ToArray();
                return One(Shape(t0, perm.Select(p => d[p])));
            }
            case "Squeeze":
            {
                var axes = _opset >= 13 ? (n.InputOrNull(1) is null ? [] : Ints(n, 1)) : n.GetInts("axes") ?? [];
                if (Val(n, 0) is { Length: 1 } sv) _values[n.Output[0]] = sv;
                if (x?.Dims is not { } d || axes is null) return One(Shape(t0, null));
                var drop = axes.Length == 0 ? Enumerable.Range(0, d.Length).Where(i => d[i].Value == 1).ToHashSet() : axes.Select(a => Norm(a, d.Length)).ToHashSet();
                return One(Shape(t0, d.Where((_, i) => !drop.Contains(i))));
            }
            case "Unsqueeze":
            {
                var axes = _opset >= 13 ? Ints(n, 1) : n.GetInts("axes");
                if (Val(n, 0) is { Length: 1 } uv && x?.Rank == 0) _values[n.Output[0]] = uv;
                if (x?.Dims is not { } d || axes is null) return One(Shape(t0, null));
                int rank = d.Length + axes.Length;
                var at = axes.Select(a => Norm(a, rank)).ToHashSet();
                var dims = new List<Dim>(); int j = 0;
                for (int i = 0; i < rank; i++) dims.Add(at.Contains(i) ? new Dim(1) : d[j++]);
                return One(Shape(t0, dims));
            }
            case "Slice":
                if (Val(n, 0) is { } slv && Ints(n, 1) is [var ss] && Ints(n, 2) is [var se]
                    && (n.InputOrNull(3) is null || Ints(n, 3) is [0] or [-1]) && (n.InputOrNull(4) is null || Ints(n, 4) is [1]))
                {
                    int len = slv.Length;
                    long lo = Math.Clamp(ss < 0 ? ss + len : ss, 0, len), hi = Math.Clamp(se < 0 ? se + len : se, 0, len);
                    _values[n.Output[0]] = slv[(int)lo..(int)Math.Max(lo, hi)];
                }
                return One(Shape(t0, SliceDims(n, x?.Dims)));
            case "Split": return SplitShapes(n, x);
            case "Concat":
            {
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
            case "Gather":
            {
                var idx = In(n, 1);
                if (x?.Dims is not { } d || idx?.Dims is not { } q) return One(Shape(t0, null));
                int axis = Norm(n.GetInt("axis", 0), d.Length);
                if (axis == 0 && Val(n, 0) is { } gv && Ints(n, 1) is { } gi)
                    _values[n.Output[0]] = gi.Select(i => gv[Norm(i, gv.Length)]).ToArray();
                return One(Shape(t0, d[..axis].Concat(q).Concat(d[(axis + 1)..])));
            }
            case "GatherElements": return One(Shape(t0, In(n, 1)?.Dims));
            case "ScatterND" or "ScatterElements": return One(x);
            case "Expand": return One(Shape(t0, Broadcast([x, Val(n, 1) is { } ev ? new ValueShape(0, ev) : In(n, 1)?.Dims is [{ Value: long elen }] ? new ValueShape(0, Enumerable.Repeat(Unknown, (int)elen).ToArray()) : null])));
            case "ReduceSum" or "ReduceMean" or "ReduceMax" or "ReduceMin" or "ReduceProd" or "ReduceSumSquare" or "ReduceLogSumExp"
                or "ReduceL2" or "ReduceL1" or "ReduceLogSum":
                return One(Shape(t0, ReduceDims(n, x?.Dims)));
            case "ArgMax" or "ArgMin":
            {
                if (x?.Dims is not { } d) return One(Shape((int)DataType.Int64, null));
                int axis = Norm(n.GetInt("axis", 0), d.Length);
                bool keep = n.GetInt("keepdims", 1) != 0;
                return One(Shape((int)DataType.Int64, d.Select((v, i) => (v, i)).Where(p => keep || p.i != axis).Select(p => p.i == axis ? new Dim(1) : p.v)));
            }
            case "LayerNormalization":
            {
                if (x?.Dims is not { } d) return [x, null, null];
                int axis = Norm(n.GetInt("axis", -1), d.Length);
                int stash = (int)n.GetInt("stash_type", 1) == 1 ? (int)DataType.Float : t0;
                var stat = Shape(stash, d.Select((v, i) => i >= axis ? new Dim(1) : v));
                return [x, stat, stat];
            }
            case "Shape":
            {
                if (x?.Dims is not { } d) return One(Shape((int)DataType.Int64, [Unknown]));
                long start = n.GetInt("start", 0), end = n.GetInt("end", d.Length);
                int s0 = Math.Clamp(Norm(start, d.Length), 0, d.Length), e0 = Math.Clamp(Norm(end, d.Length), 0, d.Length);
                var dims = d[s0..Math.Max(s0, e0)];
                _values[n.Output[0]] = dims;
                return One(Shape((int)DataType.Int64, [new Dim(dims.Length)]));
            }
            case "Size": return One(Shape((int)DataType.Int64, []));
            case "Constant": return One(ConstantShape(n));
            case "ConstantOfShape":
            {
                int type = n.GetTensor("value")?.DataType ?? (int)DataType.Float;
                if (Val(n, 0) is { } sv) return One(Shape(type, sv));
                return One(Shape(type, In(n, 0)?.Dims is [{ Value: long clen }] ? Enumerable.Repeat(Unknown, (int)clen) : null));
            }
            case "Range":
            {
                if (Ints(n, 0) is [var s] && Ints(n, 1) is [var e] && Ints(n, 2) is [var st] && st != 0)
                    return One(Shape(t0, [new Dim(Math.Max(0, (e - s + st - (st > 0 ? 1 : -1)) / st))]));
                if (Ints(n, 0) is [0] && Ints(n, 2) is [1] && Val(n, 1) is [var limit]) return One(Shape(t0, [limit]));   // arange(seq)
                return One(Shape(t0, [Unknown]));
            }
            case "NonZero": return One(Shape((int)DataType.Int64, [x?.Rank is int r ? new Dim(r) : Unknown, Unknown]));
            case "Tile" or "Pad": return One(Shape(t0, x?.Dims?.Select(_ => Unknown)));
            case "OneHot":
                return One(Shape(TypeOf(n, 2), x?.Dims is { } od ? od.Append(Ints(n, 1) is [var depth] ? new Dim(depth) : Unknown) : null));
            default:
                return new ValueShape?[n.Output.Count];
        }
    }

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
