using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Models;

/// <summary>One tensor of a safetensors file: its dtype as the format spells it ("F32", "F16", "BF16", "I64", …), shape and bytes.</summary>
public sealed record SafeTensor(string DType, long[] Shape, byte[] Data)
{
    public long ElementCount => Tensors.ElementCount(Shape) ?? throw new InvalidDataException($"shape [{string.Join(",", Shape)}] is negative or overflows int64");

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

    /// <summary>
    /// Reads every tensor and the metadata. The whole header is checked before any tensor is read: it is a JSON object;
    /// each entry has a known dtype, a shape of non-negative dims whose byte count (checked arithmetic) equals its
    /// data_offsets span, offsets inside the data section and not overlapping another tensor; no key appears twice.
    /// So no allocation is larger than the file. Errors are <see cref="InvalidDataException"/> naming the file and the key.
    /// </summary>
    public static (Dictionary<string, SafeTensor> Tensors, Dictionary<string, string> Metadata) Read(string path)
    {
        if (!File.Exists(path) && !Directory.Exists(path)) throw new FileNotFoundException($"{path}: no such file", path);
        using var s = SafeFile.OpenRegular(path, why => new InvalidDataException($"{path}: {why}"));
        Span<byte> lengthBytes = stackalloc byte[8];
        if (s.Length < 8) throw new InvalidDataException($"{path}: {s.Length} bytes is too short for a safetensors file (8-byte header length first)");
        s.ReadExactly(lengthBytes);
        long headerLength = BitConverter.ToInt64(lengthBytes);
        if (headerLength <= 0 || headerLength > MaxHeaderBytes || headerLength > s.Length - 8)
            throw new InvalidDataException($"{path}: not a safetensors file (header length {headerLength}, file {s.Length} bytes, at most {MaxHeaderBytes} allowed)");
        var header = new byte[headerLength];
        s.ReadExactly(header);
        long dataStart = 8 + headerLength, dataLength = s.Length - dataStart;
        var entries = ParseHeader(header, path, dataLength, out var metadata);

        var tensors = new Dictionary<string, SafeTensor>(StringComparer.Ordinal);
        foreach (var (name, dtype, shape, begin, end) in entries)
        {
            var data = new byte[end - begin];
            s.Position = dataStart + begin;
            s.ReadExactly(data);
            tensors[name] = new SafeTensor(dtype, shape, data);
        }
        return (tensors, metadata);
    }

    static string Kind(JsonValueKind kind) => kind switch
    {
        JsonValueKind.Object => "an object", JsonValueKind.Array => "an array", JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number", JsonValueKind.Null => "null", _ => "a boolean",
    };

    /// <summary>The safetensors reference implementation's header limit (100 MB).</summary>
    const long MaxHeaderBytes = 100_000_000;

    /// <summary>Checks the header JSON against the data section's length; returns the entries in file order.</summary>
    static List<(string Name, string DType, long[] Shape, long Begin, long End)> ParseHeader(byte[] header, string path, long dataLength, out Dictionary<string, string> metadata)
    {
        InvalidDataException Bad(string what) => new($"{path}: {what}");
        var entries = new List<(string Name, string DType, long[] Shape, long Begin, long End)>();
        metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        // JsonDocument parses invalid UTF-8 inside strings and only fails when a name is read (found by fuzzing)
        if (!System.Text.Unicode.Utf8.IsValid(header)) throw Bad("safetensors header is not valid UTF-8");
        try
        {
            using var doc = JsonDocument.Parse(header, new JsonDocumentOptions { MaxDepth = 8 });
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw Bad($"safetensors header is {Kind(doc.RootElement.ValueKind)}, expected a JSON object of tensors");
            foreach (var property in doc.RootElement.EnumerateObject())
            {
                var name = property.Name;
                if (!seen.Add(name)) throw Bad($"safetensors header has key '{name}' twice");
                var v = property.Value;
                if (name == "__metadata__")
                {
                    if (v.ValueKind != JsonValueKind.Object) throw Bad("'__metadata__' must be an object of strings");
                    foreach (var m in v.EnumerateObject())
                        metadata[m.Name] = m.Value.ValueKind == JsonValueKind.String ? m.Value.GetString()!
                            : throw Bad($"'__metadata__.{m.Name}' is {Kind(m.Value.ValueKind)}, expected a string");
                    continue;
                }
                string Where(string field) => $"tensor '{name}' field '{field}'";
                if (v.ValueKind != JsonValueKind.Object) throw Bad($"tensor '{name}' is {Kind(v.ValueKind)}, expected an object with dtype, shape and data_offsets");
                if (!v.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String) throw Bad($"{Where("dtype")} is missing or not a string");
                var dtype = dt.GetString()!;
                if (!ElementSizes.TryGetValue(dtype, out var size)) throw Bad($"tensor '{name}' has unknown dtype '{dtype}' (known: {string.Join(", ", ElementSizes.Keys)})");
                var shape = Integers(v, "shape", -1);
                var offsets = Integers(v, "data_offsets", 2);
                long expected = Tensors.ByteCount(shape, size)
                    ?? throw Bad($"tensor '{name}' has shape [{string.Join(",", shape)}], whose {dtype} byte count overflows int64");
                long begin = offsets[0], end = offsets[1];
                if (end < begin || end > dataLength || end - begin != expected)
                    throw Bad($"tensor '{name}' ({dtype} [{string.Join(",", shape)}]) has data_offsets [{begin},{end}]; it needs {expected} bytes inside the {dataLength}-byte data section");
                entries.Add((name, dtype, shape, begin, end));

                long[] Integers(JsonElement entry, string field, int length)
                {
                    if (!entry.TryGetProperty(field, out var a) || a.ValueKind != JsonValueKind.Array) throw Bad($"{Where(field)} is missing or not an array");
                    if (length >= 0 && a.GetArrayLength() != length) throw Bad($"{Where(field)} has {a.GetArrayLength()} entries, expected {length}");
                    return a.EnumerateArray().Select(e => e.ValueKind == JsonValueKind.Number && e.TryGetInt64(out var x) && x >= 0 ? x
                        : throw Bad($"{Where(field)} holds {e.GetRawText()}, expected a non-negative integer")).ToArray();
                }
            }
        }
        catch (JsonException e) { throw Bad($"safetensors header is not valid JSON ({e.Message})"); }
        catch (ArgumentException e) { throw Bad($"safetensors header is not valid UTF-8 JSON ({e.Message})"); }
        // tensors may come in any order in the header, but no two may share bytes
        var sorted = entries.Where(e => e.End > e.Begin).OrderBy(e => e.Begin).ToList();
        for (int i = 1; i < sorted.Count; i++)
            if (sorted[i].Begin < sorted[i - 1].End)
                throw Bad($"tensors '{sorted[i - 1].Name}' [{sorted[i - 1].Begin},{sorted[i - 1].End}) and '{sorted[i].Name}' [{sorted[i].Begin},{sorted[i].End}) overlap");
        return entries;
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
