using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;

namespace OnnxLora.Tests.Models;

/// <summary><see cref="GptConfig.SplitQkv"/>: separate q/k/v projections compute what the fused c_attn computes.</summary>
public class SplitQkvTests
{
    [TestCase(true)]
    [TestCase(false)]
    public void SplitModelEqualsFusedWhenCAttnIsSplitByColumns(bool qkvBias)
    {
        var fused = GptConfig.Preset("tiny") with { QkvBias = qkvBias };
        var split = fused with { SplitQkv = true };
        var fusedWeights = GptWeights.Random(fused, seed: 5);
        var rng = new Random(6);
        if (qkvBias)   // random biases, so a q/k/v mix-up in the bias split would show
            for (int i = 0; i < fused.Layers; i++)
                foreach (ref var b in fusedWeights[GptLayout.Block(i, "attn.c_attn.bias")].Values.AsSpan()) b = (float)(rng.NextDouble() - 0.5);

        // c_attn [d, 3d] = q|k|v side by side: q_proj gets columns 0..d, k_proj d..2d, v_proj 2d..3d
        int d = fused.EmbedDim;
        var tensors = fusedWeights.Names.Where(n => !n.Contains(".attn.c_attn.")).ToDictionary(n => n, n => fusedWeights[n]);
        for (int i = 0; i < fused.Layers; i++)
        {
            var w = fusedWeights[GptLayout.Block(i, "attn.c_attn.weight")].Values;   // [d, 3d]
            for (int part = 0; part < 3; part++)
            {
                var module = GptLayout.SplitQkvModules[part];
                var wp = new float[d * d];                                               // [d, d]
                for (int row = 0; row < d; row++) Array.Copy(w, row * 3 * d + part * d, wp, row * d, d);
                tensors[GptLayout.Block(i, module + ".weight")] = new WeightTensor([d, d], wp);
                if (qkvBias)
                    tensors[GptLayout.Block(i, module + ".bias")] =
                        new WeightTensor([d], fusedWeights[GptLayout.Block(i, "attn.c_attn.bias")].Values[(part * d)..((part + 1) * d)]);
            }
        }
        var splitWeights = GptWeights.Create(split, tensors);
        Assert.That(splitWeights.ParameterCount, Is.EqualTo(fusedWeights.ParameterCount).And.EqualTo(split.ParameterCount));

        var splitModel = GptBuilder.Build(split, splitWeights);
        Assert.That(splitModel.Graph.Node.Any(n => n.OpType == "Split"), Is.False);
        Assert.That(splitModel.Graph.Node.Select(n => n.Name), Does.Contain("/transformer/h.1/attn/k_proj/MatMul"));
        using var fusedSession = new InferenceSession(GptBuilder.Build(fused, fusedWeights).ToByteArray());
        using var splitSession = new InferenceSession(splitModel.ToByteArray());
        var ids = GptBuilderTests.RandomIds(2, 11, fused.VocabSize, seed: 7);
        var expected = GptBuilderTests.OrtLogits(fusedSession, ids, out _).Select(v => (double)v).ToArray();
        GptBuilderTests.AssertClose(GptBuilderTests.OrtLogits(splitSession, ids, out _), expected, 1e-5, $"split q/k/v vs fused c_attn (bias {qkvBias})");
    }

    [Test]
    public void DefaultLayoutIsStillFusedAndSplitModulesAreLoraTargets()
    {
        Assert.That(GptConfig.Preset("gpt2").SplitQkv, Is.False);
        Assert.That(GptLayout.Tensors(GptConfig.Preset("tiny")).Select(t => t.Name), Does.Contain("transformer.h.0.attn.c_attn.weight"));
        var split = GptConfig.Preset("tiny") with { SplitQkv = true };
        Assert.That(split.ToString(), Does.StartWith("tiny split q/k/v"));
        var layers = LinearLayers.Discover(GptBuilder.Build(split, GptWeights.Random(split, 1)));
        // 6 linears per block (q, k, v, c_proj, c_fc, mlp.c_proj) and the tied head
        Assert.That(layers.Select(l => l.Module), Is.SupersetOf(new[] { "transformer.h.0.attn.q_proj", "transformer.h.0.attn.k_proj", "transformer.h.0.attn.v_proj" }));
        Assert.That(layers.Count(l => !l.IsHead), Is.EqualTo(6 * split.Layers));
    }
}
