using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Autodiff.Rules;

/// <summary>
/// Finds tanh-GELU written out in basic ops, as torch exports GELU(approximate='tanh') and GPT-2's gelu_new,
/// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) = Mul(Mul(x, 0.5), Add(Tanh(Mul(Add(x, Mul(Pow(x, 3), 0.044715)), √(2/π))), 1)),
/// operands of Mul/Add in either order, and replaces it with one com.microsoft FastGelu node (ORT's CPU kernel).
/// In a training graph the seven intermediates would each be kept for the backward and each cost a pass forward
/// and about two backward; fused, the forward is one pass and <see cref="FastGeluRule"/> recomputes tanh.
/// ORT fuses this pattern itself at inference, but not where the backward reads the intermediates.
/// Only float patterns whose intermediates have no other consumer are fused.
/// </summary>
public static class GeluFusion
{
    const string Domain = "com.microsoft";

    /// <summary>Fuses every match in place; returns how many.</summary>
    public static int Run(GraphEditor g, Func<string, int> elemTypeOf)
    {
        int fused = 0;
        foreach (var tanh in g.Nodes.Where(n => n.OpType == "Tanh" && n.Domain == "").ToList())
        {
            if (Match(g, tanh) is not { } m || elemTypeOf(m.X) != (int)DataType.Float) continue;
            foreach (var n in m.Nodes) g.RemoveNode(n);
            g.AddNode("FastGelu", [m.X], [m.Y], m.Y + "/FastGelu", Domain);
            fused++;
        }
        if (fused > 0) g.EnsureOpset(Domain, 1);
        return fused;
    }

    sealed record Found(string X, string Y, NodeProto[] Nodes);

    static Found? Match(GraphEditor g, NodeProto tanh)
    {
        // upward: Tanh ← Mul(·, √(2/π)) ← Add(x, ·) ← Mul(·, 0.044715) ← Pow(x, 3)
        if (Producer(g, tanh.Input[0], "Mul") is not { } scaled || Split(g, scaled, Math.Sqrt(2 / Math.PI)) is not { } innerSum) return null;
        if (Producer(g, innerSum, "Add") is not { } add || add.Input.Count != 2) return null;
        foreach (var (x, cubic) in new[] { (add.Input[0], add.Input[1]), (add.Input[1], add.Input[0]) })
        {
            if (Producer(g, cubic, "Mul") is not { } cubicMul || Split(g, cubicMul, 0.044715) is not { } cube) continue;
            if (Producer(g, cube, "Pow") is not { } pow || pow.Input[0] != x || Scalar(g, pow.Input[1]) is not 3.0) continue;
            // downward: Tanh → Add(·, 1) → Mul(·, Mul(x, 0.5)) = y
            if (OnlyConsumer(g, tanh.Output[0], "Add") is not { } plusOne || Split(g, plusOne, 1.0) != tanh.Output[0]) return null;
            if (OnlyConsumer(g, plusOne.Output[0], "Mul") is not { } outer) return null;
            var halfValue = outer.Input[0] == plusOne.Output[0] ? outer.Input[1] : outer.Input[0];
            if (Producer(g, halfValue, "Mul") is not { } half || Split(g, half, 0.5) != x) return null;
            NodeProto[] nodes = [pow, cubicMul, add, scaled, tanh, plusOne, half, outer];
            // every intermediate feeds only the next node of the pattern, so removing them changes nothing else
            if (nodes[..^1].Any(n => g.IsGraphOutput(n.Output[0]) || g.Consumers(n.Output[0]).Count != 1)) return null;
            return new Found(x, outer.Output[0], nodes);
        }
        return null;
    }

    static NodeProto? Producer(GraphEditor g, string value, string op) =>
        g.Producer(value) is { } n && n.OpType == op && n.Domain == "" && n.Output.Count == 1 ? n : null;

    static NodeProto? OnlyConsumer(GraphEditor g, string value, string op) =>
        g.Consumers(value) is [var n] && n.OpType == op && n.Domain == "" ? n : null;

    /// <summary>For a binary node with one operand the scalar constant <paramref name="constant"/> (to 1e-5 relative), the other operand.</summary>
    static string? Split(GraphEditor g, NodeProto n, double constant)
    {
        if (n.Input.Count != 2) return null;
        for (int i = 0; i < 2; i++)
            if (Scalar(g, n.Input[i]) is double v && Math.Abs(v - constant) <= 1e-5 * Math.Abs(constant)) return n.Input[1 - i];
        return null;
    }

    /// <summary>The value of a one-element constant (an initializer that is not an input, or a Constant node), else null.</summary>
    static double? Scalar(GraphEditor g, string value)
    {
        var t = g.Initializer(value) is { } init && !g.IsGraphInput(value) ? init
              : g.Producer(value) is { OpType: "Constant" } c ? c.GetTensor("value") : null;
        return t is not null && t.Dims.Aggregate(1L, (a, b) => a * b) == 1 ? Tensors.ToDoubles(t)[0] : null;
    }
}
