using System.Text.Json;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Training;

/// <summary>The training loop on the tiny model and data the test makes: learning, exact resume, interruption.</summary>
public class TrainerTests
{
    static string Fixture(string name) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", name);

    /// <summary>Arithmetic sequences (step 3) of token ids: a pattern LoRA on blocks + head learns quickly.</summary>
    internal static void WriteSequences(string path, int count, int seed)
    {
        var rng = new Random(seed);
        File.WriteAllLines(path, Enumerable.Range(0, count).Select(_ =>
        {
            int start = rng.Next(500);
            return new JsonObject { ["input_ids"] = new JsonArray(Enumerable.Range(0, 24).Select(j => (JsonNode?)((start + 3 * j) % 512)).ToArray()) }.ToJsonString();
        }));
    }

    internal static string RewriteTiny(TempDir dir)
    {
        var outDir = dir.File("rw");
        LoraRewrite.RewriteFile(Fixture("tiny.onnx"), new LoraConfig { Rank = 8, Alpha = 16, TargetModules = ["c_attn", "c_proj", "c_fc", "lm_head"] }, outDir);
        return outDir;
    }

    static TrainOptions Options(TempDir dir, string rewrite, string run, int epochs) => new()
    {
        ModelDir = rewrite, DataPath = dir.File("train.jsonl"), EvalDataPath = dir.File("eval.jsonl"), Format = DataFormat.Tokens,
        OutDir = dir.File(run), Epochs = epochs, BatchSize = 8, Lr = 1e-2, WarmupSteps = 5, EvalEvery = 8, Threads = 1, Seed = 3,
        CheckpointEvery = 4,
    };

    static double[] TrainLosses(string runDir) =>
        File.ReadLines(Path.Combine(runDir, RunLayout.Metrics)).Select(l => JsonNode.Parse(l)!.AsObject())
            .Where(o => (string)o["kind"]! == "train").Select(o => (double)o["loss"]!).ToArray();

    [Test]
    public void LossFallsWellBelowItsStartAndTheRunFolderIsComplete()
    {
        using var dir = new TempDir();
        WriteSequences(dir.File("train.jsonl"), 64, 1);
        WriteSequences(dir.File("eval.jsonl"), 16, 2);
        var result = Trainer.Train(Options(dir, RewriteTiny(dir), "run", epochs: 10));

        Assert.That(result.Steps, Is.EqualTo(80));
        Assert.That(result.LastLoss, Is.LessThan(result.FirstLoss * 0.5), $"loss {result.FirstLoss} → {result.LastLoss}");
        Assert.That(result.BestEvalLoss, Is.LessThan(result.FirstLoss * 0.8));
        foreach (var f in new[] { RunLayout.Checkpoint, RunLayout.Metrics, RunLayout.LossPlot, RunLayout.Adapter, RunLayout.OnnxAdapter, RunLayout.TrainConfig })
            Assert.That(File.Exists(Path.Combine(result.RunDir, f)), Is.True, f);
        Assert.That(TrainLosses(result.RunDir), Has.Length.EqualTo(80));
    }

    [Test]
    public void ResumeAfterAnInterruptionContinuesTheSameLossCurve()
    {
        using var dir = new TempDir();
        WriteSequences(dir.File("train.jsonl"), 48, 1);
        WriteSequences(dir.File("eval.jsonl"), 8, 2);
        var rewrite = RewriteTiny(dir);
        var whole = Trainer.Train(Options(dir, rewrite, "whole", epochs: 2));

        using var stop = new CancellationTokenSource();
        var progress = new Progress(p => { if (p.Step == 7) stop.Cancel(); });
        var options = Options(dir, rewrite, "split", epochs: 2);
        Assert.Throws<OperationCanceledException>(() => Trainer.Train(options, progress, stop.Token));
        var checkpoint = Checkpoint.Load(Path.Combine(options.OutDir, RunLayout.Checkpoint));
        Assert.That(checkpoint.Step, Is.EqualTo(7), "the interrupted step is checkpointed");

        var resumed = Trainer.Resume(options.OutDir);
        Assert.That(resumed.Steps, Is.EqualTo(whole.Steps));
        Assert.That(TrainLosses(options.OutDir), Is.EqualTo(TrainLosses(whole.RunDir)), "same device and threads: bit-identical losses");
    }

    [Test]
    public void ANewRunRefusesAFolderThatHoldsOne()
    {
        using var dir = new TempDir();
        WriteSequences(dir.File("train.jsonl"), 8, 1);
        WriteSequences(dir.File("eval.jsonl"), 8, 2);
        var options = Options(dir, RewriteTiny(dir), "run", epochs: 1);
        Trainer.Train(options);
        var e = Assert.Throws<IOException>(() => Trainer.Train(options));
        Assert.That(e!.Message, Does.Contain("--resume"));
    }

    sealed class Progress(Action<TrainProgress> report) : IProgress<TrainProgress>
    {
        public void Report(TrainProgress value) => report(value);
    }
}

/// <summary>--init-adapter: a run can start from a trained adapter, ours or PEFT's.</summary>
public class InitAdapterTests
{
    [Test]
    public void ARunStartsWhereAPeftExportOfAnotherRunEnded()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 32, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        TrainOptions Options(string run, string? init) => new()
        {
            ModelDir = rewrite, DataPath = dir.File("train.jsonl"), Format = DataFormat.Tokens, OutDir = dir.File(run),
            Epochs = 6, BatchSize = 8, Lr = 1e-2, Threads = 1, Shuffle = false, InitAdapter = init,
        };
        var first = Trainer.Train(Options("first", null));
        var manifest = LoraManifest.Load(Path.Combine(rewrite, RunLayout.LoraConfig));
        var peft = dir.File("peft");
        OnnxLora.Pipeline.Adapters.AdapterFiles.Write(OnnxLora.Pipeline.Adapters.AdapterFiles.ReadSafeTensors(first.AdapterPath, manifest),
            OnnxLora.Pipeline.Adapters.AdapterFormat.Peft, peft, rewrite);

        var second = Trainer.Train(Options("second", peft) with { Epochs = 1 });
        Assert.That(second.FirstLoss, Is.LessThan(first.FirstLoss - 1), $"started from the trained adapter: {second.FirstLoss} vs a fresh {first.FirstLoss}");
        Assert.That(second.FirstLoss, Is.LessThan(first.LastLoss + 0.1), "no worse than where the first run ended");
    }
}
