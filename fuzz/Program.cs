using SharpFuzz;

namespace OnnxLora.Fuzz;

/// <summary>
/// afl++ harness: <c>OnnxLora.Fuzz READER</c> under afl-fuzz (see fuzz/run.sh), or <c>OnnxLora.Fuzz READER --replay
/// FILE…</c> to run saved inputs and print what each throws; <c>--write-seeds DIR</c> writes the seed corpus. An exception the reader does not document escapes and
/// afl records the input as a crash.
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        if (args is ["--write-seeds", var root]) return Seeds.Write(root);
        if (args.Length == 0 || !FuzzTargets.Readers.TryGetValue(args[0], out var read))
        {
            Console.Error.WriteLine($"usage: OnnxLora.Fuzz READER [--replay FILE…]; readers: {string.Join(", ", FuzzTargets.Readers.Keys)}");
            return 2;
        }
        var reader = args[0];
        var folder = Directory.CreateTempSubdirectory($"onnxlora-fuzz-{reader}-").FullName;
        try
        {
            if (args.Length > 1 && args[1] == "--replay") return Replay(reader, read, folder, args[2..]);
            Fuzzer.OutOfProcess.Run(stream =>
            {
                using var buffer = new MemoryStream();
                stream.CopyTo(buffer);
                try { read(buffer.ToArray(), folder); }
                catch (Exception e) when (FuzzTargets.IsDocumented(reader, e)) { }
            });
            return 0;
        }
        finally { Directory.Delete(folder, recursive: true); }
    }

    static int Replay(string reader, Action<byte[], string> read, string folder, string[] files)
    {
        int crashes = 0;
        foreach (var file in files)
        {
            try { read(File.ReadAllBytes(file), folder); Console.WriteLine($"{file}: ok"); }
            catch (Exception e) when (FuzzTargets.IsDocumented(reader, e)) { Console.WriteLine($"{file}: documented: {e.Message}"); }
            catch (Exception e) { crashes++; Console.WriteLine($"{file}: CRASH {e}"); }
        }
        return crashes == 0 ? 0 : 1;
    }
}
