using System.Text.Json;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;

namespace OnnxLora.Tests.Autodiff;

/// <summary>ORT's per-node profile of one train step (GPT-2 widths, 2 layers), summed by op type. Run by hand.</summary>
[Explicit("profile: run by hand")]
public class ArtifactProfile
{
    [Test]
    public void TrainStepByOpType()
    {
        var config = GptConfig.Preset("gpt2") with { Layers = 2 };
        var r = LoraRewrite.Rewrite(GptBuilder.Build(config, GptWeights.Random(config, 0)), new LoraConfig { Rank = 16, Alpha = 16 }, "gpt2", "0");
        var art = TrainingArtifacts.Build(r.TrainingModel, r.Manifest, new ArtifactOptions { Task = TrainingTask.Cls, Classes = 2, AccumulateGradients = true });
        TestContext.Out.WriteLine(string.Join(", ", art.TrainModel.Graph.Node.GroupBy(n => n.OpType).OrderByDescending(g => g.Count()).Take(25).Select(g => $"{g.Key} {g.Count()}")));
        int batch = 8, seq = 120;
        var feeds = new Dictionary<string, (Array, long[])>
        {
            ["input_ids"] = (Enumerable.Range(0, batch * seq).Select(i => (long)(i * 7 % 50000)).ToArray(), [batch, seq]),
            ["labels"] = (new long[batch], [batch]), ["lengths"] = (Enumerable.Repeat((long)seq, batch).ToArray(), [batch]),
        };
        foreach (var p in art.Spec.Params) feeds[p.Name] = (new float[p.Shape.Aggregate(1L, (a, b) => a * b)].Select(_ => 0.01f).ToArray(), p.Shape);
        var trainFeeds = new Dictionary<string, (Array, long[])>(feeds) { [TrainingArtifacts.ResetGrad] = (new[] { false }, []) };
        foreach (var p in art.Spec.Params) trainFeeds[TrainingArtifacts.GradIn(p.Name)] = (new float[p.Shape.Aggregate(1L, (a, b) => a * b)], p.Shape);
        foreach (var (name, model) in new[] { ("eval", art.EvalModel), ("train", art.TrainModel) })
        {
            using var so = new SessionOptions();
            so.EnableProfiling = true;
            so.ProfileOutputPathPrefix = Path.Combine(Path.GetTempPath(), "onnxlora-profile-" + name);
            using var s = new InferenceSession(model.ToByteArray(), so);
            var outs = name == "eval" ? new[] { TrainingArtifacts.Loss } : art.Spec.Params.Select(p => Optimizers.Grad(p.Name)).Prepend(TrainingArtifacts.Loss).ToArray();
            ArtifactTests.Run(s, name == "eval" ? feeds : trainFeeds, outs);
            ArtifactTests.Run(s, name == "eval" ? feeds : trainFeeds, outs);
            var file = s.EndProfiling();
            using var doc = JsonDocument.Parse(File.ReadAllText(file));
            var nodes = doc.RootElement.EnumerateArray().Where(e => e.GetProperty("cat").GetString() == "Node" && e.GetProperty("name").GetString()!.EndsWith("_kernel_time"))
                .Select(e => (Op: e.GetProperty("args").GetProperty("op_name").GetString()!, Name: e.GetProperty("name").GetString()!, Us: e.GetProperty("dur").GetDouble())).ToList();
            TestContext.Out.WriteLine($"{name}: total {nodes.Sum(n => n.Us) / 2e6:F3} s per step");
            foreach (var g in nodes.GroupBy(n => n.Op).OrderByDescending(g => g.Sum(n => n.Us)).Take(12))
                TestContext.Out.WriteLine($"  {g.Key,-24} {g.Sum(n => n.Us) / 2e6:F3} s  ({g.Count() / 2} nodes)");
            foreach (var n in nodes.GroupBy(n => n.Name).OrderByDescending(g => g.Sum(x => x.Us)).Take(16))
            {
                var node = model.Graph.Node.FirstOrDefault(x => x.Name + "_kernel_time" == n.Key);
                TestContext.Out.WriteLine($"    {n.Key} {n.Sum(x => x.Us) / 2e6:F3} s {string.Join(" ", node?.Attribute.Select(a => a.Name + "=" + (a.I != 0 ? a.I.ToString() : a.F.ToString())) ?? [])} {string.Join(",", node?.Input ?? [])}");
            }
            TestContext.Out.WriteLine($"  gradient accumulation nodes: {nodes.Where(n => n.Name.Contains("accumulate")).Sum(n => n.Us) / 2e6:F4} s");
            File.Delete(file);
        }
    }
}
