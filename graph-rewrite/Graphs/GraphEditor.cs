using Onnx;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Graphs;

/// <summary>A tensor dimension: a fixed size or a symbolic name (null for unknown).</summary>
public readonly record struct Dim(long? Value, string? Param = null)
{
    public static implicit operator Dim(long value) => new(value);
    public static implicit operator Dim(string param) => new(null, param);
    public bool IsKnown => Value.HasValue;
    public override string ToString() => Value?.ToString() ?? Param ?? "?";
}

/// <summary>Makes <see cref="ValueInfoProto"/> declarations for graph inputs and outputs.</summary>
public static class ValueInfos
{
    public static ValueInfoProto Tensor(string name, DataType elemType, params Dim[] dims) => Tensor(name, (int)elemType, dims);

    public static ValueInfoProto Tensor(string name, int elemType, Dim[]? dims)
    {
        var t = new TypeProto.Types.Tensor { ElemType = elemType };
        if (dims is not null)
        {
            t.Shape = new TensorShapeProto();
            foreach (var d in dims)
            {
                var dim = new TensorShapeProto.Types.Dimension();
                if (d.Value is long v) dim.DimValue = v; else if (d.Param is not null) dim.DimParam = d.Param;
                t.Shape.Dim.Add(dim);
            }
        }
        return new ValueInfoProto { Name = name, Type = new TypeProto { TensorType = t } };
    }

    /// <summary>The declared dims of a value info, or null when it has no shape.</summary>
    public static Dim[]? Dims(ValueInfoProto info)
    {
        var shape = info.Type?.TensorType?.Shape;
        if (shape is null) return null;
        return shape.Dim.Select(d => d.ValueCase switch
        {
            TensorShapeProto.Types.Dimension.ValueOneofCase.DimValue => new Dim(d.DimValue),
            TensorShapeProto.Types.Dimension.ValueOneofCase.DimParam => new Dim(null, d.DimParam),
            _ => new Dim(null),
        }).ToArray();
    }

    public static int ElemType(ValueInfoProto info) => info.Type?.TensorType?.ElemType ?? 0;
}

/// <summary>
/// A working view of one model's main graph: producers and consumers of each value, initializers by name,
/// unique names, and the few edits that rewrites need. Edits go through this class so the indexes stay true;
/// code that changes the protobuf lists directly must call <see cref="Reindex"/>.
/// </summary>
public sealed class GraphEditor
{
    readonly Dictionary<string, NodeProto> _producer = new();
    readonly Dictionary<string, List<NodeProto>> _consumers = new();
    readonly Dictionary<string, TensorProto> _initializers = new();
    readonly HashSet<string> _names = new();
    int _counter;

    public GraphEditor(ModelProto model)
    {
        Model = model;
        Reindex();
    }

    public ModelProto Model { get; }
    public GraphProto Graph => Model.Graph;

    public void Reindex()
    {
        _producer.Clear(); _consumers.Clear(); _initializers.Clear(); _names.Clear();
        foreach (var t in Graph.Initializer) { _initializers[t.Name] = t; _names.Add(t.Name); }
        foreach (var v in Graph.Input) _names.Add(v.Name);
        foreach (var v in Graph.Output) _names.Add(v.Name);
        foreach (var v in Graph.ValueInfo) _names.Add(v.Name);
        foreach (var n in Graph.Node) Index(n);
    }

    void Index(NodeProto n)
    {
        if (n.Name.Length > 0) _names.Add(n.Name);
        foreach (var o in n.Output) if (o.Length > 0) { _producer[o] = n; _names.Add(o); }
        foreach (var i in n.Input.Distinct()) if (i.Length > 0) Consumers(i, create: true).Add(n);
        // values used inside subgraphs (If/Loop bodies) count as uses of the outer value
        foreach (var a in n.Attribute)
            foreach (var g in a.G is null ? a.Graphs : a.Graphs.Append(a.G))
                foreach (var i in OuterReferences(g)) Consumers(i, create: true).Add(n);
    }

    List<NodeProto> Consumers(string value, bool create)
    {
        if (!_consumers.TryGetValue(value, out var list))
        {
            list = new List<NodeProto>();
            if (create) _consumers[value] = list;
        }
        return list;
    }

    static IEnumerable<string> OuterReferences(GraphProto g)
    {
        var local = new HashSet<string>(g.Input.Select(i => i.Name).Concat(g.Initializer.Select(i => i.Name)).Concat(g.Node.SelectMany(n => n.Output)));
        return g.Node.SelectMany(n => n.Input).Where(i => i.Length > 0 && !local.Contains(i)).Distinct();
    }

    public NodeProto? Producer(string value) => _producer.GetValueOrDefault(value);
    public IReadOnlyList<NodeProto> Consumers(string value) => Consumers(value, create: false);
    public TensorProto? Initializer(string name) => _initializers.GetValueOrDefault(name);
    public bool IsInitializer(string name) => _initializers.ContainsKey(name);
    public bool IsGraphInput(string name) => Graph.Input.Any(i => i.Name == name);
    public bool IsGraphOutput(string name) => Graph.Output.Any(o => o.Name == name);
    public IEnumerable<NodeProto> Nodes => Graph.Node;

    /// <summary>The opset version imported for a domain ("" = the default ONNX domain), 0 when absent.</summary>
    public long Opset(string domain = "") =>
        Model.OpsetImport.FirstOrDefault(o => o.Domain == domain || (domain == "" && o.Domain == "ai.onnx"))?.Version ?? 0;

    /// <summary>Imports <paramref name="domain"/> at least at <paramref name="version"/>.</summary>
    public void EnsureOpset(string domain, long version)
    {
        var o = Model.OpsetImport.FirstOrDefault(x => x.Domain == domain);
        if (o is null) Model.OpsetImport.Add(new OperatorSetIdProto { Domain = domain, Version = version });
        else if (o.Version < version) o.Version = version;
    }

    /// <summary>A name not used by any value, initializer or node in the graph, derived from <paramref name="hint"/>.</summary>
    public string UniqueName(string hint)
    {
        if (_names.Add(hint)) return hint;
        string candidate;
        do candidate = $"{hint}_{++_counter}"; while (_names.Contains(candidate));
        _names.Add(candidate);
        return candidate;
    }

    /// <summary>Appends a node with the given outputs (the caller made them unique) and indexes it.</summary>
    public NodeProto AddNode(string opType, IEnumerable<string> inputs, IEnumerable<string> outputs, string? name = null,
                             string domain = "", params AttributeProto[] attributes)
    {
        var n = new NodeProto { OpType = opType, Domain = domain, Name = UniqueName(name ?? opType) };
        n.Input.AddRange(inputs);
        n.Output.AddRange(outputs);
        n.Attribute.AddRange(attributes);
        Graph.Node.Add(n);
        Index(n);
        return n;
    }

    /// <summary>Appends a one-output node and returns the output's (new, unique) name.</summary>
    public string Op(string opType, string[] inputs, string? outputHint = null, string domain = "", params AttributeProto[] attributes)
    {
        var output = UniqueName(outputHint ?? opType.ToLowerInvariant());
        AddNode(opType, inputs, [output], outputHint is null ? null : outputHint + "/" + opType, domain, attributes);
        return output;
    }

    /// <summary>
    /// Names a node's optional output <paramref name="index"/> (e.g. LayerNormalization's Mean) when it is absent,
    /// padding skipped outputs with "", and returns the output's name.
    /// </summary>
    public string EnsureNodeOutput(NodeProto node, int index, string hint)
    {
        while (node.Output.Count <= index) node.Output.Add("");
        if (node.Output[index].Length == 0)
        {
            node.Output[index] = UniqueName(hint);
            _producer[node.Output[index]] = node;
        }
        return node.Output[index];
    }

    /// <summary>Adds an initializer; its name must be free.</summary>
    public TensorProto AddInitializer(TensorProto tensor)
    {
        if (_initializers.ContainsKey(tensor.Name)) throw new InvalidOperationException($"initializer '{tensor.Name}' exists already");
        _names.Add(tensor.Name);
        Graph.Initializer.Add(tensor);
        _initializers[tensor.Name] = tensor;
        return tensor;
    }

    /// <summary>Adds a constant initializer under a fresh name derived from <paramref name="hint"/> and returns that name.</summary>
    public string AddConstant(string hint, TensorProto value)
    {
        value.Name = UniqueName(hint);
        AddInitializer(value);
        return value.Name;
    }

    public void RemoveInitializer(string name)
    {
        if (!_initializers.Remove(name, out var t)) return;
        Graph.Initializer.Remove(t);
    }

    public void AddInput(ValueInfoProto input)
    {
        _names.Add(input.Name);
        Graph.Input.Add(input);
    }

    public void AddOutput(ValueInfoProto output)
    {
        _names.Add(output.Name);
        Graph.Output.Add(output);
    }

    public void RemoveNode(NodeProto node)
    {
        Graph.Node.Remove(node);
        foreach (var o in node.Output) if (_producer.GetValueOrDefault(o) == node) _producer.Remove(o);
        foreach (var list in _consumers.Values) list.Remove(node);
    }

    /// <summary>
    /// Renames output <paramref name="index"/> of <paramref name="node"/> to <paramref name="newName"/> (a fresh name)
    /// without touching its consumers: the caller makes another node produce the old name.
    /// </summary>
    public void RenameNodeOutput(NodeProto node, int index, string newName)
    {
        var old = node.Output[index];
        if (_producer.GetValueOrDefault(old) == node) _producer.Remove(old);
        node.Output[index] = newName;
        _names.Add(newName);
        _producer[newName] = node;
    }

    /// <summary>Points every use of <paramref name="oldValue"/> (node inputs and graph outputs) at <paramref name="newValue"/>.</summary>
    public void ReplaceAllUses(string oldValue, string newValue, NodeProto? except = null)
    {
        foreach (var n in Consumers(oldValue).ToList())
        {
            if (n == except) continue;
            for (int i = 0; i < n.Input.Count; i++) if (n.Input[i] == oldValue) n.Input[i] = newValue;
            Consumers(oldValue, create: false).Remove(n);
            if (!Consumers(newValue, create: true).Contains(n)) Consumers(newValue, create: true).Add(n);
        }
        foreach (var o in Graph.Output) if (o.Name == oldValue) o.Name = newValue;
    }

    /// <summary>Removes nodes whose outputs nobody uses, and initializers no node uses. Returns how many went.</summary>
    public int RemoveDeadNodes()
    {
        var live = new HashSet<string>(Graph.Output.Select(o => o.Name));
        var keep = new HashSet<NodeProto>();
        foreach (var n in TopologicalOrder().AsEnumerable().Reverse())
        {
            if (!n.Output.Any(live.Contains)) continue;
            keep.Add(n);
            foreach (var i in n.Input) live.Add(i);
            foreach (var a in n.Attribute)
                foreach (var g in a.G is null ? a.Graphs : a.Graphs.Append(a.G))
                    foreach (var i in OuterReferences(g)) live.Add(i);
        }
        int removed = Graph.Node.Count - keep.Count;
        var order = Graph.Node.Where(keep.Contains).ToList();
        Graph.Node.Clear(); Graph.Node.AddRange(order);
        var deadInits = Graph.Initializer.Where(t => !live.Contains(t.Name) && !IsGraphInput(t.Name)).ToList();
        foreach (var t in deadInits) Graph.Initializer.Remove(t);
        var known = new HashSet<string>(live);
        var deadInfos = Graph.ValueInfo.Where(v => !known.Contains(v.Name)).ToList();
        foreach (var v in deadInfos) Graph.ValueInfo.Remove(v);
        Reindex();
        return removed + deadInits.Count;
    }

    /// <summary>The nodes in an order where every producer comes before its consumers (Kahn, stable).</summary>
    public List<NodeProto> TopologicalOrder()
    {
        var pending = new Dictionary<NodeProto, int>();
        foreach (var n in Graph.Node)
            pending[n] = n.Input.Where(i => i.Length > 0).Distinct().Count(i => _producer.TryGetValue(i, out var p) && p != n);
        var ready = new Queue<NodeProto>(Graph.Node.Where(n => pending[n] == 0));
        var order = new List<NodeProto>(Graph.Node.Count);
        while (ready.Count > 0)
        {
            var n = ready.Dequeue();
            order.Add(n);
            foreach (var o in n.Output.Where(o => o.Length > 0))
                foreach (var c in Consumers(o).Distinct())
                    if (pending.ContainsKey(c) && c.Input.Contains(o) && --pending[c] == 0) ready.Enqueue(c);
        }
        if (order.Count != Graph.Node.Count)
        {
            var stuck = Graph.Node.First(n => !order.Contains(n));
            throw new InvalidOperationException($"graph '{Graph.Name}' has a cycle or an undefined input at {stuck.Describe()}");
        }
        return order;
    }

    /// <summary>Reorders the graph's node list topologically (ONNX requires it).</summary>
    public void SortTopologically()
    {
        var order = TopologicalOrder();
        Graph.Node.Clear();
        Graph.Node.AddRange(order);
    }

    /// <summary>The element type of a value when it is known from an initializer, input, output or value_info.</summary>
    public int ElemTypeOf(string value)
    {
        if (_initializers.TryGetValue(value, out var t)) return t.DataType;
        var info = Graph.Input.Concat(Graph.Output).Concat(Graph.ValueInfo).FirstOrDefault(v => v.Name == value);
        return info is null ? 0 : ValueInfos.ElemType(info);
    }
}
