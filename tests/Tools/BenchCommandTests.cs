using System.Reflection;
using System.Text.Json;
using OnnxLora.Tools.Bench;

namespace OnnxLora.Tests.Tools;

/// <summary>`onnxlora bench` without peers on the tiny preset: the real build, child process and ORT steps, in seconds.</summary>
[NonParallelizable]   // the CLI's failure gate writes to Console.Error
public class BenchCommandTests
{
    /// <summary>`bench --generate`: every batch × mode × variant is measured, and each row produced all its tokens.</summary>
    [Test]
    public void GenerateMeasuresEveryModeAndVariant()
    {
        using var dir = new TempDir();
        var json = dir.File("generate.json");
        var (code, output, error) = CliRunner.Run("bench", "--generate", "--preset", "tiny", "--prompt-tokens", "8", "--new-tokens", "6",
                                                 "--batch", "3", "--rank", "4", "--threads", "1", "--json", json);
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain("batch 3, adapter: the cache is"));
        using var doc = JsonDocument.Parse(File.ReadAllText(json));
        var results = doc.RootElement.GetProperty("results").EnumerateArray().ToList();
        Assert.That(results.Select(r => (r.GetProperty("Batch").GetInt32(), r.GetProperty("Mode").GetString(), r.GetProperty("Variant").GetString())),
                    Is.EquivalentTo(from b in new[] { 1, 3 } from m in new[] { "nocache", "cache" } from v in new[] { "base", "adapter", "merged" } select (b, m, v)));
        foreach (var r in results)
            Assert.That(r.GetProperty("TokensPerS").GetDouble(), Is.EqualTo(r.GetProperty("Batch").GetInt32() * 6 / r.GetProperty("TotalS").GetDouble()).Within(1e-6).Percent);

        (code, _, error) = CliRunner.Run("bench", "--generate", "--preset", "tiny", "--prompt-tokens", "60", "--new-tokens", "10");
        Assert.That((code, error), Is.EqualTo((1, "error: prompt 60 + new 10 tokens exceed tiny's context (64)" + Environment.NewLine)));
    }

    /// <summary>The built GenAI contestant (tools/GenAiBench), which the test project builds first.</summary>
    static readonly string GenAiTool = typeof(BenchCommandTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "GenAiBench").Value!;

    [Test]
    public void GenerateWithGenAiAddsItsRowsWithOurGreedyTokens()
    {
        using var dir = new TempDir();
        var json = dir.File("generate.json");
        var (code, output, error) = CliRunner.Run("bench", "--generate", "--preset", "tiny", "--prompt-tokens", "8", "--new-tokens", "4", "--batch", "2",
                                                 "--rank", "4", "--threads", "1", "--modes", "cache", "--genai-tool", GenAiTool, "--json", json,
                                                 "--seed", "1");   // a seed whose random adapter changes a greedy token (many leave all 4 as they are)
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain("batch 2, adapter: ours with the cache ÷ GenAI tokens/s ="));
        using var doc = JsonDocument.Parse(File.ReadAllText(json));
        var genai = doc.RootElement.GetProperty("results").EnumerateArray().Where(r => r.GetProperty("Mode").GetString() == "genai").ToList();
        Assert.That(genai.Select(r => (r.GetProperty("Batch").GetInt32(), r.GetProperty("Variant").GetString())),
                    Is.EquivalentTo(from b in new[] { 1, 2 } from v in new[] { "base", "adapter", "merged" } select (b, v)));
        foreach (var r in genai)
        {
            // GenAI's greedy search on the exported folder (the adapter through its Adapters API) picks our tokens
            Assert.That(r.GetProperty("SameTokensAsOurs").GetBoolean(), Is.True, $"batch {r.GetProperty("Batch")}, {r.GetProperty("Variant")}");
            Assert.That(r.GetProperty("TokensPerS").GetDouble(), Is.EqualTo(r.GetProperty("Batch").GetInt32() * 4 / r.GetProperty("TotalS").GetDouble()).Within(1e-6).Percent);
            Assert.That(r.GetProperty("FirstTokenS").GetDouble(), Is.GreaterThan(0).And.LessThanOrEqualTo(r.GetProperty("TotalS").GetDouble()));
        }
        // GenAI applied the adapter (its adapter rows, equal to ours, differ from its base rows)
        string Tokens(int batch, string variant) => genai.Single(r => r.GetProperty("Batch").GetInt32() == batch && r.GetProperty("Variant").GetString() == variant).GetProperty("Tokens").GetRawText();
        Assert.That(Tokens(2, "adapter"), Is.Not.EqualTo(Tokens(2, "base")));
        Assert.That(Tokens(2, "merged"), Is.EqualTo(Tokens(2, "adapter")), "merged = adapter on (greedy, 4 tokens on tiny)");

        (code, _, error) = CliRunner.Run("bench", "--generate", "--preset", "tiny", "--genai-tool", dir.File("missing.dll"));
        Assert.That((code, error.Trim()), Is.EqualTo((1, $"error: --genai-tool {dir.File("missing.dll")}: no such file (build tools/GenAiBench: dotnet build tools/GenAiBench -c Release)")));
    }

    [Test]
    public void TinyClsRunsOursInAChildProcessAndWritesJson()
    {
        using var dir = new TempDir();
        var json = dir.File("bench.json");
        var (code, output, error) = CliRunner.Run("bench", "--preset", "tiny", "--seq", "16", "--batch", "2", "--steps", "1", "--warmup", "0",
                                                 "--threads", "1", "--runs", "2", "--json", json);
        Assert.That(code, Is.EqualTo(0), error);
        // the workload's tiny (width 64, 2 blocks): 6 linears per block with r=16, plus the LoRA of the 2-class head
        long perBlock = 4 * 16 * (64 + 64) + 16 * (64 + 256) + 16 * (256 + 64);
        long trainable = 2 * perBlock + 16 * (64 + 2);
        Assert.That(output, Does.Contain($"{trainable:N0} trainable").And.Contain("run 2/2: onnxlora").And.Contain("medians of 2 run(s)"));

        using var doc = JsonDocument.Parse(File.ReadAllText(json));
        var runs = doc.RootElement.GetProperty("runs").EnumerateArray().ToList();
        Assert.That(runs, Has.Count.EqualTo(2));
        var result = runs[0].GetProperty("result").Deserialize<BenchResult>(BenchResult.Json)!;
        Assert.That(result.Peer, Does.StartWith("onnxlora"));
        Assert.That(result.Trainable, Is.EqualTo(trainable));
        Assert.That(result.StepS, Is.GreaterThan(0));
        // what this checks is the token count: batch × seq from the command line (every sequence full, none shifted off)
        Assert.That(result.TokensPerS * result.StepS, Is.EqualTo(2 * 16).Within(1).Percent);
        Assert.That((result.Batch, result.Seq, result.Rank, result.Threads), Is.EqualTo((2, 16, 16, 1)), "the child ran the workload the parent asked for");
        // the child's own peak: an ORT process, far below the test host's
        Assert.That(result.PeakRssMb, Is.InRange(20, 2000));
        Assert.That(doc.RootElement.GetProperty("commands")[0].GetProperty("command").GetString(), Does.Contain("--self-only"));
    }

    [Test]
    public void SelfOnlyPrintsOneJsonLineInThePeersFormat()
    {
        var (code, output, error) = CliRunner.Run("bench", "--self-only", "--preset", "tiny", "--task", "lm", "--seq", "8", "--batch", "1",
                                                 "--steps", "1", "--warmup", "0", "--threads", "1");
        Assert.That(code, Is.EqualTo(0), error);
        var line = output.Trim();
        Assert.That(line.Split('\n'), Has.Length.EqualTo(1));
        using var doc = JsonDocument.Parse(line);
        foreach (var field in new[] { "peer", "preset", "task", "batch", "seq", "rank", "threads", "step_s", "tokens_per_s", "trainable", "total", "peak_rss_mb", "cpu", "blas", "matmul_gflops" })
            Assert.That(doc.RootElement.TryGetProperty(field, out _), Is.True, field);
        // lm: LoRA on the 512-token vocabulary head too
        long trainable = 2 * (4 * 16 * 128 + 2 * 16 * 320) + 16 * (64 + 512);
        Assert.That(doc.RootElement.GetProperty("trainable").GetInt64(), Is.EqualTo(trainable));
        Assert.That(doc.RootElement.GetProperty("task").GetString(), Is.EqualTo("lm"));
    }

    /// <summary>--profile: ORT's profile files are written and their per-op totals of the last step printed, forward and backward.</summary>
    [Test]
    public void ProfilePrintsPerOpTotals()
    {
        using var dir = new TempDir();
        var prefix = dir.File("prof");
        var (code, _, error) = CliRunner.Run("bench", "--self-only", "--preset", "tiny", "--seq", "8", "--batch", "2", "--steps", "1", "--warmup", "0",
                                            "--threads", "1", "--profile", prefix);
        Assert.That(code, Is.EqualTo(0), error);
        var files = Directory.GetFiles(dir.Path, "prof_*.json");
        Assert.That(files, Has.Length.EqualTo(2), "the train and the optimizer session");
        var (ops, run) = ProfileSummary.Read(files.Single(f => ProfileSummary.Read(f).Ops.Any(o => o.Backward)));
        Assert.That(run, Is.GreaterThan(0));
        Assert.That(ops.Where(o => o.Backward).Select(o => o.Op), Does.Contain("FusedMatMul"), "dX = dY·Wᵀ in the backward");
        Assert.That(ops.Where(o => !o.Backward).Select(o => o.Op), Does.Contain("MatMul").And.Contain("FastGelu"));
        Assert.That(error, Does.Contain("profile ").And.Contain(" backward "));
    }

    [TestCase("--task", "mlm", "--task: task must be lm or cls")]
    [TestCase("--peers", "/nonexistent-peers", "--peers /nonexistent-peers: no such folder")]
    [TestCase("--preset", "gpt3", "--preset must be one of")]
    [TestCase("--seq", "100", "longer than tiny's context")]
    [TestCase("--artifacts", "x", "--artifacts goes with --self-only")]
    public void RejectsBadOptions(string flag, string value, string message)
    {
        var (code, _, error) = CliRunner.Run("bench", "--preset", "tiny", "--seq", "16", flag, value);
        Assert.That(code, Is.Not.EqualTo(0));
        Assert.That(error, Does.Contain(message));
    }

    [Test]
    public void MedianAndPeerLineParsing()
    {
        Assert.That(OnnxLora.Tools.Commands.BenchCommand.Median([3, 1, 2]), Is.EqualTo(2));
        Assert.That(OnnxLora.Tools.Commands.BenchCommand.Median([4, 1, 2, 3]), Is.EqualTo(2.5));
        // a line as torch_peer.py prints it, after other output
        var r = BenchResult.FromOutput("warning: x\n{\"peer\": \"pytorch 1.13.0a0\", \"preset\": \"gpt2\", \"task\": \"cls\", \"batch\": 8, \"seq\": 120, \"rank\": 16, " +
                                       "\"threads\": 2, \"step_s\": 4.8, \"tokens_per_s\": 200.0, \"trainable\": 2666528, \"total\": 126000000, \"peak_rss_mb\": 2250}\n");
        Assert.That(r, Is.Not.Null);
        Assert.That((r!.Peer, r.StepS, r.Trainable, r.PeakRssMb, r.TrainS), Is.EqualTo(("pytorch 1.13.0a0", 4.8, 2666528L, 2250L, (double?)null)));
    }

    /// <summary>The analytic FLOP count, against a count by hand of every product of gpt2 (width 768, 12 blocks) for cls 8 × 120, r = 16.</summary>
    [Test]
    public void TrainingFlopsCountEveryProductOnce()
    {
        var spec = new BenchSpec("gpt2", "cls", 2, 8, 120, 16, 16, 1, 0, 1, 123, Workload.Embedded);
        double n = 8 * 120, d = 768;
        // frozen linears per block: q, k, v, proj (d×d), fc (d×4d), out (4d×d); the head d×2
        double frozenMacs = n * (12 * (4 * d * d + 2 * 4 * d * d) + d * 2);
        double loraMacs = n * 16 * (12 * (4 * 2 * d + 2 * 5 * d) + (d + 2));
        double attentionMacs = 12 * 8 * 12 * (2 * 120.0 * 120 * 64);   // blocks × batch × heads × (QKᵀ + A·V)
        // forward: every product once; backward: input gradients of all, weight gradients of LoRA only, both attention operands
        double expected = 2 * (frozenMacs + loraMacs + attentionMacs) + 2 * (frozenMacs + 2 * loraMacs + 2 * attentionMacs);
        Assert.That(spec.TrainingFlops, Is.EqualTo(expected).Within(1e-9).Percent);
        Assert.That(spec.TrainingFlops / 1e9, Is.EqualTo(354).Within(1).Percent, "≈ 2 × 163 GFLOP of frozen products + LoRA + attention");
    }

    [Test]
    public void WorkloadFileIsCheckedAndNamesTheFieldAtFault()
    {
        var w = Workload.Embedded;
        Assert.That((w.Lora.Rank, w.Lora.Alpha, w.Optimizer.Lr, w.Optimizer.WeightDecay, w.Seed), Is.EqualTo((16, 16.0, 1e-4, 0.01, 123)));
        Assert.That(w.ModelConfig("gpt2"), Is.EqualTo(OnnxLora.Models.GptConfig.Preset("gpt2") with { SplitQkv = true }));
        Assert.That((w.Shapes["cls"].Seq, w.Shapes["lm"].Seq, w.Shapes["cls"].Classes), Is.EqualTo((120, 128, (int?)2)));

        using var dir = new TempDir();
        var path = dir.File("workload.json");
        // the tool's embedded copy of bench/peers/workload.json, mutated one field at a time
        using var embedded = new StreamReader(typeof(Workload).Assembly.GetManifestResourceStream(Workload.FileName)!);
        var json = embedded.ReadToEnd();
        File.WriteAllText(path, json.Replace("\"weight_decay\": 0.01, ", ""));
        Assert.That(() => Workload.Load(path), Throws.InstanceOf<InvalidDataException>().With.Message.StartsWith(path).And.Message.Contains("weight_decay"));
        File.WriteAllText(path, json.Replace("\"mlp_ratio\": 4", "\"mlp_ratio\": 3"));
        Assert.That(() => Workload.Load(path), Throws.InstanceOf<InvalidDataException>().With.Message.EqualTo($"{path}: model.mlp_ratio must be 4 (GptBuilder's MLP), got 3"));
        File.WriteAllText(path, json.Replace("\"heads\": 12,", "\"heads\": 7,"));
        Assert.That(() => Workload.Load(path), Throws.InstanceOf<InvalidDataException>().With.Message.StartsWith($"{path}: presets.gpt2:"));

        var (code, _, error) = CliRunner.Run("bench", "--preset", "tiny", "--workload", path);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(error, Does.StartWith($"error: --workload: {path}: presets.gpt2:"));
    }

    /// <summary>The PyTorch peer starts without the inherited OPENBLAS_* pins: a null value removes a variable in the child.</summary>
    [Test]
    public void ProcessEnvironmentNullRemovesAVariable()
    {
        Assert.That(Environment.GetEnvironmentVariable("HOME"), Is.Not.Null, "the test needs a variable this process has");
        var child = new BenchProcess("env", "/bin/sh", ["-c", "echo ${HOME-unset} ${ONNXLORA_BENCH_TEST-unset}"],
                                     new Dictionary<string, string?> { ["HOME"] = null, ["ONNXLORA_BENCH_TEST"] = "set" });
        Assert.That(child.Output(null).Trim(), Is.EqualTo("unset set"));
    }
}
