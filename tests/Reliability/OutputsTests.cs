using System.Security.Cryptography;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Runner;
using OnnxLora.Pipeline.Training;
using OnnxLora.Tests.Training;

namespace OnnxLora.Tests.Reliability;

/// <summary>Every file and folder under a root with its content hash: "nothing outside the given paths changed".</summary>
static class Tree
{
    public static SortedDictionary<string, string> Snapshot(string root)
    {
        var entries = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (var path in Directory.EnumerateFileSystemEntries(root, "*", new EnumerationOptions { RecurseSubdirectories = true, AttributesToSkip = FileAttributes.ReparsePoint }))
            entries[Path.GetRelativePath(root, path)] = Directory.Exists(path) ? "dir" : Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(path)));
        return entries;
    }

    /// <summary>Runs the CLI, expects exit 1 with one `error:` line that contains <paramref name="expected"/>, and the tree unchanged.</summary>
    public static void FailsCleanly(string root, string expected, params string[] args)
    {
        var before = Snapshot(root);
        var (code, stdout, err) = CliRunner.Run(args);
        Assert.That(code, Is.EqualTo(1), stdout + err);
        Assert.That(err.TrimEnd().Split('\n'), Has.Length.EqualTo(1), err);
        Assert.That(err, Does.StartWith("error: ").And.Contain(expected));
        Assert.That(Snapshot(root), Is.EqualTo(before), "nothing changed");
    }
}

/// <summary>The output policy (<see cref="OutputFolder"/>) as users meet it: no verb replaces what OnnxLora did not make.</summary>
[NonParallelizable]
public class OutputsTests
{
    static string Fixture(string name) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", name);

    /// <summary>A rewrite, data and a finished 2-step run in <paramref name="dir"/>: (rewrite, data, run).</summary>
    static (string Rewrite, string Data, string Run) FinishedRun(TempDir dir)
    {
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 8, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        var (code, _, err) = CliRunner.Run(TrainArgs(rewrite, dir.File("train.jsonl"), dir.File("run")));
        Assert.That(code, Is.EqualTo(0), err);
        return (rewrite, dir.File("train.jsonl"), dir.File("run"));
    }

    static string[] TrainArgs(string rewrite, string data, string run, params string[] extra) =>
        ["train", "--model", rewrite, "--data", data, "--format", "tokens", "--out", run, "--max-steps", "2", "--batch", "4", "--threads", "1", .. extra];

    [Test]
    public void RewriteRefusesAFolderItDidNotMakeAndOneThatHoldsItsInput()
    {
        using var dir = new TempDir();
        var (_, _, run) = FinishedRun(dir);
        var model = dir.File("models/base.onnx");
        Directory.CreateDirectory(dir.File("models"));
        File.Copy(Fixture("tiny.onnx"), model);
        File.WriteAllText(dir.File("models/lora_config.json"), "{}");   // looked like a rewrite output to the old check

        Tree.FailsCleanly(dir.Path, "holds an 'onnxlora train' output", "rewrite", model, "--out", run, "--overwrite");
        Tree.FailsCleanly(dir.Path, "holds the input", "rewrite", model, "--out", dir.File("models"), "--overwrite");
        Tree.FailsCleanly(dir.Path, "holds the input", "rewrite", model, "--out", dir.File("models") + "/", "--overwrite");
        Tree.FailsCleanly(dir.Path, "holds the input", "rewrite", model, "--out", dir.File("models/../models"), "--overwrite");
        Directory.CreateSymbolicLink(dir.File("link"), dir.File("models"));
        Tree.FailsCleanly(dir.Path, "holds the input", "rewrite", model, "--out", dir.File("link"), "--overwrite");
        Tree.FailsCleanly(dir.Path, "is the input", "rewrite", model, "--out", model);
    }

    [Test]
    public void ARewriteOutputIsReplacedOnlyWithOverwriteAndStaleTempsBesideItGo()
    {
        using var dir = new TempDir();
        var rw = TrainerTests.RewriteTiny(dir);
        Assert.That(OutputFolder.MarkerVerb(rw), Is.EqualTo(LoraRewrite.Verb));
        Tree.FailsCleanly(dir.Path, "pass --overwrite", "rewrite", Fixture("tiny.onnx"), "--out", rw, "--rank", "2");

        // what a killed rewrite leaves: a marked temp folder beside the output (removed), and a user's look-alike (kept)
        OutputFolder.Mark(rw + OutputFolder.TempInfix + "dead1234", LoraRewrite.Verb);
        Directory.CreateDirectory(rw + OutputFolder.TempInfix + "users");
        var (code, _, err) = CliRunner.Run("rewrite", Fixture("tiny.onnx"), "--out", rw, "--rank", "2", "--overwrite");
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(LoraManifest.Load(Path.Combine(rw, RunLayout.LoraConfig)).Rank, Is.EqualTo(2));
        Assert.That(Directory.GetDirectories(dir.Path).Select(Path.GetFileName).Order(), Is.EqualTo(new[] { "rw", "rw.tmp-users" }));
    }

    [Test]
    public void TrainRefusesAFolderThatIsNotARunAndLeavesItAlone()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 8, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        var mine = dir.File("mine");
        Directory.CreateDirectory(Path.Combine(mine, "artifacts"));
        File.WriteAllText(Path.Combine(mine, "artifacts", "notes.txt"), "mine");
        File.WriteAllText(Path.Combine(mine, RunLayout.Adapter), "my adapter");
        File.WriteAllText(Path.Combine(mine, RunLayout.LossPlot), "my plot");
        Tree.FailsCleanly(dir.Path, "was not written by onnxlora", TrainArgs(rewrite, dir.File("train.jsonl"), mine));
        Tree.FailsCleanly(dir.Path, "was not written by onnxlora", TrainArgs(rewrite, dir.File("train.jsonl"), mine, "--overwrite"));
        Tree.FailsCleanly(dir.Path, "lies inside the input", TrainArgs(rewrite, dir.File("train.jsonl"), Path.Combine(rewrite, "run")));
        Tree.FailsCleanly(dir.Path, "is the input", TrainArgs(rewrite, dir.File("train.jsonl"), dir.File("train.jsonl")));
    }

    [Test]
    public void AnEarlierRunIsReplacedOnlyWithOverwrite()
    {
        using var dir = new TempDir();
        var (rewrite, data, run) = FinishedRun(dir);
        Tree.FailsCleanly(dir.Path, "--resume", TrainArgs(rewrite, data, run));
        var (code, _, err) = CliRunner.Run(TrainArgs(rewrite, data, run, "--overwrite", "--seed", "7"));
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(TrainOptions.Load(run).Seed, Is.EqualTo(7));
    }

    [Test]
    public void AFailedStartLeavesNothingThatBlocksARetry()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 8, 1);
        File.WriteAllText(dir.File("bad.jsonl"), "{\"input_ids\": [1, 2, 100000]}\n");   // past the tiny model's 512 tokens
        var rewrite = TrainerTests.RewriteTiny(dir);
        Directory.CreateDirectory(dir.File("empty"));
        foreach (var run in new[] { dir.File("new"), dir.File("empty") })
        {
            bool existed = Directory.Exists(run);
            var (code, _, err) = CliRunner.Run(TrainArgs(rewrite, dir.File("bad.jsonl"), run));
            Assert.That(code, Is.EqualTo(1));
            Assert.That(err, Does.Contain("bad.jsonl"));
            Assert.That(Directory.Exists(run), Is.EqualTo(existed), "a new folder goes again, a given empty one stays");
            if (existed) Assert.That(Directory.EnumerateFileSystemEntries(run), Is.Empty);
            (code, _, err) = CliRunner.Run(TrainArgs(rewrite, dir.File("train.jsonl"), run));
            Assert.That(code, Is.EqualTo(0), "the same --out works again: " + err);
        }
    }

    [Test]
    public void ExportAndMergeNeverWriteIntoTheirInputsNorOverAFile()
    {
        using var dir = new TempDir();
        var (rewrite, _, run) = FinishedRun(dir);
        File.WriteAllText(dir.File("existing.txt"), "keep me");
        Tree.FailsCleanly(dir.Path, "lies inside the input", "export", run, "--out", Path.Combine(run, RunLayout.Checkpoint));
        Tree.FailsCleanly(dir.Path, "is the input", "export", run, "--out", run + "/", "--format", "peft");
        Tree.FailsCleanly(dir.Path, "exists; pass --overwrite", "export", run, "--out", dir.File("existing.txt"));
        Tree.FailsCleanly(dir.Path, "lies inside an 'onnxlora train' output", "export", Path.Combine(run, RunLayout.OnnxAdapter), "--model", rewrite,
            "--out", Path.Combine(run, RunLayout.Checkpoint), "--overwrite");
        Directory.CreateDirectory(dir.File("mine"));
        File.WriteAllText(dir.File("mine/adapter_config.json"), "{}");
        Tree.FailsCleanly(dir.Path, "was not written by onnxlora", "export", run, "--out", dir.File("mine"), "--format", "peft", "--overwrite");
        Tree.FailsCleanly(dir.Path, "is the input", "export", run, "--out", rewrite, "--format", "peft", "--overwrite");
        var adapter = Path.Combine(run, RunLayout.OnnxAdapter);
        Tree.FailsCleanly(dir.Path, "lies inside the input", "merge", "--model", rewrite, "--adapter", adapter, "--out", Path.Combine(rewrite, "deploy.onnx"), "--overwrite");
        Tree.FailsCleanly(dir.Path, "lies inside the input", "merge", "--model", rewrite, "--adapter", adapter, "--out", rewrite + "/../rw/model.onnx", "--overwrite");
        Tree.FailsCleanly(dir.Path, "exists; pass --overwrite", "merge", "--model", rewrite, "--adapter", adapter, "--out", dir.File("existing.txt"));

        Assert.That(CliRunner.Run("export", run, "--out", dir.File("existing.txt"), "--overwrite").Code, Is.EqualTo(0));
        Assert.That(File.ReadAllText(dir.File("existing.txt")), Is.Not.EqualTo("keep me"));
        var peft = dir.File("peft");
        Assert.That(CliRunner.Run("export", run, "--out", peft, "--format", "peft").Code, Is.EqualTo(0));
        Tree.FailsCleanly(dir.Path, "pass --overwrite", "export", run, "--out", peft, "--format", "peft");
        Assert.That(CliRunner.Run("export", run, "--out", peft, "--format", "peft", "--overwrite").Code, Is.EqualTo(0));
    }

    [Test]
    public void ModelBuildRefusesAnExistingFileAndItsWeights()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir.File("model.onnx"), "not ours");
        Tree.FailsCleanly(dir.Path, "exists; pass --overwrite", "model", "build", "--preset", "tiny", "--out", dir.File("model.onnx"));
        Tree.FailsCleanly(dir.Path, "is the input", "model", "build", "--weights", dir.File("model.onnx"), "--out", dir.File("sub/../model.onnx"), "--overwrite");
    }

    [Test]
    public void ResumeRemovesTheTempFilesAKilledRunLeft()
    {
        using var dir = new TempDir();
        var (_, _, run) = FinishedRun(dir);
        var stale = new[]
        {
            Path.Combine(run, RunLayout.Checkpoint + ".tmp-123-0123456789abcdef"),
            Path.Combine(run, RunLayout.ArtifactsDir, "train.onnx.tmp-9-aa"),
        };
        foreach (var f in stale) File.WriteAllText(f, "half a file");
        Directory.CreateDirectory(Path.Combine(run, RunLayout.ArtifactsDir + ".tmp-deadbeef"));
        var (code, _, err) = CliRunner.Run("train", "--resume", run);
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(Directory.EnumerateFileSystemEntries(run, "*.tmp-*", SearchOption.AllDirectories), Is.Empty);
    }

    [Test]
    public void RunRefusesAFolderItDidNotMakeAndNeverDeletesATrainFolderItDidNotMake()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 8, 1);
        var config = dir.File("run.yaml");
        File.WriteAllText(config, $"""
            run_dir: {dir.File("runs")}
            model:
              path: {Fixture("tiny.onnx")}
            lora:
              rank: 2
              targets: [c_attn]
            data:
              train: {dir.File("train.jsonl")}
              format: tokens
              task: lm
            train:
              max_steps: 1
              batch: 4
              threads: 1
            export:
              formats: [onnx-adapter]
            evaluate:
              examples: 0
            """);
        Directory.CreateDirectory(dir.File("runs"));
        File.WriteAllText(dir.File("runs/thesis.tex"), "years of work");
        Tree.FailsCleanly(dir.Path, "was not written by onnxlora", "run", config);
        Tree.FailsCleanly(dir.Path, "holds the input", "run", config, "--out", dir.Path + "/./");

        File.Delete(dir.File("runs/thesis.tex"));
        OutputFolder.Mark(dir.File("runs"), "run");
        Directory.CreateDirectory(dir.File("runs/train"));
        File.WriteAllText(dir.File("runs/train/notes.txt"), "mine");
        var (code, _, err) = CliRunner.Run("run", config);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.Contain("train").And.Contain("was not written by onnxlora"));
        Assert.That(File.ReadAllText(dir.File("runs/train/notes.txt")), Is.EqualTo("mine"));

        Directory.Delete(dir.File("runs/train"), recursive: true);
        (code, var stdout, err) = CliRunner.Run("run", config);
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(stdout, Does.Not.Contain("Δlogit"), "no merged export: no deploy check, and no NaN printed for it");
        var stages = dir.File("runs/stages.json");
        var saved = File.ReadAllText(stages);
        File.WriteAllText(stages, "[1, 2");
        Tree.FailsCleanly(dir.Path, "stages.json: not valid JSON", "run", config);
        File.WriteAllText(stages, saved);
        File.WriteAllText(config, File.ReadAllText(config).Replace("max_steps: 1", "max_steps: 2"));
        (code, _, err) = CliRunner.Run("run", config);
        Assert.That(code, Is.EqualTo(0), "its own train/ of another config is replaced: " + err);
        Assert.That(Checkpoint.Load(dir.File("runs/train/" + RunLayout.Checkpoint)).Step, Is.EqualTo(2));
    }
}

/// <summary>Single-file outputs: the temp a killed writer left beside a file goes with the next write of that file.</summary>
public class OutputsStaleFileTests
{
    [Test]
    public void TheNextWriteRemovesADeadWritersTempAndKeepsEverythingElse()
    {
        using var dir = new TempDir();
        var target = dir.File("task.onnx_adapter");
        var dead = target + ".tmp-999999999-" + new string('a', 32);                            // no such process
        var live = target + $".tmp-{Environment.ProcessId}-" + new string('b', 32);            // a writer still running
        var users = target + ".tmp-notes";                                                     // not our pattern
        foreach (var f in new[] { dead, live, users }) File.WriteAllText(f, "x");
        AtomicFile.WriteAllText(target, "new");
        Assert.That(Directory.GetFiles(dir.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal),
            Is.EqualTo(new[] { Path.GetFileName(target), Path.GetFileName(live), Path.GetFileName(users) }.Order(StringComparer.Ordinal)));
    }
}
