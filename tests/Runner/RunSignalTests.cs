using System.Diagnostics;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Runner;

/// <summary>
/// `onnxlora run` stops on SIGTERM (what a batch system or a container stop sends) as `train` does: after the current
/// step, with a checkpoint, and the same command resumes from it.
/// </summary>
[NonParallelizable]
public class RunSignalTests
{
    [Test]
    public void SigtermStopsTheRunWithACheckpointAndTheNextRunResumes()
    {
        using var dir = new TempDir();
        var config = dir.File("run.yaml");
        File.WriteAllText(config, $$"""
            run_dir: {{dir.File("runs")}}
            model: { preset: small, seed: 0 }
            lora: { targets: all-linear, rank: 4, alpha: 8 }
            data: { generate: sentiment, task: cls, seq: 32 }
            train: { optimizer: adamw, lr: 1e-3, epochs: 1000, max_steps: 200, batch: 4, checkpoint_every: 1, threads: 1, seed: 1 }
            export: { formats: [onnx-adapter] }
            """);
        using var process = Process.Start(new ProcessStartInfo("dotnet", [CliRunner.ToolPath, "run", config])
            { RedirectStandardOutput = true, RedirectStandardError = true })!;
        var stderr = process.StandardError.ReadToEndAsync();
        _ = process.StandardOutput.ReadToEndAsync();
        var checkpoint = Path.Combine(dir.File("runs"), "train", RunLayout.Checkpoint);
        var clock = Stopwatch.StartNew();
        while (!File.Exists(checkpoint) && clock.Elapsed < TimeSpan.FromSeconds(120) && !process.HasExited) Thread.Sleep(100);
        Assert.That(process.HasExited, Is.False, "the run ended before it could be stopped: " + (process.HasExited ? stderr.Result : ""));
        using (var kill = Process.Start("kill", ["-TERM", process.Id.ToString()])) kill.WaitForExit();
        if (!process.WaitForExit(TimeSpan.FromSeconds(60)))
        {
            process.Kill(entireProcessTree: true);
            Assert.Fail("SIGTERM did not stop onnxlora run");
        }
        Assert.That(process.ExitCode, Is.EqualTo(130), "stopped after a step (as Ctrl+C), not killed by the signal: " + stderr.Result);
        Assert.That(stderr.Result, Does.Contain("interrupted after step"));
        var stoppedAt = Checkpoint.Load(checkpoint).Step;
        Assert.That(stoppedAt, Is.GreaterThan(0), stderr.Result);

        Assert.That(stoppedAt, Is.LessThan(200), "stopped before the end");

        // the same command picks the run up where it stopped and finishes it
        var (code, output, err) = CliRunner.Run("run", config);
        Assert.That(code, Is.Zero, err);
        Assert.That(output, Does.Contain("resuming the interrupted run"));
        Assert.That(Checkpoint.Load(checkpoint).Step, Is.EqualTo(200));
    }
}
