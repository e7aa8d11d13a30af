using System.Text.Json;
using System.Text.Json.Nodes;

namespace OnnxLora.GraphRewrite.Graphs;

/// <summary>
/// The one output policy of every verb that writes: outputs never destroy what OnnxLora did not make.
/// <list type="bullet">
/// <item>An output folder is new (or empty), or one this tool wrote: it holds <see cref="MarkerFile"/> naming the verb.
/// Replacing it still needs <c>--overwrite</c>; <c>run</c> and <c>train --resume</c> reuse their own folder.</item>
/// <item>A single-file output replaces an existing file only with <c>--overwrite</c>.</item>
/// <item>No output is, lies inside, or holds an input. Paths are compared resolved: <c>..</c> and trailing separators
/// normalised, symlinks followed.</item>
/// <item>Every file is written through <see cref="AtomicFile"/> (temp + rename); the temps a killed run left behind
/// (<c>*.tmp-*</c>) are removed when the next run starts in the same folder.</item>
/// </list>
/// </summary>
public static class OutputFolder
{
    /// <summary>The marker every folder OnnxLora creates holds: <c>{"verb": "train", "version": "…"}</c>.</summary>
    public const string MarkerFile = ".onnxlora";

    /// <summary>Infix of the temp files and folders OnnxLora writes before renaming them into place.</summary>
    public const string TempInfix = ".tmp-";

    /// <summary>
    /// The canonical form of <paramref name="path"/>: absolute, <c>..</c> and trailing separators removed, and every
    /// existing component that is a symlink replaced by its final target.
    /// </summary>
    public static string Resolve(string path)
    {
        var full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(path));
        for (int hops = 0; hops < 40; hops++)
        {
            var root = Path.GetPathRoot(full)!;
            var resolved = root;
            bool followed = false;
            foreach (var part in full[root.Length..].Split(Path.DirectorySeparatorChar, StringSplitOptions.RemoveEmptyEntries))
            {
                var next = Path.Combine(resolved, part);
                if (!followed && new FileInfo(next).LinkTarget is not null && new FileInfo(next).ResolveLinkTarget(returnFinalTarget: true) is { } target)
                {
                    next = Path.TrimEndingDirectorySeparator(Path.GetFullPath(target.FullName));
                    followed = true;   // the target may hold links itself: go round again from its root
                }
                resolved = next;
            }
            if (!followed) return resolved;
            full = resolved;
        }
        throw new IOException($"{path}: too many levels of symbolic links");
    }

    /// <summary>True when <paramref name="path"/> is <paramref name="folder"/> or lies inside it (both resolved).</summary>
    public static bool IsSameOrInside(string path, string folder) =>
        path == folder || path.StartsWith(Path.EndsInDirectorySeparator(folder) ? folder : folder + Path.DirectorySeparatorChar, StringComparison.Ordinal);

    /// <summary>
    /// Refuses an <paramref name="output"/> that is one of <paramref name="inputs"/>, lies inside an input folder, or
    /// holds an input (a folder output may be replaced as a whole). <paramref name="flag"/> names the output in the error.
    /// </summary>
    public static void CheckNotInput(string output, IEnumerable<string?> inputs, string flag)
    {
        var outPath = Resolve(output);
        foreach (var input in inputs)
        {
            if (string.IsNullOrEmpty(input)) continue;
            var inPath = Resolve(input);
            if (outPath == inPath) throw new IOException($"{output}: {flag} is the input {input}; choose another {flag}");
            if (IsSameOrInside(outPath, inPath)) throw new IOException($"{output}: {flag} lies inside the input {input}; choose another {flag}");
            if (IsSameOrInside(inPath, outPath)) throw new IOException($"{output}: {flag} holds the input {input}; choose another {flag}");
        }
    }

    /// <summary>The verb named by <paramref name="dir"/>'s marker, or null when it has none (not ours).</summary>
    public static string? MarkerVerb(string dir)
    {
        var marker = Path.Combine(dir, MarkerFile);
        if (!File.Exists(marker)) return null;
        try { return JsonNode.Parse(File.ReadAllText(marker))?["verb"]?.GetValue<string>(); }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException) { return null; }
    }

    /// <summary>
    /// Checks that folder <paramref name="dir"/> may receive <paramref name="verb"/>'s output and says whether it is an
    /// existing folder of that verb (to be replaced or reused by the caller). New or empty folders pass. A folder of the
    /// verb passes with <paramref name="overwrite"/> (or <paramref name="reuse"/>); otherwise the error gives
    /// <paramref name="hint"/>. Anything else (a file, a folder OnnxLora did not make, another verb's) is refused.
    /// </summary>
    public static bool Check(string dir, string verb, string flag, bool overwrite, bool reuse = false, string? hint = null)
    {
        if (File.Exists(dir)) throw new IOException($"{dir}: {flag} is a file; it needs a folder");
        if (!Directory.Exists(dir)) return false;
        var owner = MarkerVerb(dir);
        // empty, or only what a start killed at once left (its marker, temps): as good as new
        if (Directory.EnumerateFileSystemEntries(dir).All(e => owner == verb && IsOnlyStarted(e))) return false;
        if (owner is null)
            throw new IOException($"{dir}: {flag} exists and was not written by onnxlora (no {MarkerFile}); choose a new {flag} or empty it");
        if (owner != verb)
            throw new IOException($"{dir}: {flag} holds an 'onnxlora {owner}' output, not '{verb}'; choose another {flag}");
        if (!overwrite && !reuse)
            throw new IOException($"{dir}: {flag} holds an earlier 'onnxlora {verb}' output; {hint ?? "pass --overwrite to replace it"}");
        return true;
    }

    static bool IsOnlyStarted(string entry) => Path.GetFileName(entry) is var name && (name == MarkerFile || name.Contains(TempInfix, StringComparison.Ordinal));

    /// <summary>Creates <paramref name="dir"/> (if needed) and marks it as <paramref name="verb"/>'s output.</summary>
    public static void Mark(string dir, string verb)
    {
        Directory.CreateDirectory(dir);
        AtomicFile.WriteAllText(Path.Combine(dir, MarkerFile),
            new JsonObject { ["verb"] = verb, ["version"] = Lora.LoraRewrite.ToolVersion }.ToJsonString());
    }

    /// <summary>Empties a folder this tool marked (everything but the marker); refuses any other folder.</summary>
    public static void Clear(string dir)
    {
        if (MarkerVerb(dir) is null) throw new IOException($"{dir}: not an onnxlora output folder (no {MarkerFile}); refusing to empty it");
        foreach (var entry in Directory.EnumerateFileSystemEntries(dir).ToList())
        {
            if (Path.GetFileName(entry) == MarkerFile) continue;
            if (Directory.Exists(entry) && new DirectoryInfo(entry).LinkTarget is null) Directory.Delete(entry, recursive: true);
            else File.Delete(entry);
        }
    }

    /// <summary>
    /// Removes what a killed run left in a folder this tool marked: files and folders named <c>*.tmp-*</c>, at any
    /// depth. Folders without the marker are left alone. Returns how many entries went.
    /// </summary>
    public static int RemoveStaleTemps(string dir)
    {
        if (!Directory.Exists(dir) || MarkerVerb(dir) is null) return 0;
        int removed = 0;
        foreach (var entry in Directory.EnumerateFileSystemEntries(dir, "*", new EnumerationOptions { RecurseSubdirectories = true, AttributesToSkip = FileAttributes.ReparsePoint })
                     .Where(e => Path.GetFileName(e).Contains(TempInfix, StringComparison.Ordinal)).OrderByDescending(e => e.Length).ToList())
        {
            if (Directory.Exists(entry)) Directory.Delete(entry, recursive: true);
            else if (File.Exists(entry)) File.Delete(entry);
            else continue;   // inside a temp folder removed before it
            removed++;
        }
        return removed;
    }

    /// <summary>
    /// Checks a single-file output: not a folder, not an input nor inside an input folder, and not an existing file
    /// unless <paramref name="overwrite"/>. Returns the resolved path.
    /// </summary>
    public static string CheckFile(string path, string flag, IEnumerable<string?> inputs, bool overwrite)
    {
        if (Directory.Exists(path)) throw new IOException($"{path}: {flag} is a folder; it needs a file name");
        CheckNotInput(path, inputs, flag);
        // a run's or rewrite's own files (checkpoint, adapter, models) are never another verb's output
        for (var folder = Path.GetDirectoryName(Resolve(path)); folder is not null; folder = Path.GetDirectoryName(folder))
            if (MarkerVerb(folder) is { } verb)
                throw new IOException($"{path}: {flag} lies inside an 'onnxlora {verb}' output ({folder}); choose a path outside it");
        if (File.Exists(path) && !overwrite) throw new IOException($"{path}: {flag} exists; pass --overwrite to replace it, or choose another {flag}");
        return Resolve(path);
    }
}
