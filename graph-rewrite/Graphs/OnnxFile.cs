using Google.Protobuf;
using Onnx;

namespace OnnxLora.GraphRewrite.Graphs;

/// <summary>Where a saved model keeps its tensor payloads.</summary>
public enum ExternalDataMode
{
    /// <summary>Inline unless the model would pass protobuf's 2 GB limit, then one external file.</summary>
    Auto,
    /// <summary>Always inline (fails for models over 2 GB).</summary>
    Never,
    /// <summary>Always one external data file beside the model.</summary>
    Always,
}

/// <summary>Options for <see cref="OnnxFile.Save"/>.</summary>
public sealed class SaveOptions
{
    public ExternalDataMode ExternalData { get; init; } = ExternalDataMode.Auto;

    /// <summary>File name (relative to the model's folder) for external data; default "&lt;model file&gt;.data".</summary>
    public string? ExternalDataFile { get; init; }

    /// <summary>Tensors smaller than this stay inline when data goes external.</summary>
    public int ExternalThresholdBytes { get; init; } = 1024;
}

/// <summary>Thrown when a file is not a readable ONNX model; the message names the file and the cause.</summary>
public sealed class OnnxFormatException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// Loads and saves ONNX models. Loading resolves external data into memory, so a loaded model is
/// self-contained; saving is atomic (temp file + rename) and never writes over a file that is being read.
/// </summary>
public static class OnnxFile
{
    // protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
    const long InlineLimitBytes = (1L << 31) - 64L * 1024 * 1024;

    /// <summary>
    /// Reads an ONNX model and pulls external tensor data in from the files it names. External data must lie in the
    /// model's folder (relative, no "..", no symlink out, a regular file) and hold exactly the tensor's bytes, as ONNX
    /// Runtime requires; errors name the model, the tensor and the external_data key.
    /// </summary>
    public static ModelProto Load(string path)
    {
        if (!File.Exists(path) && !Directory.Exists(path)) throw new FileNotFoundException($"{path}: no such file", path);
        ModelProto model;
        try
        {
            using var stream = SafeFile.OpenRegular(path, why => new OnnxFormatException($"{path}: {why}"));
            if (stream.Length == 0) throw new OnnxFormatException($"{path}: empty file, not an ONNX model");
            var input = new CodedInputStream(stream);
            model = ModelProto.Parser.ParseFrom(input);
        }
        catch (InvalidProtocolBufferException e)
        {
            throw new OnnxFormatException($"{path}: not a valid ONNX model (truncated or not protobuf: {e.Message})", e);
        }
        if (model.Graph is null || model.IrVersion == 0)
            throw new OnnxFormatException($"{path}: not an ONNX model (no graph or no IR version)");
        var dir = Path.GetDirectoryName(Path.GetFullPath(path))!;
        foreach (var t in AllTensors(model.Graph)) LoadExternal(t, dir, path);
        return model;
    }

    /// <summary>Parses a model from bytes (no external data possible).</summary>
    public static ModelProto Parse(byte[] bytes, string what = "model bytes")
    {
        try { return ModelProto.Parser.ParseFrom(bytes); }
        catch (InvalidProtocolBufferException e) { throw new OnnxFormatException($"{what}: not a valid ONNX model ({e.Message})", e); }
    }

    /// <summary>
    /// Writes <paramref name="model"/> to <paramref name="path"/> atomically. The in-memory model is not changed:
    /// externalised tensors are written from a copy.
    /// </summary>
    public static void Save(ModelProto model, string path, SaveOptions? options = null)
    {
        options ??= new SaveOptions();
        var full = Path.GetFullPath(path);
        var dir = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(dir);
        long payload = AllTensors(model.Graph).Sum(t => (long)t.RawData.Length);
        bool external = options.ExternalData switch
        {
            ExternalDataMode.Always => true,
            ExternalDataMode.Never => false,
            _ => payload >= InlineLimitBytes,
        };
        if (!external)
        {
            if (payload >= InlineLimitBytes)
                throw new InvalidOperationException($"{path}: {payload:N0} bytes of tensors do not fit inline (protobuf's 2 GB limit); save with external data");
            AtomicFile.Write(full, s => model.WriteTo(s));
            return;
        }
        var dataName = options.ExternalDataFile ?? Path.GetFileName(full) + ".data";
        var copy = model.Clone();
        AtomicFile.Write(Path.Combine(dir, dataName), data =>
        {
            foreach (var t in AllTensors(copy.Graph))
            {
                if (t.RawData.Length < options.ExternalThresholdBytes) continue;
                // align to 4 KiB so readers can mmap, as the ONNX spec recommends
                long offset = (data.Position + 4095) / 4096 * 4096;
                while (data.Position < offset) data.WriteByte(0);
                t.RawData.WriteTo(data);
                t.RawData = ByteString.Empty;
                t.DataLocation = TensorProto.Types.DataLocation.External;
                t.ExternalData.Clear();
                t.ExternalData.Add(new StringStringEntryProto { Key = "location", Value = dataName });
                t.ExternalData.Add(new StringStringEntryProto { Key = "offset", Value = offset.ToString() });
                t.ExternalData.Add(new StringStringEntryProto { Key = "length", Value = (data.Position - offset).ToString() });
            }
        });
        AtomicFile.Write(full, s => copy.WriteTo(s));
    }

    /// <summary>Every tensor stored in the graph: initializers, Constant values, and subgraphs' ones.</summary>
    public static IEnumerable<TensorProto> AllTensors(GraphProto graph)
    {
        foreach (var t in graph.Initializer) yield return t;
        foreach (var s in graph.SparseInitializer) { yield return s.Values; yield return s.Indices; }
        foreach (var n in graph.Node)
            foreach (var a in n.Attribute)
            {
                if (a.T is not null) yield return a.T;
                foreach (var t in a.Tensors) yield return t;
                if (a.G is not null) foreach (var t in AllTensors(a.G)) yield return t;
                foreach (var g in a.Graphs) foreach (var t in AllTensors(g)) yield return t;
            }
    }

    static void LoadExternal(TensorProto t, string dir, string modelPath)
    {
        if (t.DataLocation != TensorProto.Types.DataLocation.External) return;
        OnnxFormatException Bad(string what) => new($"{modelPath}: tensor '{t.Name}': external_data {what}");
        string? location = null;
        long offset = 0;
        long? length = null;
        foreach (var e in t.ExternalData)
        {
            switch (e.Key)
            {
                case "location": location = e.Value; break;
                case "offset": offset = Number(e); break;
                case "length": length = Number(e); break;
            }
        }
        if (location is null) throw Bad("names no 'location'");
        var type = (TensorProto.Types.DataType)t.DataType;
        int elementSize;
        try { elementSize = Tensors.ElementSize(type); }
        catch (NotSupportedException) { throw Bad($"holds a {type} tensor, which cannot be stored externally"); }
        long bytes = Tensors.ByteCount(t.Dims, elementSize)
            ?? throw Bad($"is for dims [{string.Join(", ", t.Dims)}], which are negative or whose byte count overflows int64");
        if (length is { } l && l != bytes)
            throw Bad($"'length' is {l}, but dims [{string.Join(", ", t.Dims)}] of {type} are {bytes} bytes");
        if (bytes > Array.MaxLength) throw Bad($"wants {bytes:N0} bytes in one tensor; more than one array can hold");
        var file = SafeFile.ResolveInside(dir, location, why => Bad($"'location' '{location}' {why}"));
        using var s = SafeFile.OpenRegular(file, why => Bad($"'location' '{location}' {why}"));
        if (offset > s.Length || bytes > s.Length - offset)
            throw Bad($"wants bytes {offset}..{offset + bytes} of '{location}', which has {s.Length}");
        var buffer = new byte[bytes];
        s.Position = offset;
        s.ReadExactly(buffer);
        t.RawData = UnsafeByteOperations.UnsafeWrap(buffer);
        t.ExternalData.Clear();
        t.ClearDataLocation();

        long Number(StringStringEntryProto e) =>
            long.TryParse(e.Value, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var v) ? v
            : throw Bad($"'{e.Key}' is '{e.Value}', not a non-negative integer");
    }
}

/// <summary>Writes a file through a temp file in the same folder and a rename, so readers never see half a file.</summary>
public static class AtomicFile
{
    public static void Write(string path, Action<Stream> write)
    {
        var full = Path.GetFullPath(path);
        Directory.CreateDirectory(Path.GetDirectoryName(full)!);
        RemoveStaleTemps(full);
        var tmp = full + $".tmp-{Environment.ProcessId}-{Guid.NewGuid():N}";
        try
        {
            using (var s = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                write(s);
                s.Flush(flushToDisk: true);
            }
            File.Move(tmp, full, overwrite: true);
        }
        catch (IOException e)
        {
            try { File.Delete(tmp); } catch (IOException) { }
            throw new IOException($"{full}: could not be written ({e.Message.Replace(tmp, "its temp file")}); {(File.Exists(full) ? "the previous file is unchanged" : "nothing was written")}", e);
        }
        catch
        {
            try { File.Delete(tmp); } catch (IOException) { }
            throw;
        }
    }

    /// <summary>
    /// Temps of <paramref name="full"/> that a killed process left: exactly NAME.tmp-PID-GUID (32 hex digits), PID no
    /// longer running. Anything else is not ours and stays.
    /// </summary>
    static void RemoveStaleTemps(string full)
    {
        var name = Path.GetFileName(full) + ".tmp-";
        foreach (var temp in Directory.EnumerateFiles(Path.GetDirectoryName(full)!, name + "*"))
        {
            var parts = Path.GetFileName(temp)[name.Length..].Split('-');
            if (parts is not [var pid, var guid] || guid.Length != 32 || !guid.All(char.IsAsciiHexDigitLower)
                || !int.TryParse(pid, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int id) || IsRunning(id)) continue;
            try { File.Delete(temp); } catch (IOException) { }
        }
    }

    static bool IsRunning(int pid)
    {
        try { using var p = System.Diagnostics.Process.GetProcessById(pid); return !p.HasExited; }
        catch (ArgumentException) { return false; }
        catch (InvalidOperationException) { return false; }
    }

    public static void WriteAllText(string path, string text) =>
        Write(path, s => { using var w = new StreamWriter(s, leaveOpen: true); w.Write(text); });

    public static void WriteAllBytes(string path, ReadOnlySpan<byte> bytes)
    {
        var copy = bytes.ToArray();
        Write(path, s => s.Write(copy));
    }
}
