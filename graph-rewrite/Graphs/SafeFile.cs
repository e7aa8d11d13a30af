using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace OnnxLora.GraphRewrite.Graphs;

/// <summary>
/// Opens files named by files from strangers (a model's external data, a weights file): only regular files are read
/// (a FIFO, socket or device is refused without blocking on it), and a location inside a file can be confined to a
/// folder the way ONNX Runtime confines external data: relative, no "..", and its real path inside the folder's.
/// </summary>
public static partial class SafeFile
{
    /// <summary>
    /// Opens <paramref name="path"/> for reading when it is a regular file (on Linux its type is checked before it is
    /// opened). <paramref name="error"/> turns a reason
    /// ("is not a regular file …") into the reader's own exception, which names the file and the field.
    /// </summary>
    public static FileStream OpenRegular(string path, Func<string, Exception> error)
    {
        if (Directory.Exists(path)) throw error("is a folder, not a file");
        if (!File.Exists(path)) throw error("does not exist");
        // the type is read without opening: opening a FIFO can release a writer waiting on it, or block
        if (FileType(path) is { } type && type != RegularFileType)
            throw error("is not a regular file (a FIFO, socket or device); refusing to open it");
        int? nonBlocking = OperatingSystem.IsLinux() ? LinuxNonBlock : OperatingSystem.IsMacOS() ? MacNonBlock : null;
        if (nonBlocking is not { } flags) return File.OpenRead(path);
        // open() of a FIFO with no writer blocks forever; O_NONBLOCK returns at once, and lseek then tells it apart
        int fd = Open(path, flags);
        if (fd < 0) throw error($"cannot be opened ({Marshal.GetLastPInvokeErrorMessage()})");
        var handle = new SafeFileHandle(fd, ownsHandle: true);
        FileStream stream;
        try { stream = new FileStream(handle, FileAccess.Read, 1 << 16); }
        catch { handle.Dispose(); throw; }
        if (stream.CanSeek) return stream;
        stream.Dispose();
        throw error("is not a regular file (a FIFO, socket or device); refusing to read it");
    }

    /// <summary>
    /// The real path of <paramref name="location"/> (a path written inside a file) under <paramref name="folder"/>,
    /// refused unless it is relative, has no ".." segment, and stays inside the folder once every symlink is followed.
    /// </summary>
    public static string ResolveInside(string folder, string location, Func<string, Exception> error)
    {
        if (location.Length == 0 || location.Contains('\0')) throw error("is empty or holds a NUL character");
        if (Path.IsPathRooted(location) || location[0] is '/' or '\\')
            throw error("is an absolute path; external data must lie in the model's folder");
        if (location.Split('/', '\\').Contains(".."))
            throw error("climbs out of the model's folder with '..'");
        try
        {
            var root = RealPath(folder);
            var real = RealPath(Path.Combine(root, location));
            if (!real.StartsWith(root.TrimEnd(Path.DirectorySeparatorChar) + Path.DirectorySeparatorChar, StringComparison.Ordinal))
                throw error($"resolves (through a symlink) to '{real}', outside the model's folder '{root}'");
            return real;
        }
        catch (IOException e) { throw error($"cannot be resolved ({e.Message})"); }
        catch (UnauthorizedAccessException e) { throw error($"cannot be resolved ({e.Message})"); }
    }

    /// <summary>The absolute path with every symlink along it followed (realpath(3) for paths that may not exist yet).</summary>
    public static string RealPath(string path) => RealPath(path, 0);

    static string RealPath(string path, int depth)
    {
        // Linux's own limit on links followed in one lookup
        if (depth > 40) throw new IOException($"'{path}': too many levels of symbolic links");
        var full = Path.GetFullPath(path);
        var current = Path.GetPathRoot(full)!;
        foreach (var part in full[current.Length..].Split(Path.DirectorySeparatorChar, StringSplitOptions.RemoveEmptyEntries))
        {
            var next = Path.Combine(current, part);
            // current has no links left in it, so a relative target (even with "..") is resolved lexically against it
            if (new FileInfo(next).LinkTarget is { } target) next = RealPath(Path.Combine(current, target), depth + 1);
            current = next;
        }
        return current;
    }

    const int RegularFileType = 0x8000;                 // S_IFREG within S_IFMT (0xF000)

    /// <summary>
    /// The S_IFMT bits of <paramref name="path"/> (symlinks followed) from Linux's statx, whose buffer layout is the same
    /// on every architecture; null where statx is unavailable (other systems, old kernels): the non-blocking open
    /// and the seek check in <see cref="OpenRegular"/> still refuse a FIFO there.
    /// </summary>
    static unsafe int? FileType(string path)
    {
        if (!OperatingSystem.IsLinux()) return null;
        byte* buffer = stackalloc byte[256];
        try
        {
            // AT_FDCWD, no flags (follow links), STATX_TYPE; stx_mode is the u16 at offset 28
            if (StatX(-100, path, 0, 1, buffer) != 0) return null;
        }
        catch (EntryPointNotFoundException) { return null; }
        return *(ushort*)(buffer + 28) & 0xF000;
    }

    [LibraryImport("libc", EntryPoint = "statx", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static unsafe partial int StatX(int dirfd, string path, int flags, uint mask, byte* buffer);

    const int LinuxNonBlock = 0x800 | 0x80000;          // O_RDONLY | O_NONBLOCK | O_CLOEXEC
    const int MacNonBlock = 0x4 | 0x1000000;

    [LibraryImport("libc", EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int Open(string path, int flags);
}
