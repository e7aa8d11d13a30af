using System.Diagnostics;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;

namespace OnnxLora.Tests.Autodiff;

/// <summary>
/// Step timings of the artifacts on a GPT-2-124M-shaped model (random weights), LoRA r=16 on every linear:
/// eval (forward + loss), train (forward + loss + backward) with and without in-graph accumulation, and the
/// optimizer. Explicit: minutes on 2 cores. Set ONNXLORA_BENCH_TASK=lm for the full-vocabulary LM step.
/// </summary>
[Explicit("benchmark: run by hand")]
public class ArtifactBenchmark
{
    [Test]
    public void Gpt2LoraStepTimes()
    {
        var lm = Environment.GetEnvironmentVariable("ONNXLORA_BENCH_TASK") == "lm";
        int batch = 8, seq = lm ? 128 : 120, reps = int.Parse(Environment.GetEnvironmentVariable("ONNXLORA_BENCH_REPS") ?? "3");
        var config = GptConfig.Preset("gpt2");
        var r = LoraRewrite.Rewrite(GptBuilder.Build(config, GptWeights.Random(config, 0)), new LoraConfig { Rank = 16, Alpha = 16 }, "gpt2", "0");
        var log = TestContext.Out;
        foreach (var accumulate in new[] { false, true })
        {
            var sw = Stopwatch.StartNew();
            var art = TrainingArtifacts.Build(r.TrainingModel, r.Manifest, new ArtifactOptions
            {
                Task = lm ? TrainingTask.Lm : TrainingTask.Cls, Classes = 2, AccumulateGradients = accumulate,
            });
            log.WriteLine($"artifacts built in {sw.Elapsed.TotalSeconds:F1} s; train nodes {art.TrainModel.Graph.Node.Count}, eval nodes {art.EvalModel.Graph.Node.Count}, params {art.Spec.Params.Sum(p => p.Shape.Aggregate(1L, (a, b) => a * b)):N0}");
            var rng = new Random(1);
            var ids = Enumerable.Range(0, batch * seq).Select(_ => (long)rng.Next(config.VocabSize)).ToArray();
            var feeds = new Dictionary<string, (Array, long[])> { ["input_ids"] = (ids, [batch, seq]) };
            if (lm) feeds["labels"] = (ids, [batch, seq]);
            else { feeds["labels"] = (new long[batch], [batch]); feeds["lengths"] = (Enumerable.Repeat((long)seq, batch).ToArray(), [batch]); }
            foreach (var p in art.Spec.Params) feeds[p.Name] = (new float[p.Shape.Aggregate(1L, (a, b) => a * b)].Select(_ => 0.01f).ToArray(), p.Shape);
            var trainFeeds = new Dictionary<string, (Array, long[])>(feeds);
            if (accumulate)
            {
                trainFeeds[TrainingArtifacts.ResetGrad] = (new[] { false }, []);
                foreach (var p in art.Spec.Params) trainFeeds[TrainingArtifacts.GradIn(p.Name)] = (new float[p.Shape.Aggregate(1L, (a, b) => a * b)], p.Shape);
            }
            using var train = new InferenceSession(art.TrainModel.ToByteArray());
            var gradNames = art.Spec.Params.Select(p => Optimizers.Grad(p.Name)).ToArray();
            log.WriteLine($"train (accumulate={accumulate}): {Time(() => ArtifactTests.Run(train, trainFeeds, [TrainingArtifacts.Loss, .. gradNames]), reps)}");
            if (accumulate) continue;
            using (var eval = new InferenceSession(art.EvalModel.ToByteArray()))
                log.WriteLine($"eval: {Time(() => ArtifactTests.Run(eval, feeds, TrainingArtifacts.Loss), reps)}");
            using var opt = new InferenceSession(art.OptimizerModel.ToByteArray());
            var of = new Dictionary<string, (Array, long[])>
            {
                [Optimizers.LearningRate] = (new[] { 1e-3f }, []), [Optimizers.WeightDecay] = (new[] { 0.1f }, []),
                [Optimizers.GradScale] = (new[] { 1f }, []), [Optimizers.MaxGradNorm] = (new[] { 1f }, []), [Optimizers.Step] = (new[] { 1L }, []),
            };
            foreach (var p in art.Spec.Params)
                foreach (var n in p.Moments.Prepend(p.Name).Append(Optimizers.Grad(p.Name))) of[n] = ((float[])feeds[p.Name].Item1, p.Shape);
            var outNames = art.Spec.Params.SelectMany(p => p.Moments.Prepend(p.Name)).Select(Optimizers.Updated).ToArray();
            log.WriteLine($"optimizer: {Time(() => ArtifactTests.Run(opt, of, outNames), reps * 3)}");
        }
    }

    static string Time(Action step, int reps)
    {
        step();   // warm-up
        var times = new List<double>();
        for (int i = 0; i < reps; i++) { var sw = Stopwatch.StartNew(); step(); times.Add(sw.Elapsed.TotalSeconds); }
        return $"min {times.Min():F3} s, mean {times.Average():F3} s over {reps}";
    }
}
