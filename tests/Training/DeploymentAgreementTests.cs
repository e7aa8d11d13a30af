using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.Pipeline.Training;
using TrainingSession = OnnxLora.Pipeline.Training.TrainingSession;

namespace OnnxLora.Tests.Training;

/// <summary>A trained tiny adapter gives the same logits in every place it can run.</summary>
public class DeploymentAgreementTests
{
    [Test]
    public void DeployableWithAdapterEqualsMergedEqualsTheTrainingSessionsEvalForward()
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 32, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        var result = Trainer.Train(new TrainOptions
        {
            ModelDir = rewrite, DataPath = dir.File("train.jsonl"), Format = DataFormat.Tokens, OutDir = dir.File("run"),
            MaxSteps = 6, BatchSize = 8, Lr = 2e-2, Threads = 1,
        });
        var manifest = LoraManifest.Load(Path.Combine(rewrite, RunLayout.LoraConfig));
        var adapter = AdapterFiles.ReadSafeTensors(result.AdapterPath, manifest);
        Assert.That(adapter.LoraTensors.Where(kv => kv.Key.EndsWith("lora_B.weight")).Max(kv => kv.Value.Data.Max(Math.Abs)), Is.GreaterThan(1e-3), "training moved B off zero");

        long[] ids = [3, 6, 9, 12, 15, 18, 21, 24, 27, 30];
        var batch = new Batch(1, ids.Length, ids, ids, [ids.Length], [-1]);

        // 1. the training session's eval forward, with the trained parameters
        using var session = TrainingSession.Create(Path.Combine(result.RunDir, RunLayout.ArtifactsDir), ExecutionDevice.Cpu, threads: 1);
        foreach (var (name, t) in adapter.LoraTensors) session.SetState(name, t.Data);
        var evalLogits = session.EvalStep(batch, withLogits: true).Logits!;

        // 2. deploy.onnx + adapter.onnx_adapter through ORT's OrtLoraAdapter
        using var host = AdapterHost.Create(Path.Combine(rewrite, RunLayout.DeployableModel));
        host.AddAdapter("trained", Path.Combine(result.RunDir, RunLayout.OnnxAdapter));
        using var input = OrtValue.CreateTensorValueFromMemory(ids, [1, ids.Length]);
        using var deployed = host.Run("trained", new Dictionary<string, OrtValue> { ["input_ids"] = input }, ["logits"]);
        using var baseRun = host.Run(null, new Dictionary<string, OrtValue> { ["input_ids"] = input }, ["logits"]);

        // 3. the merged model in plain ORT
        var merged = dir.File("merged.onnx");
        AdapterFiles.Write(adapter, AdapterFormat.Merged, merged, rewrite);
        using var mergedSession = new InferenceSession(merged);
        using var options = new RunOptions();
        using var mergedOut = mergedSession.Run(options, ["input_ids"], [input], ["logits"]);

        var deployedLogits = deployed[0].GetTensorDataAsSpan<float>().ToArray();
        var mergedLogits = mergedOut[0].GetTensorDataAsSpan<float>().ToArray();
        Assert.That(MaxAbsDiff(deployedLogits, mergedLogits), Is.LessThan(1e-4), "deployable + .onnx_adapter vs merged");
        Assert.That(MaxAbsDiff(evalLogits, mergedLogits), Is.LessThan(1e-4), "training session eval forward vs merged");
        Assert.That(MaxAbsDiff(baseRun[0].GetTensorDataAsSpan<float>().ToArray(), mergedLogits), Is.GreaterThan(1e-3), "the adapter changes the outputs");
    }

    static double MaxAbsDiff(float[] a, float[] b)
    {
        Assert.That(a, Has.Length.EqualTo(b.Length));
        double max = 0;
        for (int i = 0; i < a.Length; i++) max = Math.Max(max, Math.Abs(a[i] - b[i]));
        return max;
    }
}
