using System.Runtime.InteropServices;
using System.Security.Cryptography;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.GraphRewrite.Numerics;

namespace OnnxLora.Tests.Models;

public class GptWeightsTests
{
    static readonly GptConfig Tiny = GptConfig.Preset("tiny");

    static string Sha256(GptWeights w)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var name in w.Names) sha.AppendData(MemoryMarshal.AsBytes(w[name].Values.AsSpan()));
        return Convert.ToHexString(sha.GetHashAndReset());
    }

    [Test]
    public void SameSeedGivesIdenticalBytes()
    {
        Assert.That(Sha256(GptWeights.Random(Tiny, 7)), Is.EqualTo(Sha256(GptWeights.Random(Tiny, 7))));
        Assert.That(Sha256(GptWeights.Random(Tiny, 8)), Is.Not.EqualTo(Sha256(GptWeights.Random(Tiny, 7))));
    }

    [Test]
    public void RandomInitIsPinnedAcrossVersionsAndPlatforms()
    {
        // Only +, ×, ÷, √ and integer ops feed the values, so these bits hold on any IEEE-754 machine. If this fails
        // after an intended change to the generator, also rebuild tests/fixtures/tiny.onnx.
        var w = GptWeights.Random(Tiny, 0);
        Assert.That(w["transformer.wte.weight"].Values[..4], Is.EqualTo(new[] { PinnedWte0, PinnedWte1, PinnedWte2, PinnedWte3 }));
        Assert.That(Sha256(w), Is.EqualTo(PinnedTinySha256));
    }

    const float PinnedWte0 = 0.015434573f, PinnedWte1 = -0.009179179f, PinnedWte2 = -0.004009705f, PinnedWte3 = 0.012640819f;
    const string PinnedTinySha256 = "0B05E3F177ADD42CA58A57D5FA825773D7B0BF35CF434888B72DAC1B3240817D";

    [Test]
    public void RandomInitFollowsGpt2()
    {
        var config = Tiny with { Layers = 8 };
        var w = GptWeights.Random(config, 1);
        Assert.Multiple(() =>
        {
            Assert.That(Std(w["transformer.wte.weight"].Values), Is.EqualTo(0.02).Within(0.0006));
            Assert.That(Std(w["transformer.h.3.attn.c_attn.weight"].Values), Is.EqualTo(0.02).Within(0.0006));
            Assert.That(Std(w["transformer.h.3.mlp.c_fc.weight"].Values), Is.EqualTo(0.02).Within(0.0006));
            // residual projections: 0.02 / sqrt(2 · 8 layers) = 0.005
            Assert.That(Std(w["transformer.h.3.attn.c_proj.weight"].Values), Is.EqualTo(0.005).Within(0.0003));
            Assert.That(Std(w["transformer.h.3.mlp.c_proj.weight"].Values), Is.EqualTo(0.005).Within(0.0002));
            Assert.That(w["transformer.h.3.mlp.c_fc.bias"].Values, Is.All.EqualTo(0f));
            Assert.That(w["transformer.h.3.ln_1.weight"].Values, Is.All.EqualTo(1f));
            Assert.That(w["transformer.ln_f.bias"].Values, Is.All.EqualTo(0f));
            // independent streams per tensor: two same-shaped tensors differ
            Assert.That(w["transformer.h.0.attn.c_proj.weight"].Values, Is.Not.EqualTo(w["transformer.h.1.attn.c_proj.weight"].Values));
        });
    }

    static double Std(float[] v)
    {
        double mean = v.Average(x => (double)x);
        return Math.Sqrt(v.Sum(x => (x - mean) * (x - mean)) / v.Length);
    }

    [Test]
    public void SeededNormalHasUnitMomentsAndGaussianTails()
    {
        var g = new SeededNormal(123, "moments");
        const int n = 1_000_000;
        double sum = 0, sumSq = 0, tail = 0;
        for (int i = 0; i < n; i++)
        {
            double z = g.NextNormal();
            sum += z; sumSq += z * z;
            if (Math.Abs(z) > 2) tail++;
        }
        Assert.That(sum / n, Is.EqualTo(0).Within(0.005));
        Assert.That(sumSq / n, Is.EqualTo(1).Within(0.005));
        Assert.That(tail / n, Is.EqualTo(0.0455).Within(0.001));   // P(|z| > 2) for a standard normal
    }

    [Test]
    public void DeterministicLogAgreesWithMathLog()
    {
        double worst = 0;
        foreach (var x in new[] { 1e-300, 1e-20, 0.001, 0.3, 0.7071, 0.7072, 0.99999, 1, 1.5, 2, 1e10, 1.7e308 }.Concat(Enumerable.Range(1, 10000).Select(i => i / 10001.0)))
            worst = Math.Max(worst, Math.Abs(DeterministicMath.Log(x) - Math.Log(x)) / Math.Max(1, Math.Abs(Math.Log(x))));
        Assert.That(worst, Is.LessThan(1e-15));
        Assert.That(() => DeterministicMath.Log(0), Throws.InstanceOf<ArgumentOutOfRangeException>());
    }

    // ---- safetensors import ----

    /// <summary>The tensors as a Hugging Face checkpoint holds them, optionally without the prefix and with HF's extras.</summary>
    static List<KeyValuePair<string, SafeTensor>> HfTensors(GptWeights w, bool prefix = true, string dtype = "F32", bool extras = false)
    {
        var list = new List<KeyValuePair<string, SafeTensor>>();
        void Add(string name, long[] shape, float[] values)
        {
            var key = prefix || !name.StartsWith("transformer.") ? name : name["transformer.".Length..];
            list.Add(KeyValuePair.Create(key, dtype switch
            {
                "F32" => SafeTensor.FromFloats(shape, values),
                "F16" => new SafeTensor("F16", shape, MemoryMarshal.AsBytes(Array.ConvertAll(values, v => (Half)v).AsSpan()).ToArray()),
                "BF16" => new SafeTensor("BF16", shape, MemoryMarshal.AsBytes(Array.ConvertAll(values, Tensors.ToBFloat16).AsSpan()).ToArray()),
                _ => throw new ArgumentException(dtype),
            }));
        }
        foreach (var name in w.Names)
        {
            Add(name, w[name].Shape, w[name].Values);
            if (extras && name.EndsWith(".ln_1.bias"))
            {
                // HF's non-parameter buffers sit between ln_1 and c_attn
                var block = name[..^"ln_1.bias".Length];
                long n = w.Config.ContextLength;
                var mask = new float[n * n];
                for (long i = 0; i < n; i++) for (long j = 0; j <= i; j++) mask[i * n + j] = 1;
                Add(block + "attn.bias", [1, 1, n, n], mask);
                Add(block + "attn.masked_bias", [], [-1e4f]);
            }
        }
        if (extras) Add("lm_head.weight", w["transformer.wte.weight"].Shape, w["transformer.wte.weight"].Values);
        return list;
    }

    static void AssertSameWeights(GptWeights actual, GptWeights expected, Func<float, float>? round = null)
    {
        Assert.That(actual.Config, Is.EqualTo(expected.Config));
        Assert.That(actual.Names, Is.EqualTo(expected.Names));
        foreach (var name in expected.Names)
        {
            Assert.That(actual[name].Shape, Is.EqualTo(expected[name].Shape), name);
            var want = round is null ? expected[name].Values : Array.ConvertAll(expected[name].Values, x => round(x));
            Assert.That(actual[name].Values.AsSpan().SequenceEqual(want), name);
        }
    }

    [Test]
    public void SafeTensorsRoundTripIsIdentical()
    {
        using var dir = new TempDir();
        var weights = GptWeights.Random(Tiny, 11);
        GptBuilderTests.PerturbBiasesAndNorms(weights);
        weights.SaveSafeTensors(dir.File("model.safetensors"));
        var (raw, metadata) = SafeTensorsFile.Read(dir.File("model.safetensors"));
        Assert.That(raw.Keys, Is.EquivalentTo(weights.Names));
        Assert.That(metadata["format"], Is.EqualTo("pt"));
        AssertSameWeights(GptWeights.FromSafeTensors(dir.File("model.safetensors")), weights);
    }

    [Test]
    public void ImportsGpt2ModelNamesWithBuffersAndTiedHead()
    {
        using var dir = new TempDir();
        var weights = GptWeights.Random(Tiny, 12);
        SafeTensorsFile.Write(dir.File("model.safetensors"), HfTensors(weights, prefix: false, extras: true));
        AssertSameWeights(GptWeights.FromSafeTensors(dir.File("model.safetensors")), weights);
        // with a config, it is the config's head count that counts
        var fourHeads = Tiny with { Heads = 4 };
        Assert.That(GptWeights.FromSafeTensors(dir.File("model.safetensors"), fourHeads).Config, Is.EqualTo(fourHeads));
    }

    [Test]
    public void TiedHeadStandsInForAMissingEmbedding()
    {
        using var dir = new TempDir();
        var weights = GptWeights.Random(Tiny, 16);
        var tensors = HfTensors(weights, extras: true).Where(kv => kv.Key != "transformer.wte.weight");
        SafeTensorsFile.Write(dir.File("model.safetensors"), tensors);
        AssertSameWeights(GptWeights.FromSafeTensors(dir.File("model.safetensors")), weights);
    }

    [TestCase("F16")]
    [TestCase("BF16")]
    public void ConvertsHalfPrecisionToFloat(string dtype)
    {
        using var dir = new TempDir();
        var weights = GptWeights.Random(Tiny, 13);
        SafeTensorsFile.Write(dir.File("model.safetensors"), HfTensors(weights, dtype: dtype));
        Func<float, float> round = dtype == "F16" ? x => (float)(Half)x : x => Tensors.FromBFloat16(Tensors.ToBFloat16(x));
        AssertSameWeights(GptWeights.FromSafeTensors(dir.File("model.safetensors")), weights, round);
    }

    [Test]
    public void InfersQkvBiasAndLayerCountFromTheFile()
    {
        using var dir = new TempDir();
        var config = Tiny with { QkvBias = false, Layers = 3 };
        var weights = GptWeights.Random(config, 14);
        weights.SaveSafeTensors(dir.File("model.safetensors"));
        Assert.That(GptWeights.FromSafeTensors(dir.File("model.safetensors")).Config, Is.EqualTo(config));
    }

    static string ImportError(Action<List<KeyValuePair<string, SafeTensor>>> corrupt, GptConfig? config = null, bool prefix = true)
    {
        using var dir = new TempDir();
        var tensors = HfTensors(GptWeights.Random(Tiny, 15), prefix);
        corrupt(tensors);
        var path = dir.File("model.safetensors");
        SafeTensorsFile.Write(path, tensors);
        var e = Assert.Throws<InvalidDataException>(() => GptWeights.FromSafeTensors(path, config));
        Assert.That(e!.Message, Does.StartWith(path + ": "));
        return e.Message;
    }

    static void Replace(List<KeyValuePair<string, SafeTensor>> list, string name, Func<SafeTensor, SafeTensor> change)
    {
        int i = list.FindIndex(kv => kv.Key == name);
        list[i] = KeyValuePair.Create(name, change(list[i].Value));
    }

    [Test]
    public void MissingTensorIsNamed()
    {
        var message = ImportError(t => t.RemoveAll(kv => kv.Key == "h.1.mlp.c_fc.bias"), prefix: false);
        Assert.That(message, Does.Contain("missing tensor 'h.1.mlp.c_fc.bias'"));
    }

    [Test]
    public void WrongShapeIsNamed()
    {
        var message = ImportError(t => Replace(t, "transformer.ln_f.weight", _ => SafeTensor.FromFloats([31], new float[31])));
        Assert.That(message, Does.Contain("tensor 'transformer.ln_f.weight' has shape [31]").And.Contain("needs [32]"));
    }

    [Test]
    public void TransposedConv1DWeightGetsAHint()
    {
        var message = ImportError(t => Replace(t, "transformer.h.0.mlp.c_fc.weight", _ => SafeTensor.FromFloats([128, 32], new float[128 * 32])));
        Assert.That(message, Does.Contain("'transformer.h.0.mlp.c_fc.weight' has shape [128, 32]").And.Contain("nn.Linear"));
    }

    [Test]
    public void WrongDtypeIsNamed()
    {
        var message = ImportError(t => Replace(t, "transformer.h.0.attn.c_proj.weight", s => new SafeTensor("I32", s.Shape, s.Data)));
        Assert.That(message, Does.Contain("tensor 'transformer.h.0.attn.c_proj.weight' has dtype I32"));
    }

    [Test]
    public void UnexpectedTensorIsNamed()
    {
        var message = ImportError(t => t.Add(KeyValuePair.Create("transformer.h.0.attn.rotary.weight", SafeTensor.FromFloats([2], [1, 2]))));
        Assert.That(message, Does.Contain("unexpected tensor 'transformer.h.0.attn.rotary.weight'"));
    }

    [Test]
    public void UntiedHeadIsRejected()
    {
        var message = ImportError(t => t.Add(KeyValuePair.Create("lm_head.weight", SafeTensor.FromFloats([512, 32], new float[512 * 32]))));
        Assert.That(message, Does.Contain("'lm_head.weight' differs from 'transformer.wte.weight'"));
    }

    [Test]
    public void ConfigThatDoesNotFitIsNamed()
    {
        var message = ImportError(_ => { }, GptConfig.Preset("small"));
        Assert.That(message, Does.Contain("'transformer.wte.weight' has shape [512, 32]").And.Contain("needs [50257, 128]"));
        message = ImportError(_ => { }, Tiny with { Layers = 3 });
        Assert.That(message, Does.Contain("missing tensor 'transformer.h.2.ln_1.weight'"));
    }

    [Test]
    public void HeadCountComesFromThePresetOfTheSameWidth()
    {
        using var dir = new TempDir();
        var distil = new GptConfig(64, 8, 768, 12, 1);   // gpt2's width: 12 heads
        GptWeights.Random(distil with { Heads = 1 }).SaveSafeTensors(dir.File("model.safetensors"));
        Assert.That(GptWeights.FromSafeTensors(dir.File("model.safetensors")).Config, Is.EqualTo(distil));
    }

    [Test]
    public void CreateChecksNamesAndShapes()
    {
        var tensors = GptLayout.Tensors(Tiny).ToDictionary(t => t.Name, t => new WeightTensor(t.Shape, new float[t.Shape.Aggregate(1L, (a, b) => a * b)]));
        Assert.That(GptWeights.Create(Tiny, tensors).ParameterCount, Is.EqualTo(Tiny.ParameterCount));
        tensors["transformer.ln_f.bias"] = new WeightTensor([33], new float[33]);
        Assert.That(() => GptWeights.Create(Tiny, tensors), Throws.ArgumentException.With.Message.Contains("'transformer.ln_f.bias' has shape [33]"));
        tensors.Remove("transformer.ln_f.bias");
        Assert.That(() => GptWeights.Create(Tiny, tensors), Throws.ArgumentException.With.Message.Contains("missing tensor 'transformer.ln_f.bias'"));
    }

    [Test]
    public void HeadCountComesFromConfigJsonBesideTheFile()
    {
        using var dir = new TempDir();
        var config = new GptConfig(100, 16, 24, 3, 1, LayerNormEpsilon: 1e-6);
        GptWeights.Random(config).SaveSafeTensors(dir.File("model.safetensors"));
        File.WriteAllText(dir.File("config.json"), """{"model_type": "gpt2", "n_head": 3, "n_embd": 24, "layer_norm_epsilon": 1e-06}""");
        Assert.That(GptWeights.FromSafeTensors(dir.File("model.safetensors")).Config, Is.EqualTo(config));
        File.WriteAllText(dir.File("config.json"), """{"n_head": 5}""");
        Assert.That(() => GptWeights.FromSafeTensors(dir.File("model.safetensors")),
                    Throws.InstanceOf<InvalidDataException>().With.Message.Contains("divisible by Heads (5)"));
    }

    [Test]
    public void UnknownWidthAsksForAConfig()
    {
        using var dir = new TempDir();
        var config = new GptConfig(100, 16, 24, 3, 1);
        GptWeights.Random(config).SaveSafeTensors(dir.File("odd.safetensors"));
        Assert.That(() => GptWeights.FromSafeTensors(dir.File("odd.safetensors")),
                    Throws.InstanceOf<InvalidDataException>().With.Message.Contains("width 24").And.Message.Contains("pass a GptConfig"));
        Assert.That(GptWeights.FromSafeTensors(dir.File("odd.safetensors"), config).Config, Is.EqualTo(config));
        Assert.That(() => GptWeights.FromSafeTensors(dir.File("nothing.safetensors")), Throws.InstanceOf<FileNotFoundException>());
    }
}
