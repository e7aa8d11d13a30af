using Google.Protobuf;
using Onnx;
using AttrType = Onnx.AttributeProto.Types.AttributeType;

namespace OnnxLora.GraphRewrite.Graphs;

/// <summary>Makes node attributes.</summary>
public static class Attr
{
    public static AttributeProto Int(string name, long value) => new() { Name = name, Type = AttrType.Int, I = value };
    public static AttributeProto Float(string name, float value) => new() { Name = name, Type = AttrType.Float, F = value };
    public static AttributeProto Str(string name, string value) => new() { Name = name, Type = AttrType.String, S = ByteString.CopyFromUtf8(value) };
    public static AttributeProto Tensor(string name, TensorProto value) => new() { Name = name, Type = AttrType.Tensor, T = value };
    public static AttributeProto Ints(string name, params long[] values)
    {
        var a = new AttributeProto { Name = name, Type = AttrType.Ints };
        a.Ints.AddRange(values);
        return a;
    }
    public static AttributeProto Floats(string name, params float[] values)
    {
        var a = new AttributeProto { Name = name, Type = AttrType.Floats };
        a.Floats.AddRange(values);
        return a;
    }
}

/// <summary>Reads node attributes with defaults, as the operator specs define them.</summary>
public static class NodeAttributes
{
    public static AttributeProto? Attribute(this NodeProto node, string name) => node.Attribute.FirstOrDefault(a => a.Name == name);
    public static bool HasAttribute(this NodeProto node, string name) => node.Attribute.Any(a => a.Name == name);
    public static long GetInt(this NodeProto node, string name, long fallback) => node.Attribute(name)?.I ?? fallback;
    public static float GetFloat(this NodeProto node, string name, float fallback) => node.Attribute(name)?.F ?? fallback;
    public static string GetString(this NodeProto node, string name, string fallback) => node.Attribute(name)?.S.ToStringUtf8() ?? fallback;
    public static long[]? GetInts(this NodeProto node, string name) => node.Attribute(name)?.Ints.ToArray();
    public static TensorProto? GetTensor(this NodeProto node, string name) => node.Attribute(name)?.T;

    /// <summary>The node's i-th input, or null where it is absent or the empty "optional input" name.</summary>
    public static string? InputOrNull(this NodeProto node, int i) => i < node.Input.Count && node.Input[i].Length > 0 ? node.Input[i] : null;

    /// <summary>The key op tables use: "Op" for the ONNX domain ("" or "ai.onnx"), else "domain.Op".</summary>
    public static string OpKey(string domain, string opType) => domain is "" or "ai.onnx" ? opType : domain + "." + opType;

    /// <summary>"op 'name'" for error messages.</summary>
    public static string Describe(this NodeProto node) =>
        $"{OpKey(node.Domain, node.OpType)} node '{(node.Name.Length > 0 ? node.Name : string.Join(",", node.Output))}'";
}
