using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Onnx;

namespace OnnxLora.Models;

/// <summary>One tensor of a safetensors file: its dtype as the format spells it ("F32", "F16", "BF16", "I64", …), shape and bytes.</summary>
public sealed record SafeTensor(string DType, long[] Shape, byte[] Data)
{
    public long ElementCount => Shape.Aggregate(1L, (a, b) => a * b);

    /// <summary>The values as float32 (from F32, F16, BF16 or F64).</summary>
    public float[] ToFloats() => DType switch
    {
        "F32" => MemoryMarshal.Cast<byte, float>(Data).ToArray(),
        "F16" => Array.ConvertAll(MemoryMarshal.Cast<byte, Half>(Data).ToArray(), h => (float)h),
        "BF16" => Array.ConvertAll(MemoryMarshal.Cast<byte, ushort>(Data).ToArray(), Tensors.FromBFloat16),
        "F64" => Array.ConvertAll(MemoryMarshal.Cast<byte, double>(Data).ToArray(), d => (float)d),
        _ => throw new NotSupportedException($"safetensors dtype {DType} is not a float type"),
    };

    public static SafeTensor FromFloats(long[] shape, float[] values) => new("F32", shape, MemoryMarshal.AsBytes(values.AsSpan()).ToArray());
}

/// <summary>
/// The safetensors format: 8-byte little-endian header length N, N bytes of JSON
/// (<c>{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {…}}</c>), then the data.
/// </summary>
public static class SafeTensorsFile
{
    static readonly Dictionary<string, int> ElementSizes = new()
    {
        ["F64"] = 8, ["F32"] = 4, ["F16"] = 2, ["BF16"] = 2, ["I64"] = 8, ["I32"] = 4, ["I16"] = 2, ["I8"] = 1,
        ["U8"] = 1, ["BOOL"] = 1, ["U16"] = 2, ["U32"] = 4, ["U64"] = 8, ["F8_E4M3"] = 1, ["F8_E5M2"] = 1,
    };

    /// <summary>Reads every tensor and the metadata; checks the header, dtypes, shapes and offsets first.</summary>
    public static (Dictionary<string, SafeTensor> Tensors, Dictionary<string, string> Metadata) Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file", path);
        using var s = File.OpenRead(path);
        Span<byte> lengthBytes = stackalloc byte[8];
        if (s.Read(lengthBytes) != 8) throw new InvalidDataException($"{path}: too short for a safetensors file");
        long headerLength = BitConverter.ToInt64(lengthBytes);
        if (headerLength <= 0 || headerLength > 100_000_000 || 8 + headerLength > s.Length)
            throw new InvalidDataException($"{path}: not a safetensors file (header length {headerLength}, file {s.Length} bytes)");
        var header = new byte[headerLength];
        s.ReadExactly(header);
        JsonObject json;
        try { json = JsonNode.Parse(header)?.AsObject() ?? throw new InvalidDataException("empty header"); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: safetensors header is not valid JSON ({e.Message})", e); }

        long dataStart = 8 + headerLength, dataLength = s.Length - dataStart;
        var tensors = new Dictionary<string, SafeTensor>(StringComparer.Ordinal);
        var metadata = new Dictionary<string, string>();
        foreach (var (name, node) in json)
        {
            if (name == "__metadata__")
            {
                foreach (var (k, v) in node!.AsObject()) metadata[k] = v?.GetValue<string>() ?? "";
                continue;
            }
            var entry = node!.AsObject();
            var dtype = entry["dtype"]?.GetValue<string>() ?? throw new InvalidDataException($"{path}: tensor '{name}' has no dtype");
            if (!ElementSizes.TryGetValue(dtype, out var size)) throw new InvalidDataException($"{path}: tensor '{name}' has unknown dtype '{dtype}'");
            var shape = entry["shape"]!.AsArray().Select(d => d!.GetValue<long>()).ToArray();
            var offsets = entry["data_offsets"]!.AsArray().Select(d => d!.GetValue<long>()).ToArray();
            long expected = shape.Aggregate(1L, (a, b) => a * b) * size;
            if (offsets.Length != 2 || offsets[0] < 0 || offsets[1] < offsets[0] || offsets[1] > dataLength || offsets[1] - offsets[0] != expected)
                throw new InvalidDataException($"{path}: tensor '{name}' ({dtype} [{string.Join(",", shape)}]) has bad data_offsets [{string.Join(",", offsets)}] (needs {expected} bytes of {dataLength})");
            var data = new byte[expected];
            s.Position = dataStart + offsets[0];
            s.ReadExactly(data);
            tensors[name] = new SafeTensor(dtype, shape, data);
        }
        return (tensors, metadata);
    }

    /// <summary>Writes tensors (in the given order) and metadata atomically.</summary>
    public static void Write(string path, IEnumerable<KeyValuePair<string, SafeTensor>> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.ToList();
        var header = new JsonObject();
        if (metadata is { Count: > 0 }) header["__metadata__"] = new JsonObject(metadata.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(kv.Value))));
        long offset = 0;
        foreach (var (name, t) in list)
        {
            if (!ElementSizes.TryGetValue(t.DType, out var size)) throw new ArgumentException($"tensor '{name}': unknown dtype '{t.DType}'");
            if (t.Data.Length != t.ElementCount * size) throw new ArgumentException($"tensor '{name}': {t.Data.Length} bytes for {t.DType} [{string.Join(",", t.Shape)}]");
            header[name] = new JsonObject
            {
                ["dtype"] = t.DType,
                ["shape"] = new JsonArray(t.Shape.Select(d => (JsonNode?)JsonValue.Create(d)).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + t.Data.Length),
            };
            offset += t.Data.Length;
        }
        var headerBytes = Encoding.UTF8.GetBytes(header.ToJsonString());
        // the spec pads the header with spaces so the data starts 8-byte aligned
        int padded = (headerBytes.Length + 7) / 8 * 8;
        AtomicFile.Write(path, s =>
        {
            s.Write(BitConverter.GetBytes((long)padded));
            s.Write(headerBytes);
            for (int i = headerBytes.Length; i < padded; i++) s.WriteByte((byte)' ');
            foreach (var (_, t) in list) s.Write(t.Data);
        });
    }
}
