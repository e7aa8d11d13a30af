using System.Diagnostics;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.GraphRewrite.Numerics;

namespace OnnxLora.Tests.Models;

public class GptBuilderTests
{
    /// <summary>Runs a model's logits in ONNX Runtime (CPU EP) for a [batch, seq] block of token ids.</summary>
    internal static float[] OrtLogits(InferenceSession session, long[,] ids, out long[] shape)
    {
        var flat = new long[ids.Length];
        Buffer.BlockCopy(ids, 0, flat, 0, flat.Length * sizeof(long));
        using var input = OrtValue.CreateTensorValueFromMemory(flat, [ids.GetLength(0), ids.GetLength(1)]);
        using var runOptions = new RunOptions();
        using var outputs = session.Run(runOptions, [GptBuilder.InputIds], [input], [GptBuilder.Logits]);
        shape = outputs[0].GetTensorTypeAndShape().Shape;
        return outputs[0].GetTensorDataAsSpan<float>().ToArray();
    }

    internal static long[,] RandomIds(int batch, int seq, int vocab, int seed)
    {
        var random = new Random(seed);
        var ids = new long[batch, seq];
        for (int b = 0; b < batch; b++)
            for (int t = 0; t < seq; t++) ids[b, t] = random.Next(vocab);
        return ids;
    }

    /// <summary>Asserts two logit blocks agree to <paramref name="tolerance"/>, naming the worst position on failure.</summary>
    internal static void AssertClose(float[] actual, double[] expected, double tolerance, string what)
    {
        Assert.That(actual, Has.Length.EqualTo(expected.Length), what);
        double worst = 0;
        int at = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            double diff = Math.Abs(actual[i] - expected[i]);
            if (!(diff <= worst)) { worst = diff; at = i; }
        }
        TestContext.Out.WriteLine($"{what}: max |actual − expected| = {worst:E2} at {at} (tolerance {tolerance:E0})");
        Assert.That(worst, Is.LessThanOrEqualTo(tolerance), $"{what}: logit {at} is {actual[at]}, reference {expected[at]}");
    }

    [Test]
    public void TinyMatchesReferenceForwardAtSeveralLengths()
    {
        var config = GptConfig.Preset("tiny");
        var weights = GptWeights.Random(config, seed: 1);
        PerturbBiasesAndNorms(weights);
        using var session = new InferenceSession(GptBuilder.Build(config, weights).ToByteArray());
        foreach (var seq in new[] { 1, 2, 7, config.ContextLength })
        {
            var ids = RandomIds(2, seq, config.VocabSize, seed: seq);
            var logits = OrtLogits(session, ids, out var shape);
            Assert.That(shape, Is.EqualTo(new long[] { 2, seq, config.VocabSize }));
            AssertClose(logits, ReferenceGpt.Forward(weights, config.Heads, config.LayerNormEpsilon, ids), 1e-4, $"tiny, batch 2 × {seq}");
        }
    }

    [Test]
    public void TinyWithoutQkvBiasMatchesReference()
    {
        var config = GptConfig.Preset("tiny") with { QkvBias = false, Heads = 4 };
        var weights = GptWeights.Random(config, seed: 2);
        PerturbBiasesAndNorms(weights);
        var model = GptBuilder.Build(config, weights);
        Assert.That(model.Graph.Node.Any(n => n.Name == "/transformer/h.0/attn/c_attn/Add"), Is.False);
        using var session = new InferenceSession(model.ToByteArray());
        var ids = RandomIds(1, 9, config.VocabSize, seed: 3);
        AssertClose(OrtLogits(session, ids, out _), ReferenceGpt.Forward(weights, config.Heads, config.LayerNormEpsilon, ids), 1e-4, "tiny without c_attn bias, 4 heads");
    }

    [Test]
    public void Gpt2MatchesReferenceForward()
    {
        var config = GptConfig.Preset("gpt2");
        var cpu = Process.GetCurrentProcess().TotalProcessorTime;
        var clock = Stopwatch.StartNew();
        var weights = GptWeights.Random(config, seed: 3);
        var init = clock.Elapsed;
        var model = GptBuilder.Build(config, weights);
        var build = clock.Elapsed - init;
        var bytes = model.ToByteArray();
        using var session = new InferenceSession(bytes);
        var load = clock.Elapsed - init - build;
        var ids = RandomIds(1, 8, config.VocabSize, seed: 4);
        var logits = OrtLogits(session, ids, out var shape);
        var run = clock.Elapsed - init - build - load;
        var beforeReference = Process.GetCurrentProcess().TotalProcessorTime;
        var reference = ReferenceGpt.Forward(weights, config.Heads, config.LayerNormEpsilon, ids);
        TestContext.Out.WriteLine($"reference CPU {(Process.GetCurrentProcess().TotalProcessorTime - beforeReference).TotalSeconds:F1} s");
        TestContext.Out.WriteLine($"gpt2: init {init.TotalSeconds:F2} s, build {build.TotalSeconds:F2} s, " +
                                  $"ORT session {load.TotalSeconds:F2} s, run {run.TotalSeconds:F2} s, reference {(clock.Elapsed - init - build - load - run).TotalSeconds:F2} s " +
                                  $"(wall; process CPU {(Process.GetCurrentProcess().TotalProcessorTime - cpu).TotalSeconds:F1} s)");
        Assert.That(shape, Is.EqualTo(new long[] { 1, 8, 50257 }));
        AssertClose(logits, reference, 1e-4, "gpt2, batch 1 × 8");
    }

    [Test]
    public void GraphLooksLikeATorchExportOfHuggingFaceGpt2()
    {
        var config = GptConfig.Preset("tiny");
        var model = GptBuilder.Build(config, GptWeights.Random(config));
        var g = new GraphEditor(model);
        Assert.Multiple(() =>
        {
            Assert.That(model.IrVersion, Is.EqualTo(8));
            Assert.That(g.Opset(), Is.EqualTo(17));
            Assert.That(model.Graph.Input.Select(i => i.Name), Is.EqualTo(new[] { "input_ids" }));
            Assert.That(ValueInfos.Dims(model.Graph.Input[0])!.Select(d => d.ToString()), Is.EqualTo(new[] { "batch", "seq" }));
            Assert.That(ValueInfos.Dims(model.Graph.Output[0])!.Select(d => d.ToString()), Is.EqualTo(new[] { "batch", "seq", "512" }));

            // every linear: MatMul on the HF-named [in, out] initializer, then Add of the bias, named by module path
            foreach (var module in new[] { "attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj" })
                for (int i = 0; i < config.Layers; i++)
                {
                    var matMul = model.Graph.Node.Single(n => n.Name == $"/transformer/h.{i}/{module}/MatMul");
                    var weight = $"transformer.h.{i}.{module.Replace('/', '.')}.weight";
                    Assert.That(matMul.Input[1], Is.EqualTo(weight));
                    Assert.That(g.IsInitializer(weight));
                    var add = g.Consumers(matMul.Output[0]).Single();
                    Assert.That(add.Name, Is.EqualTo($"/transformer/h.{i}/{module}/Add"));
                    Assert.That(add.Input[1], Is.EqualTo($"transformer.h.{i}.{module.Replace('/', '.')}.bias"));
                }
            var weightMatMuls = model.Graph.Node.Where(n => n.OpType == "MatMul" && (g.IsInitializer(n.Input[1]) || n.Name == "/lm_head/MatMul")).ToList();
            Assert.That(weightMatMuls, Has.Count.EqualTo(4 * config.Layers + 1));

            // tied head: one wte initializer read by the embedding Gather and the head's Transpose
            Assert.That(g.Consumers("transformer.wte.weight").Select(n => n.Name), Is.EquivalentTo(new[] { "/transformer/wte/Gather", "/lm_head/Transpose" }));
            var head = model.Graph.Node.Single(n => n.Name == "/lm_head/MatMul");
            Assert.That(g.Producer(head.Input[1])!.Name, Is.EqualTo("/lm_head/Transpose"));
            Assert.That(head.Output[0], Is.EqualTo("logits"));

            var ops = model.Graph.Node.Select(n => n.OpType).ToHashSet();
            Assert.That(ops, Is.SupersetOf(new[] { "LayerNormalization", "Split", "Where", "Softmax", "Tanh", "Pow", "Range", "Slice", "Shape", "Reshape", "Transpose" }));
            Assert.That(ops, Does.Not.Contain("Gelu"));
            Assert.That(model.Graph.Node.Count(n => n.OpType == "LayerNormalization"), Is.EqualTo(2 * config.Layers + 1));
            Assert.That(model.Graph.Node.Select(n => n.Name).Distinct().Count(), Is.EqualTo(model.Graph.Node.Count), "node names are unique");
        });
    }

    [Test]
    public void ModelCarriesItsConfigAndRunsInOrtAfterSaveAndLoad()
    {
        using var dir = new TempDir();
        var config = GptConfig.Preset("tiny");
        var path = dir.File("tiny.onnx");
        GptBuilder.Save(config, GptWeights.Random(config, 5), path);
        var loaded = OnnxFile.Load(path);
        var json = loaded.MetadataProps.Single(p => p.Key == GptBuilder.ConfigMetadataKey).Value;
        Assert.That(json, Does.Contain("\"n_head\":2").And.Contain("\"n_layer\":2").And.Contain("\"vocab_size\":512"));
        using var session = new InferenceSession(path);
        OrtLogits(session, RandomIds(3, 4, 512, 6), out var shape);
        Assert.That(shape, Is.EqualTo(new long[] { 3, 4, 512 }));
    }

    [Test]
    public void ExternalDataSaveRunsLikeInline()
    {
        // the initializers wrap the weight arrays (no copy): both save paths must write their bytes
        using var dir = new TempDir();
        var config = GptConfig.Preset("tiny");
        var model = GptBuilder.Build(config, GptWeights.Random(config, 8));
        OnnxFile.Save(model, dir.File("inline.onnx"));
        OnnxFile.Save(model, dir.File("external.onnx"), new SaveOptions { ExternalData = ExternalDataMode.Always });
        Assert.That(new FileInfo(dir.File("external.onnx")).Length, Is.LessThan(new FileInfo(dir.File("inline.onnx")).Length / 4));
        var ids = RandomIds(2, 6, config.VocabSize, 9);
        using var inline = new InferenceSession(dir.File("inline.onnx"));
        using var external = new InferenceSession(dir.File("external.onnx"));
        Assert.That(OrtLogits(external, ids, out _), Is.EqualTo(OrtLogits(inline, ids, out _)));
    }

    [Test]
    public void BuildRejectsWeightsOfAnotherShape()
    {
        var weights = GptWeights.Random(GptConfig.Preset("tiny"));
        var wider = GptConfig.Preset("tiny") with { EmbedDim = 64 };
        var e = Assert.Throws<ArgumentException>(() => GptBuilder.Build(wider, weights));
        Assert.That(e!.Message, Does.Contain("transformer.wte.weight").And.Contain("[512, 32]").And.Contain("[512, 64]"));
        var badHeads = GptConfig.Preset("tiny") with { Heads = 3 };
        Assert.That(() => GptBuilder.Build(badHeads, weights), Throws.ArgumentException.With.Message.Contains("divisible"));
    }

    // Random init leaves biases at 0 and LayerNorm at 1/0, which would hide a bias or LN mix-up: give them values.
    internal static void PerturbBiasesAndNorms(GptWeights weights)
    {
        var random = new SeededNormal(99, "perturb");
        foreach (var name in weights.Names)
            if (name.EndsWith(".bias", StringComparison.Ordinal) || name.Contains(".ln_", StringComparison.Ordinal))
            {
                var v = weights[name].Values;
                for (int i = 0; i < v.Length; i++) v[i] += (float)(0.1 * random.NextNormal());
            }
    }
}
