using System.Runtime.InteropServices;
using OnnxLora.GraphRewrite.Graphs;
using Onnx;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Pipeline.Adapters;

/// <summary>
/// One parameter as a deployable model takes it: the graph input's name, dims, ONNX element type
/// (TensorProto numbering) and little-endian row-major bytes. This is what an <c>.onnx_adapter</c> holds.
/// </summary>
public sealed record AdapterParameter(string Name, long[] Dims, DataType DataType, ReadOnlyMemory<byte> RawData)
{
    public long ElementCount => Tensors.ElementCount(Dims) ?? throw new InvalidDataException($"adapter parameter {Describe()}: dims are negative or overflow int64");

    public string Describe() => $"'{Name}' ({DataType} [{string.Join(", ", Dims)}])";

    /// <summary>Values as float32 (from float, float16 or bfloat16).</summary>
    public float[] ToFloats() => DataType switch
    {
        DataType.Float => MemoryMarshal.Cast<byte, float>(RawData.Span).ToArray(),
        DataType.Float16 => Array.ConvertAll(MemoryMarshal.Cast<byte, Half>(RawData.Span).ToArray(), h => (float)h),
        DataType.Bfloat16 => Array.ConvertAll(MemoryMarshal.Cast<byte, ushort>(RawData.Span).ToArray(), Tensors.FromBFloat16),
        _ => throw new NotSupportedException($"adapter parameter {Describe()}: only float, float16 and bfloat16 parameters are supported"),
    };

    /// <summary>Encodes float32 values as <paramref name="type"/> (float, float16 or bfloat16).</summary>
    public static AdapterParameter FromFloats(string name, long[] dims, ReadOnlySpan<float> values, DataType type = DataType.Float) => type switch
    {
        DataType.Float => new(name, dims, type, MemoryMarshal.AsBytes(values).ToArray()),
        DataType.Float16 => new(name, dims, type, MemoryMarshal.AsBytes<Half>(ToHalf(values)).ToArray()),
        DataType.Bfloat16 => new(name, dims, type, MemoryMarshal.AsBytes<ushort>(ToBf16(values)).ToArray()),
        _ => throw new NotSupportedException($"adapter parameter '{name}': element type {type} is not one of float, float16, bfloat16"),
    };

    static Half[] ToHalf(ReadOnlySpan<float> v) { var h = new Half[v.Length]; for (int i = 0; i < v.Length; i++) h[i] = (Half)v[i]; return h; }
    static ushort[] ToBf16(ReadOnlySpan<float> v) { var h = new ushort[v.Length]; for (int i = 0; i < v.Length; i++) h[i] = Tensors.ToBFloat16(v[i]); return h; }
}

/// <summary>What a deployable model declares for one overridable input: element type and dims (null = symbolic).</summary>
public sealed record ParameterSlot(string Name, DataType DataType, long?[] Dims)
{
    public string Describe() => $"'{Name}' ({DataType} [{string.Join(", ", Dims.Select(d => d?.ToString() ?? "?"))}])";

    /// <summary>
    /// The graph inputs of a deployable model that an adapter may feed: inputs with a same-named initializer (the
    /// zero-rank defaults of LoRA factors, or a head). The initializer's zero dims (the rank) and symbolic dims match any size.
    /// </summary>
    public static IReadOnlyDictionary<string, ParameterSlot> FromModel(ModelProto model)
    {
        var initializers = model.Graph.Initializer.ToDictionary(t => t.Name);
        var slots = new Dictionary<string, ParameterSlot>(StringComparer.Ordinal);
        foreach (var input in model.Graph.Input)
        {
            if (!initializers.TryGetValue(input.Name, out var init)) continue;
            var declared = ValueInfos.Dims(input);
            var dims = declared is not null && declared.Length == init.Dims.Count
                ? declared.Select(d => d.Value is > 0 ? d.Value : null).ToArray()
                : init.Dims.Select(d => d > 0 ? (long?)d : null).ToArray();
            // a dim the default initializer has as 0 is the rank: any size is fine
            for (int i = 0; i < dims.Length; i++) if (init.Dims[i] == 0) dims[i] = null;
            slots[input.Name] = new ParameterSlot(input.Name, (DataType)init.DataType, dims);
        }
        return slots;
    }
}

/// <summary>Checks adapter parameters against the slots of a deployable model, with errors that name both sides.</summary>
public static class AdapterValidation
{
    /// <summary>
    /// Throws <see cref="InvalidDataException"/> unless every parameter names a slot of the model with the same
    /// element type, rank and known dims.
    /// </summary>
    /// <param name="source">the adapter (file) in messages</param>
    /// <param name="model">the model in messages</param>
    public static void Validate(IEnumerable<AdapterParameter> parameters, IReadOnlyDictionary<string, ParameterSlot> slots, string source, string model)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var unknown = new List<string>();
        foreach (var p in parameters)
        {
            if (!seen.Add(p.Name)) throw new InvalidDataException($"{source}: parameter '{p.Name}' appears twice");
            if (!slots.TryGetValue(p.Name, out var slot)) { unknown.Add(p.Name); continue; }
            if (slot.DataType != p.DataType)
                throw new InvalidDataException($"{source}: parameter {p.Describe()} has element type {p.DataType}, {model} takes {slot.Describe()}; " +
                    $"export the adapter as {slot.DataType}");
            bool shapeOk = slot.Dims.Length == p.Dims.Length && slot.Dims.Zip(p.Dims).All(x => x.First is null || x.First == x.Second);
            if (!shapeOk)
                throw new InvalidDataException($"{source}: parameter {p.Describe()} does not fit {model}'s input {slot.Describe()}; " +
                    "was the adapter made for another model or rewrite?");
            if (p.RawData.Length != p.ElementCount * Tensors.ElementSize(p.DataType))
                throw new InvalidDataException($"{source}: parameter {p.Describe()} has {p.RawData.Length} bytes of data, needs {p.ElementCount * Tensors.ElementSize(p.DataType)}");
        }
        if (unknown.Contains(GraphRewrite.Artifacts.ClassHead.Weight))
            throw new InvalidDataException($"{source}: the adapter is a classifier (it carries '{GraphRewrite.Artifacts.ClassHead.Weight}'), {model} has no classification head; " +
                "serve it with the classifier deploy.onnx its training run wrote (--model RUN_DIR), or a merged export");
        if (unknown.Count > 0)
            throw new InvalidDataException($"{source}: {unknown.Count} parameter(s) are not LoRA inputs of {model}: {LoraAdapter.Preview(unknown)}" +
                $" (the model takes {slots.Count}{(slots.Count > 0 ? ", e.g. '" + slots.Keys.First() + "'" : "")}); was the adapter made for another model or rewrite?");
    }
}
