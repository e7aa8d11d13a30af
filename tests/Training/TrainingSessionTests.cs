using System.Text.Json;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Training;

/// <summary>The training session against PyTorch on the same weights, adapter init and batches (tests/fixtures/train).</summary>
public class TrainingSessionTests
{
    static string Fixture(params string[] parts) => Path.Combine([TestContext.CurrentContext.TestDirectory, "fixtures", .. parts]);

    /// <summary>Rewrites tiny.onnx as the golden script did and builds artifacts for <paramref name="optimizer"/>.</summary>
    internal static string BuildTinyArtifacts(TempDir dir, OptimizerKind optimizer)
    {
        var model = OnnxFile.Load(Fixture("tiny.onnx"));
        var config = new LoraConfig { Rank = 4, Alpha = 8, TargetModules = ["c_attn", "c_proj", "c_fc"] };
        var rewrite = LoraRewrite.Rewrite(model, config, "tiny.onnx", "");
        var artifacts = TrainingArtifacts.Build(rewrite.TrainingModel, rewrite.Manifest, new ArtifactOptions { Optimizer = optimizer });
        var path = dir.File("artifacts");
        artifacts.Save(path);
        return path;
    }

    static long[][] GoldenBatches(JsonElement golden) =>
        golden.GetProperty("batches").EnumerateArray()
            .Select(b => b.EnumerateArray().SelectMany(row => row.EnumerateArray().Select(x => x.GetInt64())).ToArray()).ToArray();

    [TestCase("sgd")]
    [TestCase("adamw")]
    public void First20LossesMatchPyTorch(string optimizer)
    {
        using var golden = JsonDocument.Parse(File.ReadAllText(Fixture("train", "tiny_lm_golden.json")));
        var g = golden.RootElement;
        var hp = g.GetProperty(optimizer).GetProperty("hyperparameters");
        var expected = g.GetProperty(optimizer).GetProperty("losses_float32").EnumerateArray().Select(x => x.GetDouble()).ToArray();

        using var dir = new TempDir();
        var artifacts = BuildTinyArtifacts(dir, optimizer == "sgd" ? OptimizerKind.Sgd : OptimizerKind.AdamW);
        using var session = TrainingSession.Create(artifacts, ExecutionDevice.Cpu, threads: 1);
        var (init, _) = SafeTensorsFile.Read(Fixture("train", "tiny_lora_init.safetensors"));
        foreach (var (name, t) in init) session.SetState(name, t.ToFloats());
        session.SetLearningRate(hp.GetProperty("lr").GetDouble());
        session.WeightDecay = hp.GetProperty("weight_decay").GetDouble();

        var batches = GoldenBatches(g);
        var losses = new List<double>();
        for (int s = 0; s < expected.Length; s++)
        {
            var ids = batches[s % batches.Length];
            var batch = new Batch(2, ids.Length / 2, ids, ids, [ids.Length / 2, ids.Length / 2], [-1, -1]);
            session.LazyResetGrad();
            losses.Add(session.TrainStep(batch).Loss);
            session.OptimizerStep();
        }
        var worst = Enumerable.Range(0, expected.Length).MaxBy(s => Math.Abs(losses[s] / expected[s] - 1));
        TestContext.Out.WriteLine($"{optimizer}: max relative loss difference {Math.Abs(losses[worst] / expected[worst] - 1):E2} at step {worst}");
        for (int s = 0; s < expected.Length; s++)
            Assert.That(losses[s], Is.EqualTo(expected[s]).Within(Math.Abs(expected[s]) * 1e-4),
                $"{optimizer} step {s}: ours {losses[s]:R}, PyTorch {expected[s]:R}");
        Assert.That(losses[^1], Is.LessThan(losses[0]), "the loss should fall");
    }
}
