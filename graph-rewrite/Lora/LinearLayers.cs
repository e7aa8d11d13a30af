using System.Text.RegularExpressions;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>One node that multiplies an activation by a weight: <c>y = x·W_eff</c>.</summary>
/// <param name="Node">The node's name (its first output when it has none), as error messages and the manifest show it.</param>
/// <param name="OpType">MatMul, Gemm or FusedMatMul.</param>
/// <param name="Activation">The activation input x (the node's input 0).</param>
/// <param name="Output">The node's output y; unique in the graph, so passes find the node by it.</param>
/// <param name="Chain">Transpose/Cast/Identity nodes between the initializer and the node, nearest to the initializer first.</param>
public sealed record LinearUse(string Node, string OpType, string Activation, string Output, IReadOnlyList<string> Chain);

/// <summary>
/// A LoRA-able linear layer: one constant weight initializer and every MatMul/Gemm/FusedMatMul node that multiplies an
/// activation by it in the same orientation. A weight used by several nodes (tied or deduplicated initializers) is one
/// layer with several <see cref="Uses"/>: it gets one A/B pair applied at every use.
/// </summary>
public sealed record LinearLayer
{
    /// <summary>Module path as PyTorch/PEFT users see it, e.g. "transformer.h.0.attn.c_attn" or "trf_blocks.0.att.W_query".</summary>
    public required string Module { get; init; }
    /// <summary>The weight initializer's name.</summary>
    public required string Weight { get; init; }
    public required IReadOnlyList<LinearUse> Uses { get; init; }
    /// <summary>Input features: the contracted dimension of x.</summary>
    public required long In { get; init; }
    /// <summary>Output features.</summary>
    public required long Out { get; init; }
    /// <summary>True when the stored initializer is [out, in] (Gemm transB=1, FusedMatMul transB=1, or a Transpose in front).</summary>
    public required bool WeightTransposed { get; init; }
    /// <summary>The initializer's element type (ONNX TensorProto numbering).</summary>
    public required int WeightType { get; init; }
    /// <summary>The element type the node multiplies in (the weight's, or a Cast's target): LoRA A/B use it.</summary>
    public required int ComputeType { get; init; }
    /// <summary>The output head: produces a graph output, is vocabulary-sized, or is tied to the token embedding.</summary>
    public required bool IsHead { get; init; }
    /// <summary>Other nodes that read the same initializer (a Gather for tied embeddings, other linears), described.</summary>
    public required IReadOnlyList<string> SharedWith { get; init; }
    /// <summary>
    /// Module paths of the other uses' node scopes (a deduplicated initializer serves modules with other names): target
    /// patterns match them too, so naming any of those modules selects the shared layer.
    /// </summary>
    public IReadOnlyList<string> Aliases { get; init; } = [];
    /// <summary>The block index in the module path (first all-digit segment: "transformer.h.3.mlp.c_fc" → 3), if any.</summary>
    public int? BlockIndex { get; init; }

    /// <summary>The weight is used by more than one node (several uses, or other readers such as an embedding Gather).</summary>
    public bool IsShared => Uses.Count > 1 || SharedWith.Count > 0;
    /// <summary>Names of the nodes that use the weight as a linear layer.</summary>
    public IReadOnlyList<string> Nodes => Uses.Select(u => u.Node).ToList();
    /// <summary>Parameters of a rank-r adapter on this layer: r·(in + out).</summary>
    public long LoraParameters(int rank) => rank * (In + Out);
}

/// <summary>
/// Finds the LoRA-able linear layers of a model: every MatMul, Gemm and com.microsoft.FusedMatMul whose right operand is
/// a constant weight (an initializer that is not also a graph input, possibly behind Transpose/Cast/Identity nodes) and
/// whose left operand is an activation. Activation×activation products (attention scores and context) never qualify,
/// nor do nodes with transA, alpha ≠ 1, or a weight on the left.
/// </summary>
public static partial class LinearLayers
{
    /// <summary>Discovers the linear layers of <paramref name="model"/>, in graph order. Does not change the model.</summary>
    public static IReadOnlyList<LinearLayer> Discover(ModelProto model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var g = new GraphEditor(model);
        var inputs = new HashSet<string>(model.Graph.Input.Select(i => i.Name));
        long? vocab = TokenEmbeddingRows(g, inputs);

        // (weight, stored orientation) → uses, in graph order
        var groups = new List<(string Weight, bool StoredTransposed, List<LinearUse> Uses, TensorProto Init, int ComputeType)>();
        foreach (var node in g.TopologicalOrder())
        {
            if (!IsLinearOp(node, out bool nodeTransposed)) continue;
            if (node.Input.Count < 2 || TraceWeight(g, inputs, node.Input[0]) is not null) continue;
            if (TraceWeight(g, inputs, node.Input[1]) is not { } w || w.Init.Dims.Count != 2) continue;
            // LoRA factors take the type the node multiplies in: an integer weight, or a Cast to an integer, is no target
            if (!Tensors.IsFloatType(w.Init.DataType) || !Tensors.IsFloatType(w.ComputeType)) continue;
            bool storedTransposed = w.Transposes % 2 == 1 ^ nodeTransposed;
            var use = new LinearUse(NodeName(node), node.OpType, node.Input[0], node.Output[0], w.Chain.Select(NodeName).ToList());
            var group = groups.FirstOrDefault(x => x.Weight == w.Init.Name && x.StoredTransposed == storedTransposed);
            if (group.Uses is null) groups.Add((w.Init.Name, storedTransposed, [use], w.Init, w.ComputeType));
            else group.Uses.Add(use);
        }

        var layers = new List<LinearLayer>();
        var modules = new HashSet<string>();
        foreach (var (weight, storedT, uses, init, computeType) in groups)
        {
            long rows = init.Dims[0], cols = init.Dims[1];
            long @in = storedT ? cols : rows, @out = storedT ? rows : cols;
            var own = new HashSet<string>(uses.Select(u => u.Node).Concat(uses.SelectMany(u => u.Chain)));
            var sharedWith = g.Consumers(weight).Where(c => !own.Contains(NodeName(c))).Select(c => c.Describe()).ToList();
            bool tied = g.Consumers(weight).Any(c => c.OpType == "Gather");
            // a tied head's initializer is named for the embedding ("transformer.wte.weight"): its node scope ("lm_head") says more
            var firstNode = g.Producer(uses[0].Output)!;
            var module = Unique(modules, tied && ScopePath(firstNode.Name) is { Length: > 0 } scope ? scope : ModuleName(weight, firstNode, BiasOf(g, firstNode)));
            // vocabulary-sized only counts for the last linear: a tiny model's MLP can be as wide as its vocabulary
            bool last = ReferenceEquals(uses, groups[^1].Uses);
            bool head = tied || (last && vocab is long v && @out == v) || uses.Any(u => ReachesGraphOutput(g, u.Output));
            layers.Add(new LinearLayer
            {
                Module = module, Weight = weight, Uses = uses, In = @in, Out = @out, WeightTransposed = storedT,
                WeightType = init.DataType, ComputeType = computeType, IsHead = head, SharedWith = sharedWith,
                BlockIndex = BlockIndexOf(module),
                Aliases = uses.Skip(1).Select(u => ScopePath(g.Producer(u.Output)!.Name)).Where(a => a.Length > 0 && a != module).Distinct().ToList(),
            });
        }
        return layers;
    }

    /// <summary>The initializer added to a linear node's output (its bias), if one is.</summary>
    static string? BiasOf(GraphEditor g, NodeProto node) =>
        g.Consumers(node.Output[0]).Where(c => c.OpType == "Add").SelectMany(c => c.Input).FirstOrDefault(i => i != node.Output[0] && g.IsInitializer(i));

    /// <summary>The block index of a module path: its first all-digit segment ("h.3.mlp" → 3), or null.</summary>
    public static int? BlockIndexOf(string module)
    {
        foreach (var part in module.Split('.'))
            if (part.Length > 0 && part.All(char.IsAsciiDigit) && int.TryParse(part, out int i)) return i;
        return null;
    }

    /// <summary>
    /// The module path for a weight: the initializer's name without ".weight" when it is meaningful
    /// ("transformer.h.0.attn.c_attn.weight"), otherwise the node's torch scope
    /// ("/trf_blocks/trf_blocks.0/att/W_query/MatMul" → "trf_blocks.0.att.W_query"), otherwise a cleaned-up weight name.
    /// </summary>
    public static string ModuleName(string weight, NodeProto node, string? bias = null)
    {
        if (IsMeaningful(weight)) return weight.EndsWith(".weight", StringComparison.Ordinal) ? weight[..^".weight".Length] : weight;
        var scope = ScopePath(node.Name);
        if (scope.Length > 0) return scope;
        // older torch exports keep only the bias's name ("encoder.layer.0.attention.self.query.bias"): it names the Linear
        if (bias is not null && IsMeaningful(bias) && bias.EndsWith(".bias", StringComparison.Ordinal)) return bias[..^".bias".Length];
        return AnonymousChars().Replace(weight, "_").Trim('_');
    }

    /// <summary>
    /// The module path of a torch node name: scopes joined with '.', dropping the node's own last segment; a scope that
    /// extends the previous one ("ff" → "ff.0", "trf_blocks" → "trf_blocks.0") replaces it.
    /// </summary>
    public static string ScopePath(string nodeName)
    {
        var segments = nodeName.Split('/', StringSplitOptions.RemoveEmptyEntries);
        if (segments.Length < 2) return "";
        var parts = new List<string>();
        foreach (var s in segments[..^1])
        {
            if (parts.Count > 0 && s.StartsWith(parts[^1] + ".", StringComparison.Ordinal)) parts[^1] = s;
            else parts.Add(s);
        }
        return string.Join('.', parts);
    }

    // torch names folded constants "onnx::MatMul_123"; other exporters use "val_12", "_v_3", "Constant_4", "initializer_5"
    static bool IsMeaningful(string name) =>
        !name.Contains("::") && !GeneratedName().IsMatch(name) && (name.Contains('.') || name.EndsWith("weight", StringComparison.Ordinal));

    [GeneratedRegex(@"^(val|_v|const|constant|initializer|onnx)_?\d*$|_\d+$", RegexOptions.IgnoreCase)]
    private static partial Regex GeneratedName();

    [GeneratedRegex(@"[^A-Za-z0-9_.]+")]
    private static partial Regex AnonymousChars();

    static string Unique(HashSet<string> used, string name)
    {
        if (used.Add(name)) return name;
        for (int i = 1; ; i++) if (used.Add($"{name}_{i}")) return $"{name}_{i}";
    }

    internal static string NodeName(NodeProto n) => n.Name.Length > 0 ? n.Name : n.Output[0];

    static bool IsLinearOp(NodeProto node, out bool transposedB)
    {
        transposedB = false;
        bool onnxDomain = node.Domain is "" or "ai.onnx";
        if (node.OpType == "MatMul" && onnxDomain) return true;
        if (node.OpType == "Gemm" && onnxDomain)
        {
            transposedB = node.GetInt("transB", 0) != 0;
            return node.GetInt("transA", 0) == 0 && node.GetFloat("alpha", 1f) == 1f;
        }
        if (node.OpType == "FusedMatMul" && node.Domain == "com.microsoft")
        {
            transposedB = node.GetInt("transB", 0) != 0;
            return node.GetInt("transA", 0) == 0 && node.GetFloat("alpha", 1f) == 1f
                && node.GetInt("transBatchA", 0) == 0 && node.GetInt("transBatchB", 0) == 0;
        }
        return false;
    }

    /// <summary>Follows Identity/Cast/2-D Transpose producers back to an initializer that is not a graph input.</summary>
    static (TensorProto Init, int Transposes, List<NodeProto> Chain, int ComputeType)? TraceWeight(GraphEditor g, HashSet<string> inputs, string value)
    {
        var chain = new List<NodeProto>();
        int transposes = 0, computeType = 0;
        while (true)
        {
            if (inputs.Contains(value)) return null; // overridable (a graph input with a default): not a frozen weight
            if (g.Initializer(value) is { } init)
            {
                chain.Reverse();
                return (init, transposes, chain, computeType == 0 ? init.DataType : computeType);
            }
            var p = g.Producer(value);
            if (p is null || p.Input.Count == 0) return null;
            switch (p.OpType)
            {
                case "Identity": break;
                case "Cast":
                    if (!Tensors.IsFloatType((int)p.GetInt("to", 0))) return null;
                    if (computeType == 0) computeType = (int)p.GetInt("to", 0);
                    break;
                case "Transpose":
                    var perm = p.GetInts("perm");
                    if (perm is not null && !(perm.Length == 2 && perm[0] == 1 && perm[1] == 0)) return null;
                    transposes++;
                    break;
                default: return null;
            }
            chain.Add(p);
            value = p.Input[0];
        }
    }

    /// <summary>
    /// Rows of the token embedding: the largest 2-D initializer that a Gather indexes by a graph input (through casts);
    /// the largest, because position embeddings are indexed by a graph input too.
    /// </summary>
    static long? TokenEmbeddingRows(GraphEditor g, HashSet<string> inputs)
    {
        long? rows = null;
        foreach (var n in g.Nodes.Where(n => n.OpType == "Gather" && n.Input.Count == 2))
        {
            if (g.Initializer(n.Input[0]) is not { Dims.Count: 2 } table) continue;
            var idx = n.Input[1];
            while (g.Producer(idx) is { OpType: "Cast" or "Identity" or "Unsqueeze" or "Reshape" } p) idx = p.Input[0];
            if (inputs.Contains(idx) && table.Dims[0] > (rows ?? 0)) rows = table.Dims[0];
        }
        return rows;
    }

    /// <summary>Whether a value reaches a graph output through shape ops and bias adds only (Add of an initializer, Reshape, Cast, …).</summary>
    static bool ReachesGraphOutput(GraphEditor g, string value)
    {
        var seen = new HashSet<string>();
        var todo = new Stack<string>([value]);
        while (todo.Count > 0)
        {
            var v = todo.Pop();
            if (!seen.Add(v)) continue;
            if (g.IsGraphOutput(v)) return true;
            foreach (var c in g.Consumers(v))
                if (c.OpType is "Reshape" or "Identity" or "Cast" or "Squeeze" or "Unsqueeze" or "Flatten"
                    || (c.OpType == "Add" && c.Input.Any(g.IsInitializer))) // a bias, not the residual stream
                    foreach (var o in c.Output) todo.Push(o);
        }
        return false;
    }
}
