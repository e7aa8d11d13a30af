using Onnx;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.GraphRewrite.Autodiff;

/// <summary>One per-op gradient rule: reads the forward node and its output gradients, sets its input gradients.</summary>
public interface IGradientRule
{
    /// <summary>Emits the input gradients the context asks for (<see cref="GradientContext.NeedsInputGrad"/>).</summary>
    void Build(GradientContext g);
}

/// <summary>Options of <see cref="GradientBuilder.Build"/>.</summary>
public sealed record GradientOptions
{
    /// <summary>
    /// Test-only: write FusedMatMul as Transpose + MatMul, because ORT's CPU FusedMatMul has no float64 kernel and
    /// rules are checked against finite differences in float64. Never set it for training models: it transposes weights.
    /// </summary>
    public bool PlainMatMul { get; init; }
    /// <summary>Prefix of every value and node the backward pass adds.</summary>
    public string Prefix { get; init; } = "grad/";
    /// <summary>Replace float tanh-GELU written out in basic ops by com.microsoft FastGelu first (<see cref="Rules.GeluFusion"/>).</summary>
    public bool FuseGelu { get; init; } = true;
}

/// <summary>
/// The backward driver: visits the forward nodes in reverse topological order, only those on a path from a seeded
/// value (the loss, or the logits with a fused loss gradient) back to a tensor that requires grad, sums fan-out,
/// and asks each node's rule for the input gradients. Frozen weights never get a gradient: nothing needs it.
/// </summary>
public static class GradientBuilder
{
    /// <summary>
    /// Adds the backward graph to <paramref name="model"/> (in place) and returns the gradient value of each
    /// tensor in <paramref name="wrt"/>.
    /// </summary>
    /// <param name="seeds">value → the name of its gradient, already in the graph (e.g. loss → a constant 1).</param>
    /// <param name="wrt">the tensors that require grad (graph inputs or initializers).</param>
    public static IReadOnlyDictionary<string, string> Build(ModelProto model, IReadOnlyDictionary<string, string> seeds,
                                                            IReadOnlyCollection<string> wrt, GradientOptions? options = null)
    {
        options ??= new GradientOptions();
        var graph = new GraphEditor(model);
        var inference = ShapeInference.Run(model);
        if (options.FuseGelu && Rules.GeluFusion.Run(graph, v => inference.ShapeOf(v)?.ElemType ?? graph.ElemTypeOf(v)) > 0) inference = ShapeInference.Run(model);
        var emit = new GradientEmitter(graph, inference, options.PlainMatMul, options.Prefix);
        var order = graph.TopologicalOrder();

        // values that depend on a trainable tensor (forward), and nodes from which a seed is reachable (backward)
        var dependsOnWrt = new HashSet<string>(wrt);
        foreach (var n in order)
            if (n.Input.Any(dependsOnWrt.Contains)) foreach (var o in n.Output) if (o.Length > 0) dependsOnWrt.Add(o);
        var reachesSeed = new HashSet<string>(seeds.Keys);
        foreach (var n in Enumerable.Reverse(order))
            if (n.Output.Any(reachesSeed.Contains)) foreach (var i in n.Input) if (i.Length > 0) reachesSeed.Add(i);

        var pending = new Dictionary<string, List<string>>();
        foreach (var (value, grad) in seeds) Contribute(pending, emit, value, grad);

        foreach (var node in Enumerable.Reverse(order))
        {
            if (!node.Output.Any(reachesSeed.Contains) || !node.Input.Any(dependsOnWrt.Contains)) continue;
            var outGrads = node.Output.Select(o => o.Length > 0 ? Take(pending, emit, o) : null).ToArray();
            if (outGrads.All(x => x is null)) continue;
            var needs = node.Input.Select(i => i.Length > 0 && dependsOnWrt.Contains(i) && Tensors.IsFloatType(emit.ElemTypeOf(i))).ToArray();
            if (!needs.Any(x => x)) continue;
            var rule = GradientRegistry.Find(node) ?? throw new GradientException(
                $"no gradient rule for {node.Describe()} (op '{node.OpType}'), which lies on the path {Path(graph, node, seeds.Keys, wrt, dependsOnWrt, reachesSeed)}. " +
                "Add a rule to GradientRegistry, or freeze what lies behind this node");
            var ctx = new GradientContext(emit, node, outGrads, needs);
            try { rule.Build(ctx); }
            catch (GradientException) { throw; }
            catch (Exception e) { throw new GradientException($"gradient rule for {node.Describe()} failed: {e.Message}"); }
            for (int i = 0; i < node.Input.Count; i++)
                if (ctx.InputGrads[i] is { } gi && needs[i]) Contribute(pending, emit, node.Input[i], gi);
        }

        var result = new Dictionary<string, string>();
        foreach (var p in wrt)
            result[p] = Take(pending, emit, p) ?? throw new GradientException(
                $"'{p}' requires grad but the loss does not depend on it (no path from the loss reaches it); freeze it or check the graph");
        return result;
    }

    static void Contribute(Dictionary<string, List<string>> pending, GradientEmitter emit, string value, string grad)
    {
        if (!pending.TryGetValue(value, out var list)) pending[value] = list = new List<string>();
        list.Add(grad);
    }

    // the summed gradient of a value: fan-out is added here, once, when the value's producer is visited
    static string? Take(Dictionary<string, List<string>> pending, GradientEmitter emit, string value)
    {
        if (!pending.Remove(value, out var list) || list.Count == 0) return null;
        var grad = list.Count == 1 ? list[0] : emit.Op("Sum", list.ToArray());
        emit.Declare(grad, emit.ShapeOf(value));
        if (emit.RankOf(value) is int r) emit.DeclareRank(grad, r);
        return grad;
    }

    // "loss ← node ← … ← param" for errors: walk consumers toward a seed and producers toward a trainable tensor
    static string Path(GraphEditor g, NodeProto node, IEnumerable<string> seeds, IReadOnlyCollection<string> wrt,
                       HashSet<string> dependsOnWrt, HashSet<string> reachesSeed)
    {
        var seedSet = seeds.ToHashSet();
        var down = new List<string>();
        var n = node;
        for (int guard = 0; guard < 10000; guard++)
        {
            var o = n.Output.FirstOrDefault(x => seedSet.Contains(x)) ?? n.Output.First(reachesSeed.Contains);
            if (seedSet.Contains(o)) { down.Add(o); break; }
            var next = g.Consumers(o).FirstOrDefault(c => c.Output.Any(reachesSeed.Contains));
            if (next is null) { down.Add(o); break; }
            down.Add(next.Name.Length > 0 ? next.Name : next.OpType);
            n = next;
        }
        var up = new List<string>();
        n = node;
        for (int guard = 0; guard < 10000; guard++)
        {
            var i = n.Input.First(x => x.Length > 0 && dependsOnWrt.Contains(x));
            if (wrt.Contains(i)) { up.Add(i); break; }
            var prev = g.Producer(i);
            if (prev is null) { up.Add(i); break; }
            up.Add(prev.Name.Length > 0 ? prev.Name : prev.OpType);
            n = prev;
        }
        down.Reverse();
        return string.Join(" ← ", down.Append($"[{node.Describe()}]").Concat(up));
    }
}
