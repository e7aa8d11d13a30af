using System.Runtime.InteropServices;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.Pipeline.Training;
using OnnxLora.Tests.Training;

namespace OnnxLora.Tests.Reliability;

/// <summary>Checkpoints and resume: a bad checkpoint is refused before anything is touched; a diverging run keeps its last good one.</summary>
[NonParallelizable]
public class OutputsCheckpointTests
{
    /// <summary>A finished 4-step run with a checkpoint every step: (run folder, checkpoint path).</summary>
    static (string Run, string Checkpoint) Run(TempDir dir)
    {
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 16, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        var run = dir.File("run");
        var (code, _, err) = CliRunner.Run("train", "--model", rewrite, "--data", dir.File("train.jsonl"), "--format", "tokens", "--out", run,
            "--max-steps", "4", "--batch", "4", "--threads", "1", "--checkpoint-every", "1");
        Assert.That(code, Is.EqualTo(0), err);
        return (run, Path.Combine(run, RunLayout.Checkpoint));
    }

    /// <summary>Rewrites the run's checkpoint with one change to its tensors or metadata.</summary>
    static void Corrupt(string path, Action<Dictionary<string, SafeTensor>, Dictionary<string, string>> change)
    {
        var (tensors, meta) = SafeTensorsFile.Read(path);
        change(tensors, meta);
        SafeTensorsFile.Write(path, tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal), meta);
    }

    static string FirstParam(Dictionary<string, SafeTensor> t) => t.Keys.Where(k => k.Contains("lora_A")).Order(StringComparer.Ordinal).First();

    // (case, the corruption, what the one-line error names)
    static readonly (string Case, Action<Dictionary<string, SafeTensor>, Dictionary<string, string>> Change, string Expected)[] Corruptions =
    [
        ("negative step", (_, m) => m["step"] = "-3", "'step' is '-3'"),
        ("step not a number", (_, m) => m["step"] = "3.5", "'step' is '3.5'"),
        ("NaN in a parameter", (t, _) => { var k = FirstParam(t); var v = t[k].ToFloats(); v[1] = float.NaN; t[k] = SafeTensor.FromFloats(t[k].Shape, v); }, "non-finite value (element 1)"),
        ("∞ in a moment", (t, _) => { var k = t.Keys.First(n => n.EndsWith(".exp_avg_sq", StringComparison.Ordinal)); var v = t[k].ToFloats(); v[0] = float.PositiveInfinity; t[k] = SafeTensor.FromFloats(t[k].Shape, v); }, "non-finite value (element 0)"),
        ("transposed parameter", (t, _) => { var k = FirstParam(t); t[k] = t[k] with { Shape = [t[k].Shape[1], t[k].Shape[0]] }; }, "lora_A.weight' is ["),
        ("missing AdamW moment", (t, _) => t.Remove(t.Keys.First(n => n.EndsWith(".exp_avg", StringComparison.Ordinal))), "lacks tensor"),
        ("unknown tensor", (t, _) => t["transformer.h.0.attn.c_attn.lora_C.weight"] = SafeTensor.FromFloats([2], [1, 2]), "'transformer.h.0.attn.c_attn.lora_C.weight' is not a parameter"),
        ("F16 tensor", (t, _) => { var k = FirstParam(t); t[k] = t[k] with { DType = "F16", Data = t[k].Data[..(t[k].Data.Length / 2)] }; }, "is F16"),
    ];

    static IEnumerable<TestCaseData> CorruptionCases() => Corruptions.Select((c, i) => new TestCaseData(i).SetName($"AResumeFromACorruptCheckpointIsRefusedAndChangesNothing({c.Case})"));

    [TestCaseSource(nameof(CorruptionCases))]
    public void AResumeFromACorruptCheckpointIsRefusedAndChangesNothing(int index)
    {
        var (_, change, expected) = Corruptions[index];
        using var dir = new TempDir();
        var (run, checkpoint) = Run(dir);
        Corrupt(checkpoint, change);
        Tree.FailsCleanly(dir.Path, expected, "train", "--resume", run);
        var err = CliRunner.Run("train", "--resume", run).Err;
        Assert.That(err, Does.Contain(RunLayout.Checkpoint), "the file is named");
    }

    [Test]
    public void ADivergingRunStopsWithACleanErrorAndKeepsItsLastGoodCheckpoint()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 32, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        var run = dir.File("run");
        // lr 1e30 (finite, so accepted) blows the parameters up within a few steps; clipping off
        var (code, _, err) = CliRunner.Run("train", "--model", rewrite, "--data", dir.File("train.jsonl"), "--format", "tokens", "--out", run,
            "--max-steps", "20", "--batch", "4", "--threads", "1", "--checkpoint-every", "1", "--lr", "1e30", "--optimizer", "sgd", "--weight-decay", "0");
        TestContext.Out.WriteLine(err);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err.TrimEnd().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(err, Does.Match("non-finite|loss is|gradient norm is"));
        var checkpoint = Checkpoint.Load(Path.Combine(run, RunLayout.Checkpoint));   // loads: every value finite
        Assert.That(checkpoint.Step, Is.GreaterThanOrEqualTo(1).And.LessThan(20));
        Assert.That(File.Exists(Path.Combine(run, RunLayout.Adapter)), Is.False, "no adapter from a diverged run");
    }

    [Test]
    public void ACheckpointWithANonFiniteValueIsNeverWritten()
    {
        using var dir = new TempDir();
        var path = dir.File("checkpoint.safetensors");
        Checkpoint Make(float value) => new() { Step = 3, Epoch = 0, BatchInEpoch = 3, Tensors = new Dictionary<string, SafeTensor> { ["w"] = SafeTensor.FromFloats([2], [1, value]) } };
        Make(2).Save(path);
        var good = File.ReadAllBytes(path);
        var e = Assert.Throws<InvalidDataException>(() => Make(float.NaN).Save(path));
        Assert.That(e!.Message, Does.Contain("'w'").And.Contain(path));
        Assert.That(File.ReadAllBytes(path), Is.EqualTo(good));
    }

    /// <summary>
    /// A write that fails half-way (an injected IOException standing in for a full disk: the tests run as root, where a
    /// read-only folder does not stop a write) keeps the previous checkpoint whole and leaves no temp file.
    /// </summary>
    [Test]
    public void AWriteThatFailsHalfWayKeepsThePreviousFile()
    {
        using var dir = new TempDir();
        var path = dir.File("checkpoint.safetensors");
        new Checkpoint { Step = 1, Epoch = 0, BatchInEpoch = 1, Tensors = new Dictionary<string, SafeTensor> { ["w"] = SafeTensor.FromFloats([2], [1, 2]) } }.Save(path);
        var good = File.ReadAllBytes(path);
        Assert.Throws<IOException>(() => AtomicFile.Write(path, s => { s.Write(good, 0, good.Length / 2); throw new IOException("No space left on device"); }));
        Assert.That(File.ReadAllBytes(path), Is.EqualTo(good));
        Assert.That(Checkpoint.Load(path).Step, Is.EqualTo(1));
        Assert.That(Directory.GetFiles(dir.Path), Is.EqualTo(new[] { path }), "no temp file left");
    }

    [Test]
    public void ATruncatedLastMetricsRowFromAKillIsDroppedOnResume()
    {
        using var dir = new TempDir();
        var (run, _) = Run(dir);
        var metrics = Path.Combine(run, RunLayout.Metrics);
        var rows = File.ReadAllLines(metrics).Length;
        File.AppendAllText(metrics, "{\"kind\":\"train\",\"st");   // what a kill -9 mid-append leaves
        var (code, _, err) = CliRunner.Run("train", "--resume", run);
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(File.ReadAllLines(metrics), Has.Length.EqualTo(rows));
    }

    // the optimizer model loads after the train model; initial_params.onnx after both sessions and the device buffers
    [TestCase("optimizer")]
    [TestCase("initial_params")]
    public void ATrainingSessionWhoseLaterFileIsCorruptFailsCleanlyAndReleasesWhatItOpened(string file)
    {
        using var dir = new TempDir();
        var (run, _) = Run(dir);
        var artifacts = Path.Combine(run, RunLayout.ArtifactsDir);
        var corrupt = Path.Combine(artifacts, TrainingArtifacts.LoadSpec(artifacts).Files[file]);
        File.WriteAllBytes(corrupt, [1, 2, 3, 4, 5]);
        Microsoft.ML.OnnxRuntime.SessionOptions? options = null;
        var e = Assert.Catch(() => TrainingSession.Create(artifacts, ExecutionDevice.Parse("cpu"), 1, o => options = o));
        Assert.That(e, Is.InstanceOf<InvalidDataException>().Or.InstanceOf<OnnxFormatException>());
        Assert.That(e!.Message, Does.Contain(file == "optimizer" ? artifacts : corrupt));
        Assert.That(options!.IsClosed, Is.True, "the session options (disposed last, after the sessions opened before the failure) are released");
    }
}

/// <summary>The dropout generator's state travels in the checkpoint: a resumed run with LoRA dropout continues the same curve.</summary>
public class OutputsDropoutResumeTests
{
    [Test]
    public void AResumedRunWithDropoutContinuesTheSameLossCurve()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 32, 1);
        var rewrite = dir.File("rw");
        OnnxLora.GraphRewrite.Lora.LoraRewrite.RewriteFile(Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "tiny.onnx"),
            new OnnxLora.GraphRewrite.Lora.LoraConfig { Rank = 8, Alpha = 16, TargetModules = ["c_attn", "c_fc"], Dropout = 0.3, Seed = 5 }, rewrite);
        TrainOptions Options(string run) => new()
        {
            ModelDir = rewrite, DataPath = dir.File("train.jsonl"), Format = Pipeline.Data.DataFormat.Tokens, OutDir = dir.File(run),
            Epochs = 3, BatchSize = 4, GradAccum = 2, Lr = 1e-2, Threads = 1, Seed = 3, CheckpointEvery = 0,
        };
        var whole = Trainer.Train(Options("whole"));

        using var stop = new CancellationTokenSource();
        var split = Options("split");
        Assert.Throws<OperationCanceledException>(() => Trainer.Train(split, new Stop(p => { if (p.Step == 5) stop.Cancel(); }), stop.Token));
        Assert.That(Checkpoint.Load(Path.Combine(split.OutDir, RunLayout.Checkpoint)).RngState, Is.EqualTo(10UL), "5 steps × 2 micro-batches drew 10 masks per Dropout");
        var resumed = Trainer.Resume(split.OutDir);
        Assert.That(resumed.Steps, Is.EqualTo(whole.Steps));
        Assert.That(Losses(split.OutDir), Is.EqualTo(Losses(whole.RunDir)), "one thread: the resumed curve is bit-identical, masks included");
    }

    static double[] Losses(string run) =>
        File.ReadLines(Path.Combine(run, RunLayout.Metrics)).Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!.AsObject())
            .Where(o => (string)o["kind"]! == "train").Select(o => (double)o["loss"]!).ToArray();

    sealed class Stop(Action<TrainProgress> report) : IProgress<TrainProgress>
    {
        public void Report(TrainProgress value) => report(value);
    }
}
