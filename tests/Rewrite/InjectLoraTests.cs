using Onnx;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using static OnnxLora.Tests.Rewrite.RewriteTestModels;

namespace OnnxLora.Tests.Rewrite;

/// <summary>Behaviour of the rewritten models in ONNX Runtime (CPU EP), on built graphs and on every fixture export.</summary>
public class InjectLoraTests
{
    public static IEnumerable<TestCaseData> Models()
    {
        yield return new TestCaseData("kitchen-sink").SetArgDisplayNames("kitchen-sink");
        yield return new TestCaseData("mlp").SetArgDisplayNames("mlp");
        yield return new TestCaseData("tiny").SetArgDisplayNames("tiny (our builder)");
        foreach (var f in FixtureFiles()) yield return new TestCaseData(f).SetArgDisplayNames(Path.GetFileName(f));
    }

    static ModelProto Load(string which) => which switch
    {
        "kitchen-sink" => KitchenSink(),
        "mlp" => Mlp(),
        "tiny" => GptBuilder.Build(GptConfig.Preset("tiny"), GptWeights.Random(GptConfig.Preset("tiny"), seed: 1)),
        _ => OnnxFile.Load(which),
    };

    /// <summary>Every linear layer, head included, rank 2 (or less where a layer is narrower), scale 1.5.</summary>
    static LoraRewriteResult RewriteAll(ModelProto model, double dropout = 0) =>
        LoraRewrite.Rewrite(model, new LoraConfig { Rank = 2, Alpha = 3, TargetModules = ["re:.*"], Dropout = dropout, Seed = 5 }, "test.onnx", "0");

    /// <summary>Random nonzero A and B (float32) for every target.</summary>
    static Dictionary<string, TensorProto> RandomParameters(LoraRewriteResult r, int seed = 11)
    {
        var random = new Random(seed);
        float[] Values(long n) => Enumerable.Range(0, (int)n).Select(_ => (float)(random.NextDouble() * 0.6 - 0.3)).ToArray();
        var p = new Dictionary<string, TensorProto>();
        foreach (var t in r.Manifest.Targets)
        {
            p[t.LoraA] = Tensors.Float(t.LoraA, [t.In, t.Rank], Values(t.In * t.Rank));
            p[t.LoraB] = Tensors.Float(t.LoraB, [t.Rank, t.Out], Values(t.Rank * t.Out));
        }
        return p;
    }

    static Dictionary<string, (Array, long[])> With(Dictionary<string, (Array Data, long[] Shape)> feeds, IEnumerable<TensorProto> tensors)
    {
        var all = new Dictionary<string, (Array, long[])>(feeds);
        foreach (var t in tensors) all[t.Name] = (Tensors.ToFloats(t), t.Dims.ToArray());
        return all;
    }

    [TestCaseSource(nameof(Models))]
    public void TrainingViewWithZeroBGivesTheBaseOutputs(string which)
    {
        var model = Load(which);
        var r = RewriteAll(model);
        var feeds = Feeds(model);
        var expected = Run(model, feeds);
        var actual = Run(r.TrainingModel, feeds);
        foreach (var (name, (data, _)) in expected)
            Assert.That(MaxAbsDiff(actual[name].Data, data), Is.LessThanOrEqualTo(1e-5), $"output '{name}'");
        // the A/B are inputs with defaults, and A starts nonzero
        var a = r.TrainingModel.Graph.Initializer.First(i => i.Name == r.Manifest.Targets[0].LoraA);
        Assert.That(r.TrainingModel.Graph.Input.Any(i => i.Name == a.Name) && Tensors.ToDoubles(a).Any(v => v != 0));
    }

    [TestCaseSource(nameof(Models))]
    public void EachTargetAddsScaledXAB(string which)
    {
        var model = Load(which);
        var r = RewriteAll(model);
        var parameters = RandomParameters(r);
        var g = new GraphEditor(r.TrainingModel);
        var probes = new List<(LoraSelection Target, LinearUse Use, string Base)>();
        foreach (var t in r.Targets)
            foreach (var use in t.Layer.Uses)
                probes.Add((t, use, g.Producer(use.Output)!.Input[0]));    // the LoRA Add: (base, delta)
        var exposed = WithOutputs(r.TrainingModel, probes.SelectMany(p => new[] { p.Use.Activation, p.Base, p.Use.Output }));
        var values = Run(exposed, With(Feeds(model), parameters.Values), exposed.Graph.Output.Select(o => o.Name));
        var baseGraph = new GraphEditor(model);

        foreach (var (t, use, baseName) in probes)
        {
            var layer = t.Layer;
            long n = layer.In, m = layer.Out;
            var x = values[use.Activation].Data;                     // [rows, in]
            long rows = x.Length / n;
            var w = Tensors.ToDoubles(baseGraph.Initializer(layer.Weight)!);
            var a = Tensors.ToDoubles(parameters[t.LoraA]);          // [in, r]
            var b = Tensors.ToDoubles(parameters[t.LoraB]);          // [r, out]
            var node = baseGraph.Producer(use.Output)!;
            double[]? bias = node.OpType == "Gemm" && node.InputOrNull(2) is { } c ? Tensors.ToDoubles(baseGraph.Initializer(c)!) : null;
            var xw = new double[rows * m];
            var delta = new double[rows * m];
            for (long i = 0; i < rows; i++)
                for (long o = 0; o < m; o++)
                {
                    double s = bias is null ? 0 : bias[bias.Length == 1 ? 0 : o];
                    for (long k = 0; k < n; k++) s += x[i * n + k] * w[layer.WeightTransposed ? o * n + k : k * m + o];
                    xw[i * m + o] = s;
                    double d = 0;
                    for (int q = 0; q < t.Rank; q++)
                    {
                        double h = 0;
                        for (long k = 0; k < n; k++) h += x[i * n + k] * a[k * t.Rank + q];
                        d += h * b[q * m + o];
                    }
                    delta[i * m + o] = t.Scale * d;
                }
            var yBase = values[baseName].Data;
            var y = values[use.Output].Data;
            double tol = 1e-4 * (1 + xw.Max(Math.Abs));
            Assert.That(MaxAbsDiff(yBase, xw), Is.LessThanOrEqualTo(tol), $"{t.Layer.Module} at {use.Node}: base output vs x·W (+b)");
            Assert.That(MaxAbsDiff(y, xw.Zip(delta, (p, q) => p + q).ToArray()), Is.LessThanOrEqualTo(tol),
                $"{t.Layer.Module} at {use.Node}: output vs x·W (+b) + scale·x·A·B");
            Assert.That(delta.Max(Math.Abs), Is.GreaterThan(1e-3), $"{t.Layer.Module}: the branch must contribute");
        }
    }

    [TestCaseSource(nameof(Models))]
    public void DeployableIsTheBaseWithoutAdapterAndTheMergedModelWithOne(string which)
    {
        var model = Load(which);
        var r = RewriteAll(model);
        var feeds = Feeds(model);
        var expected = Run(model, feeds);
        var noAdapter = Run(r.DeployableModel, feeds);
        foreach (var (name, (data, _)) in expected)
            Assert.That(MaxAbsDiff(noAdapter[name].Data, data), Is.LessThanOrEqualTo(1e-6), $"no adapter: output '{name}'");

        var parameters = RandomParameters(r);
        // an adapter carries scale·B
        var adapter = r.Manifest.Targets.SelectMany(t => new[]
        {
            parameters[t.LoraA],
            Tensors.FromDoubles(t.LoraB, TensorProto.Types.DataType.Float, [t.Rank, t.Out], Tensors.ToDoubles(parameters[t.LoraB]).Select(v => v * t.Scale).ToArray()),
        }).ToDictionary(p => p.Name);
        var withAdapter = Run(r.DeployableModel, With(feeds, adapter.Values));
        var (merged, modified) = MergeLora.Run(model, r.Manifest, parameters);
        Assert.That(modified);
        Assert.That(merged.Graph.Input.Select(i => i.Name), Is.EqualTo(model.Graph.Input.Select(i => i.Name)), "merged keeps the base's inputs");
        var mergedOut = Run(merged, feeds);
        var training = Run(r.TrainingModel, With(feeds, parameters.Values));
        var (mergedFromDeployable, _) = MergeLora.Run(r.DeployableModel, r.Manifest, adapter, bIncludesScale: true);
        var mergedFromDeployableOut = Run(mergedFromDeployable, feeds);
        foreach (var (name, _) in expected)
        {
            double scale = 1 + mergedOut[name].Data.Max(Math.Abs);
            Assert.That(MaxAbsDiff(withAdapter[name].Data, mergedOut[name].Data), Is.LessThanOrEqualTo(1e-4 * scale), $"deployable + adapter vs merged: '{name}'");
            Assert.That(MaxAbsDiff(training[name].Data, mergedOut[name].Data), Is.LessThanOrEqualTo(1e-4 * scale), $"training view vs merged: '{name}'");
            Assert.That(MaxAbsDiff(mergedFromDeployableOut[name].Data, mergedOut[name].Data), Is.LessThanOrEqualTo(1e-4 * scale), $"merged from deployable: '{name}'");
            Assert.That(MaxAbsDiff(mergedOut[name].Data, expected[name].Data), Is.GreaterThan(1e-4), "the adapter must change the outputs");
        }
    }

    [TestCaseSource(nameof(Models))]
    public void MergeThenUnmergeGivesBackTheWeights(string which)
    {
        var model = Load(which);
        // float16 weights are refused by unmerge (tested below): adapt the others
        var fp16 = LinearLayers.Discover(model).Where(l => l.WeightType != (int)TensorProto.Types.DataType.Float).Select(l => l.Module).ToList();
        var r = LoraRewrite.Rewrite(model, new LoraConfig { Rank = 2, Alpha = 4, TargetModules = ["re:.*"], ExcludeModules = fp16.Select(m => "re:" + System.Text.RegularExpressions.Regex.Escape(m)).ToList() }, "t", "0");
        var parameters = RandomParameters(r);
        var (merged, _) = MergeLora.Run(model, r.Manifest, parameters);
        var (unmerged, _) = UnmergeLora.Run(merged, r.Manifest, parameters);
        foreach (var t in r.Manifest.Targets)
        {
            var original = Tensors.ToDoubles(model.Graph.Initializer.First(i => i.Name == t.Weight));
            var mergedLayer = LinearLayers.Discover(merged).Single(l => l.Nodes.Contains(t.Nodes[0]));
            var m = Tensors.ToDoubles(merged.Graph.Initializer.First(i => i.Name == mergedLayer.Weight));
            Assert.That(MaxAbsDiff(m, original), Is.GreaterThan(1e-4), $"{t.Module}: merge changes W");
            var back = LinearLayers.Discover(unmerged).Single(l => l.Nodes.Contains(t.Nodes[0]));
            var u = Tensors.ToDoubles(unmerged.Graph.Initializer.First(i => i.Name == back.Weight));
            Assert.That(MaxAbsDiff(u, original), Is.LessThanOrEqualTo(1e-6 * (1 + original.Max(Math.Abs))), $"{t.Module}: unmerge gives W back");
        }
    }

    [Test]
    public void MergeKeepsATiedEmbeddingAndMergesASharedWeightOnce()
    {
        var model = KitchenSink();
        // "ff.2" names the second user of the deduplicated initializer: it selects the same (one) layer
        var r = LoraRewrite.Rewrite(model, new LoraConfig { Rank = 2, Alpha = 2, TargetModules = ["lm_head", "ff.2"] }, "t", "0");
        Assert.That(r.Manifest.Targets.Select(t => t.Module), Is.EqualTo(new[] { "blocks.1.ff.0", "lm_head" }));
        Assert.That(r.Manifest.Targets.Single(t => t.Module == "blocks.1.ff.0").Nodes, Has.Count.EqualTo(2), "one A/B pair, both nodes listed");
        var parameters = RandomParameters(r);
        var (merged, _) = MergeLora.Run(model, r.Manifest, parameters);
        var wte = model.Graph.Initializer.First(i => i.Name == "transformer.wte.weight");
        Assert.That(merged.Graph.Initializer.First(i => i.Name == "transformer.wte.weight").RawData, Is.EqualTo(wte.RawData), "the embedding Gather keeps the base table");
        Assert.That(merged.Graph.Initializer.Any(i => i.Name == "transformer.wte.weight.merged"), "the head reads its own merged copy");

        // shared weight: W + scale·A·B exactly once
        var t = r.Manifest.Targets.Single(x => x.Module == "blocks.1.ff.0");
        var w0 = Tensors.ToDoubles(model.Graph.Initializer.First(i => i.Name == t.Weight));
        var w1 = Tensors.ToDoubles(merged.Graph.Initializer.First(i => i.Name == t.Weight));
        var a = Tensors.ToDoubles(parameters[t.LoraA]);
        var b = Tensors.ToDoubles(parameters[t.LoraB]);
        double d00 = t.Scale * (a[0] * b[0] + a[1] * b[t.Out]);
        Assert.That(w1[0] - w0[0], Is.EqualTo(d00).Within(1e-6));
    }

    [Test]
    public void UnmergeRefusesFloat16Weights()
    {
        var model = KitchenSink();
        var r = LoraRewrite.Rewrite(model, new LoraConfig { Rank = 2, TargetModules = ["blocks.1.proj"] }, "t", "0");
        var parameters = RandomParameters(r);
        var (merged, _) = MergeLora.Run(model, r.Manifest, parameters);
        Assert.That(() => UnmergeLora.Run(merged, r.Manifest, parameters), Throws.TypeOf<NotSupportedException>().With.Message.Contains("Float16"));
    }

    [Test]
    public void DropoutIsOffByDefaultAndOnWithTrainingMode()
    {
        var model = Mlp();
        var r = RewriteAll(model, dropout: 0.5);
        Assert.That(r.Manifest.DropoutTrainingModeInput, Is.EqualTo(InjectLora.DropoutTrainingModeInput));
        Assert.That(r.TrainingModel.Graph.Node.Count(n => n.OpType == "Dropout"), Is.EqualTo(r.Targets.Count));
        Assert.That(r.DeployableModel.Graph.Node.Any(n => n.OpType == "Dropout"), Is.False, "no dropout when deployed");
        var parameters = RandomParameters(r);
        var feeds = With(Feeds(model), parameters.Values);
        var eval = Run(r.TrainingModel, feeds)["y"].Data;
        var (merged, _) = MergeLora.Run(model, r.Manifest, parameters);
        Assert.That(MaxAbsDiff(eval, Run(merged, Feeds(model))["y"].Data), Is.LessThanOrEqualTo(1e-5), "eval: dropout off");
        feeds[InjectLora.DropoutTrainingModeInput] = (new[] { true }, Array.Empty<long>());
        var train = Run(r.TrainingModel, feeds)["y"].Data;
        Assert.That(MaxAbsDiff(train, eval), Is.GreaterThan(1e-4), "training_mode = true drops branch inputs");
    }

    [Test]
    public void RewritingARewrittenModelIsRefused()
    {
        var r = RewriteAll(Mlp());
        // the LoRA A/B MatMuls are not linears (their weights are inputs), and the base weights' names are taken
        Assert.That(LinearLayers.Discover(r.TrainingModel).Select(l => l.Module), Is.EqualTo(new[] { "fc1", "fc2" }));
        Assert.That(() => RewriteAll(r.TrainingModel), Throws.InvalidOperationException.With.Message.Contains("rewritten already"));
    }
}
