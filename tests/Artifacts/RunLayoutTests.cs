using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Training;
using OnnxLora.Tests.Training;

namespace OnnxLora.Tests.Artifacts;

/// <summary>The folders the rewrite and a training run leave hold exactly the files <see cref="RunLayout"/> names.</summary>
public class RunLayoutTests
{
    [Test]
    public void RewriteAndRunFoldersHoldTheLayoutsFiles()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 8, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        Assert.That(Names(rewrite), Is.EquivalentTo(new[] { RunLayout.TrainingModel, RunLayout.DeployableModel, RunLayout.LoraConfig, OutputFolder.MarkerFile }));

        var run = dir.File("run");
        Trainer.Train(new TrainOptions { ModelDir = rewrite, DataPath = dir.File("train.jsonl"), Format = DataFormat.Tokens, OutDir = run, MaxSteps = 2, BatchSize = 4, Threads = 1 });
        Assert.That(Names(run), Is.EquivalentTo(new[]
        {
            RunLayout.TrainConfig, RunLayout.LoraConfig, RunLayout.ArtifactsDir, RunLayout.Checkpoint, RunLayout.Metrics, RunLayout.LossPlot,
            RunLayout.Adapter, RunLayout.OnnxAdapter, OutputFolder.MarkerFile,
        }));
        Assert.That(Names(Path.Combine(run, RunLayout.ArtifactsDir)), Is.EquivalentTo(new[]
        {
            RunLayout.ArtifactsSpec, RunLayout.TrainModel, RunLayout.EvalModel, RunLayout.OptimizerModel, RunLayout.InitialParams,
        }));
        // the readers find the run by the same names: the adapter source and its rewrite folder
        var (adapter, rewriteDir) = AdapterFiles.ReadSource(run, null);
        Assert.That(rewriteDir, Is.EqualTo(rewrite), "train_config.json names the rewrite");
        Assert.That(adapter.LoraTensors.Keys, Is.EquivalentTo(adapter.Manifest.Targets.SelectMany(t => new[] { t.LoraA, t.LoraB })));
    }

    static IEnumerable<string> Names(string dir) => Directory.EnumerateFileSystemEntries(dir).Select(Path.GetFileName)!;
}
