using System.Text;
using Google.FlatBuffers;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Pipeline.Adapters;

/// <summary>The header and parameters of an <c>.onnx_adapter</c> file.</summary>
public sealed record OnnxAdapterContents(int FormatVersion, int AdapterVersion, int ModelVersion, IReadOnlyList<AdapterParameter> Parameters);

/// <summary>Options for <see cref="OnnxAdapterFile.Write"/>.</summary>
public sealed class OnnxAdapterWriteOptions
{
    /// <summary>
    /// Element type of the written parameters: Float (default), or Float16/Bfloat16 on request, which needs
    /// <see cref="DeployableModel"/> so that each parameter's type is checked against the model's input.
    /// </summary>
    public DataType ElementType { get; init; } = DataType.Float;

    /// <summary>When set, every parameter's name, type and shape is checked against this deployable model before writing.</summary>
    public Onnx.ModelProto? DeployableModel { get; init; }

    public int AdapterVersion { get; init; }
    public int ModelVersion { get; init; }
}

/// <summary>
/// ONNX Runtime's LoRA adapter format (<c>onnxruntime/lora/adapter_format/adapter_schema.fbs</c>): a FlatBuffer with file
/// identifier "TORT" whose root is <c>Adapter { format_version:int, adapter_version:int, model_version:int,
/// parameters:[Parameter] }</c>, <c>Parameter { name:string, dims:[int64], data_type:int32, raw_data:[uint8] (8-aligned) }</c>.
/// ORT feeds each parameter to the graph input of the same name; OnnxLora writes A [in, r] as trained and
/// <c>scale · B</c> [r, out] (the scale folded in, as Olive does) so that the deployable model needs no scale input.
/// </summary>
public static class OnnxAdapterFile
{
    public const string FileIdentifier = "TORT";
    public const int FormatVersion = 1;
    public const string Extension = ".onnx_adapter";

    // field slots in schema order
    const int AdapterFormatVersion = 0, AdapterAdapterVersion = 1, AdapterModelVersion = 2, AdapterParameters = 3;
    const int ParamName = 0, ParamDims = 1, ParamDataType = 2, ParamRawData = 3;

    /// <summary>
    /// The parameters a deployable model takes for <paramref name="adapter"/>: A as is, <c>scale · B</c>, and the extras,
    /// in <paramref name="elementType"/>.
    /// </summary>
    public static IReadOnlyList<AdapterParameter> DeployableParameters(LoraAdapter adapter, DataType elementType = DataType.Float)
    {
        var list = new List<AdapterParameter>();
        foreach (var t in adapter.Manifest.Targets)
        {
            var a = adapter.A(t);
            var b = adapter.B(t).Scaled(t.Scale);
            list.Add(AdapterParameter.FromFloats(t.LoraA, a.Shape, a.Data, elementType));
            list.Add(AdapterParameter.FromFloats(t.LoraB, b.Shape, b.Data, elementType));
        }
        foreach (var (name, x) in adapter.Extras) list.Add(AdapterParameter.FromFloats(name, x.Shape, x.Data, elementType));
        return list;
    }

    /// <summary>Writes <paramref name="adapter"/> to <paramref name="path"/> atomically (A as is, scale·B, extras).</summary>
    public static void Write(string path, LoraAdapter adapter, OnnxAdapterWriteOptions? options = null)
    {
        options ??= new OnnxAdapterWriteOptions();
        if (options.ElementType is not (DataType.Float or DataType.Float16 or DataType.Bfloat16))
            throw new ArgumentException($"{path}: element type {options.ElementType} is not one of Float, Float16, Bfloat16", nameof(options));
        if (options.ElementType != DataType.Float && options.DeployableModel is null)
            throw new ArgumentException($"{path}: writing {options.ElementType} parameters needs the deployable model, to check that its LoRA inputs are {options.ElementType}", nameof(options));
        var parameters = DeployableParameters(adapter, options.ElementType);
        if (options.DeployableModel is { } model)
            AdapterValidation.Validate(parameters, ParameterSlot.FromModel(model), path, "the deployable model");
        var bytes = Serialize(parameters, options.AdapterVersion, options.ModelVersion);
        AtomicFile.WriteAllBytes(path, bytes);
    }

    /// <summary>The FlatBuffer bytes of an adapter file holding <paramref name="parameters"/>.</summary>
    public static byte[] Serialize(IReadOnlyList<AdapterParameter> parameters, int adapterVersion = 0, int modelVersion = 0)
    {
        long payload = parameters.Sum(p => (long)p.RawData.Length + p.Dims.Length * 8 + p.Name.Length * 4 + 64);
        if (payload > int.MaxValue - 1024) throw new NotSupportedException($"adapter of {payload} bytes: the FlatBuffer format is limited to 2 GB");
        var b = new FlatBufferBuilder((int)Math.Max(1024, payload + 1024));
        var offsets = new Offset<byte>[parameters.Count];    // tables are built children first
        for (int i = 0; i < parameters.Count; i++)
        {
            var p = parameters[i];
            var name = b.CreateString(p.Name);
            b.StartVector(sizeof(long), p.Dims.Length, sizeof(long));
            for (int d = p.Dims.Length - 1; d >= 0; d--) b.AddLong(p.Dims[d]);
            var dims = b.EndVector();
            // raw_data is force_align: 8 in the schema, so ORT can map the bytes as float/half directly
            b.StartVector(1, p.RawData.Length, 8);
            var raw = p.RawData.Span;
            for (int k = raw.Length - 1; k >= 0; k--) b.PutByte(raw[k]);
            var rawData = b.EndVector();

            b.StartTable(4);
            b.AddOffset(ParamName, name.Value, 0);
            b.AddOffset(ParamDims, dims.Value, 0);
            b.AddInt(ParamDataType, (int)p.DataType, 0);
            b.AddOffset(ParamRawData, rawData.Value, 0);
            offsets[i] = new Offset<byte>(b.EndTable());
        }
        b.StartVector(sizeof(int), offsets.Length, sizeof(int));
        for (int i = offsets.Length - 1; i >= 0; i--) b.AddOffset(offsets[i].Value);
        var list = b.EndVector();

        b.StartTable(4);
        b.AddInt(AdapterFormatVersion, FormatVersion, 0);
        b.AddInt(AdapterAdapterVersion, adapterVersion, 0);
        b.AddInt(AdapterModelVersion, modelVersion, 0);
        b.AddOffset(AdapterParameters, list.Value, 0);
        int root = b.EndTable();
        b.Finish(root, FileIdentifier);
        return b.SizedByteArray();
    }

    /// <summary>Reads and checks an adapter file: identifier, then format version, then every parameter's bounds.</summary>
    public static OnnxAdapterContents Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such adapter file", path);
        return Parse(File.ReadAllBytes(path), path);
    }

    /// <summary>Parses adapter bytes; <paramref name="source"/> names them in errors. The parameters' data aliases <paramref name="bytes"/>.</summary>
    public static OnnxAdapterContents Parse(byte[] bytes, string source = "adapter bytes")
    {
        var r = new Reader(bytes, source);
        if (bytes.Length < 8) throw r.Bad($"{bytes.Length} bytes is too short for an ONNX Runtime adapter");
        var id = Encoding.ASCII.GetString(bytes, 4, 4);
        if (id != FileIdentifier)
            throw r.Bad($"file identifier is '{Printable(id)}', not '{FileIdentifier}': not an ONNX Runtime adapter ({Extension})");
        int root = r.Offset(0);
        int formatVersion = r.IntField(root, AdapterFormatVersion);
        if (formatVersion != FormatVersion)
            throw r.Bad($"format version {formatVersion} is not supported (this reader knows version {FormatVersion})");
        int adapterVersion = r.IntField(root, AdapterAdapterVersion), modelVersion = r.IntField(root, AdapterModelVersion);
        var parameters = new List<AdapterParameter>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        if (r.Field(root, AdapterParameters) is int listField)
        {
            int list = r.Offset(listField);
            int count = r.VectorLength(list, 4);
            for (int i = 0; i < count; i++)
            {
                int table = r.Offset(list + 4 + 4 * i);
                var name = r.Field(table, ParamName) is int nf ? r.String(r.Offset(nf)) : throw r.Bad($"parameter #{i} has no name");
                long[] dims = [];
                if (r.Field(table, ParamDims) is int df)
                {
                    int v = r.Offset(df), n = r.VectorLength(v, 8);
                    dims = new long[n];
                    for (int k = 0; k < n; k++) dims[k] = r.Long(v + 4 + 8 * k);
                }
                var type = (DataType)r.IntField(table, ParamDataType);
                ReadOnlyMemory<byte> data = ReadOnlyMemory<byte>.Empty;
                if (r.Field(table, ParamRawData) is int rf)
                {
                    int v = r.Offset(rf), n = r.VectorLength(v, 1);
                    data = new ReadOnlyMemory<byte>(bytes, v + 4, n);
                }
                if (!names.Add(name)) throw r.Bad($"parameter '{name}' appears twice");
                var p = new AdapterParameter(name, dims, type, data);
                if (type is not (DataType.Float or DataType.Float16 or DataType.Bfloat16))
                    throw r.Bad($"parameter '{name}' has data type {type} ({(int)type}); adapter parameters are float, float16 or bfloat16");
                long need = Tensors.ByteCount(dims, Tensors.ElementSize(type))
                    ?? throw r.Bad($"parameter '{name}' has dims [{string.Join(", ", dims)}], negative or overflowing int64");
                if (data.Length != need)
                    throw r.Bad($"parameter {p.Describe()} has {data.Length} bytes of data, its dims need {need}");
                parameters.Add(p);
            }
        }
        return new OnnxAdapterContents(formatVersion, adapterVersion, modelVersion, parameters);
    }

    /// <summary>
    /// Loads an adapter file as a <see cref="LoraAdapter"/> of <paramref name="manifest"/>: B is divided by the target's
    /// scale (the file holds scale·B); parameters that are not a target's A/B become extras.
    /// </summary>
    public static LoraAdapter Load(string path, LoraManifest manifest)
    {
        var contents = Read(path);
        var byName = contents.Parameters.ToDictionary(p => p.Name, StringComparer.Ordinal);
        var lora = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
        foreach (var t in manifest.Targets)
        {
            if (byName.Remove(t.LoraA, out var a)) lora[t.LoraA] = new AdapterTensor(a.Dims, a.ToFloats());
            if (byName.Remove(t.LoraB, out var b)) lora[t.LoraB] = new AdapterTensor(b.Dims, b.ToFloats()).Scaled(1.0 / t.Scale);
        }
        var extras = byName.Values.ToDictionary(p => p.Name, p => new AdapterTensor(p.Dims, p.ToFloats()), StringComparer.Ordinal);
        var stray = extras.Keys.Where(k => k.StartsWith("lora_", StringComparison.Ordinal) || k.Contains(".lora_", StringComparison.Ordinal)).ToList();
        if (stray.Count > 0)
            throw new InvalidDataException($"{path}: parameter(s) {LoraAdapter.Preview(stray)} look like LoRA factors but are not in the manifest " +
                $"(targets of '{manifest.BaseModel}'); was the adapter made for another rewrite?");
        return LoraAdapter.Create(manifest, lora, extras, path);
    }

    static string Printable(string s) => new(s.Select(c => c is >= ' ' and <= '~' ? c : '?').ToArray());

    /// <summary>Bounds-checked FlatBuffer access: every offset is checked before it is followed.</summary>
    sealed class Reader(byte[] bytes, string source)
    {
        readonly ByteBuffer _bb = new(bytes);

        public InvalidDataException Bad(string what) => new($"{source}: {what}. The file may be truncated or not an adapter; re-export it with 'onnxlora export --format onnx-adapter'");

        void Check(long pos, long size, string what)
        {
            if (pos < 0 || size < 0 || (long)pos + size > bytes.Length) throw Bad($"{what} at byte {pos} runs past the end of the file ({bytes.Length} bytes)");
        }

        public int Int(int pos) { Check(pos, 4, "int"); return _bb.GetInt(pos); }
        public long Long(int pos) { Check(pos, 8, "int64"); return _bb.GetLong(pos); }

        /// <summary>Follows the uoffset stored at <paramref name="pos"/>.</summary>
        public int Offset(int pos)
        {
            long target = (long)pos + (uint)Int(pos);
            if (target >= bytes.Length) throw Bad($"offset at byte {pos} points past the end of the file ({bytes.Length} bytes)");
            return (int)target;
        }

        /// <summary>Position of a table field, or null when absent (default).</summary>
        public int? Field(int table, int slot)
        {
            long vtable = table - (long)Int(table);
            if (vtable < 0 || vtable + 4 > bytes.Length) throw Bad($"table at byte {table} has a bad vtable offset");
            Check(vtable, 4, "vtable");
            int vtableSize = _bb.GetUshort((int)vtable);
            int entry = 4 + 2 * slot;
            if (entry + 2 > vtableSize) return null;
            Check(vtable + entry, 2, "vtable entry");
            int fieldOffset = _bb.GetUshort((int)vtable + entry);
            return fieldOffset == 0 ? null : table + fieldOffset;
        }

        public int IntField(int table, int slot) => Field(table, slot) is int f ? Int(f) : 0;

        public int VectorLength(int vector, int elementSize)
        {
            int n = Int(vector);
            Check(vector + 4L, (long)n * elementSize, $"vector of {n} elements");
            return n;
        }

        public string String(int pos) => Encoding.UTF8.GetString(bytes, pos + 4, VectorLength(pos, 1));
    }
}
