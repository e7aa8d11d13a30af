using System.Diagnostics;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Training;
using OnnxLora.Tests.Training;

namespace OnnxLora.Tests.Reliability;

/// <summary>
/// kill -9 at seeded random moments of a real `onnxlora train` process (the tiny GPT, a checkpoint every step), again
/// and again: after each kill the last checkpoint loads, and the next start (a fresh one while no run config exists,
/// else --resume) is never blocked; the finished run has the uninterrupted run's loss curve, and no temp file is left.
/// </summary>
[NonParallelizable]
public class OutputsCrashTests
{
    const int Kills = 8, Steps = 200;

    static ProcessStartInfo Train(params string[] args) =>
        new("dotnet", [CliRunner.ToolPath, "train", .. args]) { RedirectStandardOutput = true, RedirectStandardError = true };

    static string[] FreshArgs(string rewrite, string data, string run) =>
        ["--model", rewrite, "--data", data, "--format", "tokens", "--out", run, "--max-steps", Steps.ToString(System.Globalization.CultureInfo.InvariantCulture),
         "--batch", "4", "--checkpoint-every", "1", "--threads", "1", "--lr", "1e-2"];

    static (int Code, string Err) RunToEnd(ProcessStartInfo start)
    {
        using var p = Process.Start(start)!;
        var err = p.StandardError.ReadToEndAsync();
        p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, err.Result);
    }

    static double[] TrainLosses(string run) =>
        File.ReadLines(Path.Combine(run, RunLayout.Metrics)).Select(l => JsonNode.Parse(l)!.AsObject())
            .Where(o => (string)o["kind"]! == "train").Select(o => (double)o["loss"]!).ToArray();

    [Test]
    public void KilledAtRandomMomentsARunAlwaysResumesAndFinishesWithTheSameCurve()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 64, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        var data = dir.File("train.jsonl");
        var reference = RunToEnd(Train(FreshArgs(rewrite, data, dir.File("whole"))));
        Assert.That(reference.Code, Is.EqualTo(0), reference.Err);

        var run = dir.File("run");
        var moments = new Random(20261203);
        var seen = new List<string>();
        for (int kill = 0; kill < Kills; kill++)
        {
            bool resume = File.Exists(Path.Combine(run, RunLayout.TrainConfig));
            using var process = Process.Start(resume ? Train("--resume", run) : Train(FreshArgs(rewrite, data, run)))!;
            _ = process.StandardOutput.ReadToEndAsync();
            _ = process.StandardError.ReadToEndAsync();
            // every fourth kill lands in start-up (config, artifacts, first checkpoint), the others while it trains and
            // checkpoints every step (~25 ms a step): after a newer checkpoint appears, within the next ~20 steps
            var checkpoint = Path.Combine(run, RunLayout.Checkpoint);
            if (kill % 4 == 0) Thread.Sleep(moments.Next(200, 2500));
            else
            {
                var before = File.Exists(checkpoint) ? File.GetLastWriteTimeUtc(checkpoint) : DateTime.MinValue;
                var wait = Stopwatch.StartNew();
                while (!process.HasExited && wait.Elapsed < TimeSpan.FromSeconds(60)
                       && (!File.Exists(checkpoint) || File.GetLastWriteTimeUtc(checkpoint) == before)) Thread.Sleep(5);
                Thread.Sleep(moments.Next(0, 500));
            }
            process.Kill();   // SIGKILL: no handler runs
            process.WaitForExit();

            if (File.Exists(checkpoint))
            {
                var c = Checkpoint.Load(checkpoint);   // never half-written: temp + rename
                seen.Add($"kill {kill}: step {c.Step}");
            }
            else seen.Add($"kill {kill}: {(Directory.Exists(run) ? "before the first checkpoint" : "before the run folder")}");
        }
        TestContext.Out.WriteLine(string.Join("\n", seen));

        var finish = File.Exists(Path.Combine(run, RunLayout.TrainConfig)) ? Train("--resume", run) : Train(FreshArgs(rewrite, data, run));
        var (code, err) = RunToEnd(finish);
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(Checkpoint.Load(Path.Combine(run, RunLayout.Checkpoint)).Step, Is.EqualTo(Steps));
        Assert.That(Directory.EnumerateFileSystemEntries(run, "*" + OutputFolder.TempInfix + "*", SearchOption.AllDirectories), Is.Empty, "no stale temp file");
        Assert.That(TrainLosses(run), Is.EqualTo(TrainLosses(dir.File("whole"))), "one clean curve, the uninterrupted run's (one thread: bit-identical)");
    }
}
