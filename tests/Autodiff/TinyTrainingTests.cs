using System.Text.Json;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Onnx;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;

namespace OnnxLora.Tests.Autodiff;

/// <summary>
/// 20 training steps on the builder's tiny model with the artifacts alone (train model → optimizer model, state
/// carried in a loop) against PyTorch's losses from tests/fixtures/train (make_train_golden.py): same LoRA init,
/// batches and hyperparameters; float32 losses compared to 1e-4 relative.
/// </summary>
public class TinyTrainingTests
{
    static string Fixture(params string[] parts) => Path.Combine([TestContext.CurrentContext.TestDirectory, "fixtures", .. parts]);

    [TestCase("sgd")]
    [TestCase("adamw")]
    public void LossesMatchPyTorch(string optimizer)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Fixture("train", "tiny_lm_golden.json")));
        var root = doc.RootElement;
        var lora = root.GetProperty("lora");
        var config = new LoraConfig
        {
            Rank = lora.GetProperty("rank").GetInt32(), Alpha = lora.GetProperty("alpha").GetDouble(),
            TargetModules = lora.GetProperty("targets").EnumerateArray().Select(t => t.GetString()!).ToList(),
        };
        var (init, _) = SafeTensorsFile.Read(Fixture("train", "tiny_lora_init.safetensors"));
        var hp = root.GetProperty(optimizer).GetProperty("hyperparameters");
        var batches = root.GetProperty("batches").EnumerateArray()
            .Select(b => b.EnumerateArray().SelectMany(r => r.EnumerateArray().Select(x => x.GetInt64())).ToArray()).ToList();
        var golden = root.GetProperty(optimizer).GetProperty("losses_float32").EnumerateArray().Select(x => x.GetDouble()).ToList();
        long seq = batches[0].Length / 2;
        var feeds = batches.Select(ids => new Dictionary<string, (Array, long[])> { ["input_ids"] = (ids, [2, seq]), ["labels"] = (ids, [2, seq]) }).ToList();
        var losses = Train(OnnxFile.Load(Fixture("tiny.onnx")), config, init, feeds, optimizer == "adamw" ? OptimizerKind.AdamW : OptimizerKind.Sgd,
                           (float)hp.GetProperty("lr").GetDouble(), (float)hp.GetProperty("weight_decay").GetDouble(), golden.Count);
        for (int step = 0; step < golden.Count; step++)
            Assert.That(losses[step], Is.EqualTo(golden[step]).Within(1e-4 * golden[step]), $"{optimizer} step {step + 1}: loss {losses[step]:R} vs PyTorch {golden[step]:R}");
    }

    /// <summary>
    /// Rewrites <paramref name="model"/>, builds the artifacts and runs <paramref name="steps"/> train + optimizer steps,
    /// step s feeding <paramref name="batches"/>[s % count] (every graph input but the parameters, plus labels), A/B
    /// starting from <paramref name="init"/> (<c>&lt;module&gt;.lora_A/B.weight</c>). Returns the loss of each step.
    /// </summary>
    internal static List<double> Train(ModelProto model, LoraConfig config, IReadOnlyDictionary<string, SafeTensor> init,
                                       IReadOnlyList<Dictionary<string, (Array, long[])>> batches, OptimizerKind kind, float lr, float wd, int steps)
    {
        var rewrite = LoraRewrite.Rewrite(model, config, "model.onnx", "0");
        Assert.That(rewrite.Manifest.Targets.Select(t => t.Module), Is.EquivalentTo(config.TargetModules));
        var art = TrainingArtifacts.Build(rewrite.TrainingModel, rewrite.Manifest, new ArtifactOptions { Optimizer = kind, AccumulateGradients = false });
        var state = new Dictionary<string, float[]>();
        foreach (var t in rewrite.Manifest.Targets)
        {
            state[t.LoraA] = init[t.Module + ".lora_A.weight"].ToFloats();
            state[t.LoraB] = init[t.Module + ".lora_B.weight"].ToFloats();
        }
        foreach (var p in art.Spec.Params)
            foreach (var m in p.Moments) state[m] = new float[p.Shape.Aggregate(1L, (a, b) => a * b)];

        using var train = new InferenceSession(art.TrainModel.ToByteArray());
        using var opt = new InferenceSession(art.OptimizerModel.ToByteArray());
        var losses = new List<double>();
        for (int step = 0; step < steps; step++)
        {
            var feeds = new Dictionary<string, (Array, long[])>(batches[step % batches.Count]);
            foreach (var p in art.Spec.Params) feeds[p.Name] = (state[p.Name], p.Shape);
            var outs = ArtifactTests.Run(train, feeds, [TrainingArtifacts.Loss, .. art.Spec.Params.Select(p => Optimizers.Grad(p.Name))]);
            losses.Add(outs[TrainingArtifacts.Loss][0]);

            var of = new Dictionary<string, (Array, long[])>
            {
                [Optimizers.LearningRate] = (new[] { lr }, []), [Optimizers.WeightDecay] = (new[] { wd }, []),
                [Optimizers.GradScale] = (new[] { 1f }, []), [Optimizers.MaxGradNorm] = (new[] { float.PositiveInfinity }, []),
                [Optimizers.Step] = (new[] { (long)step + 1 }, []),
            };
            foreach (var p in art.Spec.Params)
            {
                of[p.Name] = (state[p.Name], p.Shape);
                of[Optimizers.Grad(p.Name)] = (outs[Optimizers.Grad(p.Name)], p.Shape);
                foreach (var m in p.Moments) of[m] = (state[m], p.Shape);
            }
            var names = art.Spec.Params.SelectMany(p => p.Moments.Prepend(p.Name)).ToList();
            var updated = ArtifactTests.Run(opt, of, names.Select(Optimizers.Updated).ToArray());
            foreach (var n in names) state[n] = updated[Optimizers.Updated(n)];
        }
        return losses;
    }
}
