using Microsoft.AspNetCore.Http;

namespace OnnxLora.Serving;

/// <summary>
/// The read policy of <c>POST /v1/load_lora_adapter</c>: a client may name only files and folders under one root the
/// operator chose at start (<c>--adapter-root</c>). A relative path is taken from the root; the resolved path must lie
/// inside it; no component below the root, and no entry of a named folder, may be a symbolic link (a link could lead
/// outside). Without a root, loading
/// at run time is off.
/// </summary>
sealed class AdapterRoot
{
    readonly string _root;     // full path, no trailing separator

    public AdapterRoot(string root)
    {
        var full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(root));
        if (!Directory.Exists(full)) throw new DirectoryNotFoundException($"--adapter-root {root}: no such folder");
        // the root itself may be a link the operator chose: compare against where it leads
        _root = Directory.ResolveLinkTarget(full, returnFinalTarget: true)?.FullName ?? full;
    }

    public string FullPath => _root;

    /// <summary>The full path of <paramref name="requested"/> (field <c>lora_path</c>) when the policy allows reading it; else 403/404.</summary>
    public string Resolve(string requested)
    {
        if (requested.Contains('\0', StringComparison.Ordinal)) throw ApiException.BadField("lora_path", "contains a NUL character");
        var full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(Path.IsPathRooted(requested) ? requested : Path.Combine(_root, requested)));
        if (!full.StartsWith(_root + Path.DirectorySeparatorChar, StringComparison.Ordinal))
            throw new ApiException(StatusCodes.Status403Forbidden, $"lora_path: '{requested}' is outside the adapter root the server was started with", "lora_path", "path_not_allowed");
        var current = _root;
        foreach (var part in Path.GetRelativePath(_root, full).Split(Path.DirectorySeparatorChar))
        {
            current = Path.Combine(current, part);
            if (!File.Exists(current) && !Directory.Exists(current))
                throw new ApiException(StatusCodes.Status404NotFound, $"lora_path: '{requested}' does not exist under the adapter root", "lora_path", "adapter_not_found");
            if (File.GetAttributes(current).HasFlag(FileAttributes.ReparsePoint))
                throw new ApiException(StatusCodes.Status403Forbidden, $"lora_path: '{requested}' goes through a symbolic link; links under the adapter root are not followed", "lora_path", "path_not_allowed");
        }
        // a folder (PEFT, run) is read file by file inside: none of its entries may be a link either
        if (Directory.Exists(full))
            foreach (var entry in Directory.EnumerateFileSystemEntries(full, "*", new EnumerationOptions { RecurseSubdirectories = true, AttributesToSkip = 0, MaxRecursionDepth = 4 }))
                if (File.GetAttributes(entry).HasFlag(FileAttributes.ReparsePoint))
                    throw new ApiException(StatusCodes.Status403Forbidden, $"lora_path: '{requested}' holds a symbolic link ({Path.GetRelativePath(full, entry)}); links under the adapter root are not followed", "lora_path", "path_not_allowed");
        return full;
    }
}
