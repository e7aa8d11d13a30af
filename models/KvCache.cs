using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Models;

/// <summary>
/// The with-past form of a decoder, as Optimum exports it: inputs <c>past_key_values.{i}.key|value</c> float
/// [batch, kv_heads, past, head_dim], outputs <c>present.{i}.key|value</c> [batch, kv_heads, past + seq, head_dim]
/// (the past with this call's keys/values appended), <c>attention_mask</c> over past + seq.
/// </summary>
static class KvCache
{
    public static string PastKey(int layer) => $"past_key_values.{layer}.key";
    public static string PastValue(int layer) => $"past_key_values.{layer}.value";
    public static string PresentKey(int layer) => $"present.{layer}.key";
    public static string PresentValue(int layer) => $"present.{layer}.value";

    /// <summary>Declares the past inputs and present outputs of <paramref name="layers"/> layers.</summary>
    public static void Declare(GraphEditor editor, int layers, int kvHeads, int headDim, string batch)
    {
        for (int i = 0; i < layers; i++)
            foreach (var name in new[] { PastKey(i), PastValue(i) })
                editor.AddInput(ValueInfos.Tensor(name, DataType.Float, batch, kvHeads, "past_sequence_length", headDim));
    }

    /// <summary>Declares layer <paramref name="layer"/>'s present outputs (after the graph computes them).</summary>
    public static void DeclarePresent(GraphEditor editor, int layer, int kvHeads, int headDim, string batch)
    {
        foreach (var name in new[] { PresentKey(layer), PresentValue(layer) })
            editor.AddOutput(ValueInfos.Tensor(name, DataType.Float, batch, kvHeads, "total_sequence_length", headDim));
    }

    /// <summary>present = Concat(past, new) on the sequence axis, for keys and values [batch, kv_heads, seq, head_dim].</summary>
    public static (string Key, string Value) Append(TorchStyleGraph g, string scope, int layer, string key, string value) =>
        (g.Node(scope, "Concat", [PastKey(layer), key], PresentKey(layer), Attr.Int("axis", 2)),
         g.Node(scope, "Concat", [PastValue(layer), value], PresentValue(layer), Attr.Int("axis", 2)));

    /// <summary>
    /// transformers' additive 4-D mask [batch, 1, seq, past + seq]: finfo.min where the key comes after the query
    /// (query i sits at past + i) or is padding, else 0. The total length is the mask's width, past = total − seq.
    /// </summary>
    public static string AttentionBias(TorchStyleGraph g, string scope, string inputIds, string attentionMask)
    {
        string I64(params long[] v) => g.Constant(scope, Tensors.Int64Vector("", v));
        string Scalar(long v) => g.Constant(scope, Tensors.Int64("", [], [v]));
        var min = g.Constant(scope, Tensors.Float("", [], [float.MinValue]));
        var seq = g.Node(scope, "Gather", [g.Node(scope, "Shape", [inputIds]), Scalar(1)], Attr.Int("axis", 0));
        var total = g.Node(scope, "Gather", [g.Node(scope, "Shape", [attentionMask]), Scalar(1)], Attr.Int("axis", 0));
        var past = g.Node(scope, "Sub", [total, seq]);
        var rows = g.Node(scope, "Unsqueeze", [g.Node(scope, "Range", [past, total, Scalar(1)]), I64(1)]);   // [s, 1] query positions
        var cols = g.Node(scope, "Unsqueeze", [g.Node(scope, "Range", [Scalar(0), total, Scalar(1)]), I64(0)]);   // [1, t] key positions
        var causal = g.Node(scope, "LessOrEqual", [cols, rows]);                                          // [s, t]
        var mask = g.Node(scope, "Cast", [attentionMask], Attr.Int("to", (int)DataType.Float));
        mask = g.Node(scope, "Unsqueeze", [mask, I64(1, 2)]);                                            // [b, 1, 1, t]
        var padding = g.Node(scope, "Mul", [g.Node(scope, "Sub", [g.Constant(scope, Tensors.Float("", [], [1f])), mask]), min]);
        return g.Node(scope, "Where", [causal, padding, min]);                                           // [b, 1, s, t]
    }
}
