using System.Diagnostics;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Training;

/// <summary>`onnxlora train` as a user runs it.</summary>
[NonParallelizable]
public class TrainCliTests
{
    [Test]
    public void TrainsFromTheCommandLineAndPrintsASummary()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 16, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        var (code, output, error) = CliRunner.Run("train", "--model", rewrite, "--data", dir.File("train.jsonl"), "--format", "tokens",
            "--out", dir.File("run"), "--max-steps", "4", "--batch", "4", "--lr", "1e-2", "--threads", "1");
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain("training finished").And.Contain("tokens/s").And.Contain("loss.png"));
        Assert.That(File.Exists(Path.Combine(dir.File("run"), RunLayout.Adapter)), Is.True);
    }

    [TestCase("--batch", "0", "--batch")]
    [TestCase("--optimizer", "lamb", "--optimizer")]
    [TestCase("--device", "tpu", "--device")]
    [TestCase("--head", "half", "--head: head must be full or lora (got 'half')")]
    [TestCase("--pooling", "max", "--pooling: pooling must be last, first or mean")]
    public void BadFlagsAreOneLineErrors(string flag, string value, string named)
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 4, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        var (code, _, error) = CliRunner.Run("train", "--model", rewrite, "--data", dir.File("train.jsonl"), "--format", "tokens", "--out", dir.File("run"), flag, value);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(error.Trim().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(error, Does.StartWith("error:").And.Contain(named));
    }

    [Test]
    public void KillingARunLeavesTheLastCheckpointLoadable()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 64, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        var run = dir.File("run");
        var start = new ProcessStartInfo("dotnet", [CliRunner.ToolPath, "train", "--model", rewrite, "--data", dir.File("train.jsonl"), "--format", "tokens",
            "--out", run, "--epochs", "200", "--batch", "4", "--checkpoint-every", "1", "--threads", "1"])
        { RedirectStandardOutput = true, RedirectStandardError = true };
        using var process = Process.Start(start)!;
        var checkpoint = Path.Combine(run, RunLayout.Checkpoint);
        var clock = Stopwatch.StartNew();
        while (!File.Exists(checkpoint) && clock.Elapsed < TimeSpan.FromSeconds(60) && !process.HasExited) Thread.Sleep(50);
        Thread.Sleep(300);   // let it be in the middle of writing more checkpoints
        process.Kill(entireProcessTree: true);
        process.WaitForExit();
        Assert.That(File.Exists(checkpoint), Is.True, "no checkpoint appeared: " + process.StandardError.ReadToEnd());
        var c = Checkpoint.Load(checkpoint);
        Assert.That(c.Step, Is.GreaterThan(0));
        Assert.That(c.Tensors, Is.Not.Empty);
    }
}
