using OnnxLora.Fuzz;

namespace OnnxLora.Tests.Reliability;

/// <summary>
/// The bounded fuzz run CI does: every reader gets its committed corpus (tests/fixtures/fuzz/READER, seeds and the
/// crashers afl++ found) plus deterministic mutations of it (bit flips, byte edits, truncation, splices of hostile
/// tokens), in process. The rule is afl's: anything but the reader's documented error type is a crash. The long runs
/// under afl-fuzz (fuzz/run.sh) are recorded in docs/RELIABILITY.md.
/// </summary>
[NonParallelizable]
public class ReadersFuzzSmokeTests
{
    const int MutationsPerSeed = 250;

    static IEnumerable<string> Readers() => FuzzTargets.Readers.Keys;

    [TestCaseSource(nameof(Readers))]
    public void Corpus_and_mutations_give_only_documented_errors(string reader)
    {
        var corpus = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "fuzz", reader);
        var seeds = Directory.GetFiles(corpus).Order(StringComparer.Ordinal).ToList();
        Assert.That(seeds, Is.Not.Empty, corpus);
        using var dir = new TempDir();
        var read = FuzzTargets.Readers[reader];
        var crashes = new List<string>();
        int runs = 0, accepted = 0;
        foreach (var seed in seeds)
        {
            var bytes = File.ReadAllBytes(seed);
            var rng = new Random(Path.GetFileName(seed).Aggregate(17, (h, c) => h * 31 + c));
            for (int i = 0; i <= MutationsPerSeed; i++)
            {
                var input = i == 0 ? bytes : Mutate(bytes, rng);
                runs++;
                try { read(input, dir.Path); accepted++; }
                catch (Exception e) when (FuzzTargets.IsDocumented(reader, e)) { }
                catch (Exception e)
                {
                    // the input as base64 (first 600 characters) so a crasher can be saved into the corpus
                    var b64 = Convert.ToBase64String(input);
                    if (crashes.Count < 5) crashes.Add($"{Path.GetFileName(seed)} mutation {i}: {e.GetType().Name}: {e.Message} at {e.StackTrace?.Split('\n')[0].Trim()} ({b64[..Math.Min(600, b64.Length)]})");
                }
            }
        }
        TestContext.Out.WriteLine($"{reader}: {runs} inputs, {accepted} accepted, {crashes.Count} crashes");
        Assert.That(crashes, Is.Empty, string.Join("\n", crashes));
    }

    /// <summary>Each input afl++ or the mutations above found crashing a reader (saved as crash-*) now gets the documented error.</summary>
    [Test]
    public void Saved_crashers_get_documented_errors()
    {
        using var dir = new TempDir();
        var root = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "fuzz");
        var crashers = FuzzTargets.Readers.Keys.SelectMany(r => Directory.GetFiles(Path.Combine(root, r), "crash-*").Select(f => (Reader: r, File: f))).ToList();
        Assert.That(crashers, Is.Not.Empty);
        foreach (var (reader, file) in crashers)
        {
            Exception? e = null;
            try { FuzzTargets.Readers[reader](File.ReadAllBytes(file), dir.Path); }
            catch (Exception caught) { e = caught; }
            Assert.That(e is not null && FuzzTargets.IsDocumented(reader, e), Is.True, $"{file}: {e}");
            Assert.That(e!.Message, Does.Contain(dir.Path), "the message names the file");
        }
    }

    // values that break readers: boundary numbers, JSON/YAML structure, overlong UTF-8, a NUL
    static readonly byte[][] Tokens = new[]
    {
        "-1", "0", "1e308", "NaN", "-100", "4294967296", "9223372036854775807", "18446744073709551616", "[", "]", "{", "}", "\"",
        ",", ":", "null", "\n", "\t", "&a ", "*a", "? ", "../", "/etc/passwd", "\\u0000",
    }.Select(System.Text.Encoding.UTF8.GetBytes).Concat([[0xC3, 0x28], [0xFF], [0], [0x7F, 0xFF, 0xFF, 0xFF], [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]]).ToArray();

    static byte[] Mutate(byte[] seed, Random rng)
    {
        var b = new List<byte>(seed);
        int edits = 1 + rng.Next(4);
        for (int k = 0; k < edits; k++)
        {
            int at = b.Count == 0 ? 0 : rng.Next(b.Count);
            switch (rng.Next(6))
            {
                case 0 when b.Count > 0: b[at] ^= (byte)(1 << rng.Next(8)); break;
                case 1 when b.Count > 0: b[at] = (byte)rng.Next(256); break;
                case 2 when b.Count > 0: b.RemoveRange(at, Math.Min(b.Count - at, 1 + rng.Next(8))); break;
                case 3: b.InsertRange(at, Tokens[rng.Next(Tokens.Length)]); break;
                case 4 when b.Count > 0: b.RemoveRange(at, b.Count - at); break;                       // truncate
                default:
                    var token = Tokens[rng.Next(Tokens.Length)];                                        // overwrite in place
                    for (int j = 0; j < token.Length && at + j < b.Count; j++) b[at + j] = token[j];
                    break;
            }
        }
        return b.ToArray();
    }
}
