using System.Diagnostics;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Runner;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Runner;

/// <summary>`onnxlora run`: the demo's effect on a shorter config, resuming after an interruption, config errors.</summary>
[NonParallelizable]
public class PipelineRunnerTests
{
    /// <summary>The built-in default in a test folder, on two threads (the demo itself is already short).</summary>
    static PipelineConfig ShortDefault(string runDir, int epochs = 3)
    {
        var config = PipelineConfig.Parse(DemoData.DefaultConfig, "test", runDir);
        config.Override($"run_dir={runDir}");
        config.Override($"train.epochs={epochs}");
        config.Override("train.threads=2");
        return config;
    }

    [Test]
    public void TheAdaptedModelBeatsTheBaseAndDeploys()
    {
        using var dir = new TempDir();
        var report = new PipelineRunner(ShortDefault(dir.File("run"))).Run();
        TestContext.Out.WriteLine($"accuracy {report.BaseAccuracy:P1} → {report.AdaptedAccuracy:P1}, loss {report.BaseLoss:F3} → {report.AdaptedLoss:F3}");
        Assert.That(report.AdaptedAccuracy, Is.GreaterThan(report.BaseAccuracy!.Value + 0.25), "the adapter should clearly beat the untrained head");
        Assert.That(report.AdaptedLoss, Is.LessThan(report.BaseLoss * 0.7));
        Assert.That(report.DeployMaxAbsDiff, Is.LessThan(1e-4), "deploy.onnx + .onnx_adapter == merged.onnx");
        Assert.That(report.Examples, Has.Count.EqualTo(6));
        foreach (var path in report.Outputs.Values) Assert.That(File.Exists(path) || Directory.Exists(path), Is.True, path);
    }

    [Test]
    public void ARunKilledDuringTrainingResumesWithoutRedoingFinishedStages()
    {
        using var dir = new TempDir();
        var runDir = dir.File("run");
        using var stop = new CancellationTokenSource();
        var interrupting = new PipelineRunner(ShortDefault(runDir), trainProgress: new Stopper(p => { if (p.Step == 10) stop.Cancel(); }));
        Assert.Throws<OperationCanceledException>(() => interrupting.Run(stop.Token));
        Assert.That(Checkpoint.Load(Path.Combine(runDir, "train", RunLayout.Checkpoint)).Step, Is.EqualTo(10));

        var lines = new List<string>();
        var report = new PipelineRunner(ShortDefault(runDir), lines.Add).Run();
        Assert.That(report.Stages.Where(s => s.Skipped).Select(s => s.Stage), Is.SupersetOf(new[] { "model", "rewrite" }));
        Assert.That(lines, Has.Some.Contain("resuming"));
        Assert.That(report.AdaptedAccuracy, Is.GreaterThan(report.BaseAccuracy!.Value));

        var again = new PipelineRunner(ShortDefault(runDir)).Run();
        Assert.That(again.Stages.Where(s => s.Skipped).Select(s => s.Stage), Is.SupersetOf(new[] { "model", "rewrite", "train" }), "a finished run is reused whole");
    }

    [TestCase("trian:\n  lr: 1\n", "trian")]
    [TestCase("train:\n  lr_rate: 1\n", "train.lr_rate")]
    [TestCase("lora:\n  rnak: 4\n", "lora.rnak")]
    public void AConfigWithATypoFailsAtOnceNamingTheKey(string yaml, string key)
    {
        using var dir = new TempDir();
        var path = dir.File("bad.yaml");
        File.WriteAllText(path, yaml);
        var (code, _, error) = CliRunner.Run("run", path);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(error, Does.Contain($"'{key}'"));
        Assert.That(Directory.Exists(dir.File("runs")), Is.False, "nothing was started");
    }

    [TestCase("lora.scaling=sqrt", "lora.scaling: scaling must be peft, rslora or alpha (got 'sqrt')")]
    [TestCase("lora.init=zeros", "lora.init: init must be kaiming or gaussian")]
    [TestCase("data.task=seq2seq", "data.task: task must be lm or cls")]
    [TestCase("train.head=half", "train.head: head must be full or lora")]
    [TestCase("train.pooling=max", "train.pooling: pooling must be last, first or mean")]
    [TestCase("train.optimizer=lamb", "train.optimizer: optimizer must be adamw or sgd")]
    public void EnumKeysParseThroughTheSharedParsers(string assignment, string message)
    {
        using var dir = new TempDir();
        var config = ShortDefault(dir.File("run"));
        config.Override(assignment);
        Assert.That(() => new PipelineRunner(config).Validate(), Throws.TypeOf<InvalidDataException>().With.Message.Contains(message));
    }

    [Test]
    public void BadValuesFailBeforeAnyWork()
    {
        using var dir = new TempDir();
        var config = ShortDefault(dir.File("run"));
        config.Override("train.lr=fast");
        var e = Assert.Throws<InvalidDataException>(() => new PipelineRunner(config).Validate());
        Assert.That(e!.Message, Does.Contain("train.lr"));
        Assert.That(() => config.Override("train.lrr=1"), Throws.Exception.With.Message.Contain("train.lr"));
    }

    [Test]
    public void PackingAClassificationRunIsRefused()
    {
        using var dir = new TempDir();
        var config = ShortDefault(dir.File("run"));   // the built-in default is a cls run
        config.Override("data.pack=true");
        var e = Assert.Throws<InvalidDataException>(() => new PipelineRunner(config).Validate());
        Assert.That(e!.Message, Does.Contain("pack").And.Contain("cls"));
    }

    [Test]
    public void ModelInputRolesMapAnExportsInputsThroughEveryStage()
    {
        using var dir = new TempDir();
        var model = Signature.SignatureRolesTests.RenamedMaskModel(dir);   // attention_mask renamed segment_mask
        var data = dir.File("train.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 12).Select(i => $"{{\"input_ids\":[{string.Join(",", Enumerable.Range(0, 4 + i % 5).Select(j => 10 + 13 * i + j))}]}}"));
        var config = PipelineConfig.Parse($"model:\n  path: {model}\n  input_roles: [segment_mask=attention_mask]\n" +
            $"data:\n  train: {data}\n  format: tokens\n  task: lm\ntrain:\n  max_steps: 2\n  lr: 1e-2\n  batch: 4\n  threads: 1\nexport:\n  formats: onnx-adapter,merged\n", "test", dir.Path);
        config.Override($"run_dir={dir.File("run")}");
        var report = new PipelineRunner(config).Run();
        var adapters = report.Outputs.Values.Where(p => p.EndsWith(".onnx_adapter", StringComparison.Ordinal)).ToList();
        Assert.That(adapters, Is.Not.Empty);
        Assert.That(adapters.Select(File.Exists), Has.All.True);
        Assert.That(report.AdaptedLoss, Is.LessThan(report.BaseLoss), "two steps on the training rows lower their loss");
        Assert.That(report.DeployMaxAbsDiff, Is.LessThan(1e-4), "deploy.onnx + .onnx_adapter == merged.onnx, both fed by role");

        config.Override("model.input_roles=segment_mask");
        Assert.That(() => new PipelineRunner(config).Validate(), Throws.TypeOf<InvalidDataException>().With.Message.Contains("model.input_roles"));
    }

    sealed class Stopper(Action<TrainProgress> report) : IProgress<TrainProgress>
    {
        public void Report(TrainProgress value) => report(value);
    }
}
