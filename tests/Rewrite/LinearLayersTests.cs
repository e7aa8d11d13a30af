using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Rewrite;

public class LinearLayersTests
{
    // module, in, out, transposed, head, shared, uses
    static readonly (string Module, long In, long Out, bool Transposed, bool Head, bool Shared, int Uses)[] KitchenSinkLayers =
    [
        ("blocks.0.att.W_query", 8, 8, false, false, false, 1),   // anonymous weight: node scope
        ("blocks.0.att.W_key", 8, 8, true, false, false, 1),      // meaningful name behind a Transpose
        ("blocks.0.att.W_value", 8, 8, false, false, false, 1),
        ("blocks.0.mlp.c_fc", 8, 16, false, false, false, 1),     // Gemm on a 2-D view
        ("blocks.0.mlp.c_proj", 16, 8, true, false, false, 1),    // Gemm transB
        ("blocks.1.ff.0", 8, 8, false, false, true, 2),           // one initializer, two MatMuls
        ("blocks.1.proj", 8, 8, false, false, false, 1),          // float16 behind a Cast
        ("blocks.2.fused", 8, 8, true, false, false, 1),          // FusedMatMul transB
        ("lm_head", 8, 12, true, true, true, 1),                  // tied to the embedding Gather
    ];

    [Test]
    public void KitchenSinkDiscovery()
    {
        var layers = LinearLayers.Discover(RewriteTestModels.KitchenSink());
        Assert.That(layers.Select(l => (l.Module, l.In, l.Out, l.WeightTransposed, l.IsHead, l.IsShared, l.Uses.Count)),
            Is.EquivalentTo(KitchenSinkLayers));
        var fp16 = layers.Single(l => l.Module == "blocks.1.proj");
        Assert.That((fp16.WeightType, fp16.ComputeType), Is.EqualTo(((int)DataType.Float16, (int)DataType.Float)));
        Assert.That(layers.Single(l => l.Module == "lm_head").SharedWith.Single(), Does.Contain("Gather"));
        Assert.That(layers.Single(l => l.Module == "blocks.0.att.W_key").BlockIndex, Is.EqualTo(0));
    }

    [Test]
    public void ActivationTimesActivationIsNeverALayer()
    {
        Assert.That(LinearLayers.Discover(RewriteTestModels.NoWeights()), Is.Empty);
        var nodes = LinearLayers.Discover(RewriteTestModels.KitchenSink()).SelectMany(l => l.Nodes).ToList();
        Assert.That(nodes, Has.None.EqualTo("/blocks/blocks.0/att/MatMul").And.None.EqualTo("/blocks/blocks.0/att/MatMul_1"));
    }

    [TestCase("/trf_blocks/trf_blocks.0/att/W_query/MatMul", "trf_blocks.0.att.W_query")]
    [TestCase("/trf_blocks/trf_blocks.0/ff/ff.0/MatMul", "trf_blocks.0.ff.0")]
    [TestCase("/transformer/h.0/attn/c_attn/Gemm", "transformer.h.0.attn.c_attn")]
    [TestCase("/out_head/MatMul", "out_head")]
    [TestCase("MatMul_12", "")]
    public void ScopePath(string node, string module) => Assert.That(LinearLayers.ScopePath(node), Is.EqualTo(module));

    [Test]
    public void Gpt2SeparateQkvHas72LinearsAndATiedHead()
    {
        var layers = LinearLayers.Discover(Gpt2ShapeModel.Build(separateQkv: true));
        Assert.That(layers.Count(l => !l.IsHead), Is.EqualTo(72));
        var head = layers.Single(l => l.IsHead);
        Assert.That((head.Module, head.In, head.Out, head.WeightTransposed), Is.EqualTo(("lm_head", 768L, 50257L, true)));
    }

    [Test]
    public void Gpt2FusedHas48WeightMatMulsPlusTiedHead()
    {
        var layers = LinearLayers.Discover(Gpt2ShapeModel.Build(separateQkv: false));
        Assert.That(layers.Count(l => !l.IsHead), Is.EqualTo(48), "4 per block × 12");
        Assert.That(layers.Single(l => l.Module == "transformer.h.5.attn.c_attn").Out, Is.EqualTo(2304));
        Assert.That(layers.Single(l => l.IsHead).IsShared, Is.True);
    }

    [Test]
    public void Gpt2PresetFromOurBuilderHas48WeightMatMulsPlusTiedHead()
    {
        var config = GptConfig.Preset("gpt2");
        // zero weights: discovery only reads names, shapes and the graph, and zeros cost no random draws
        var zeros = GptLayout.Tensors(config).ToDictionary(t => t.Name, t => new WeightTensor(t.Shape, new float[t.Shape.Aggregate(1L, (a, b) => a * b)]));
        var model = GptBuilder.Build(config, GptWeights.Create(config, zeros));
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var layers = LinearLayers.Discover(model);
        TestContext.Out.WriteLine($"discovery on gpt2: {clock.Elapsed.TotalMilliseconds:F0} ms");
        Assert.That(layers.Where(l => !l.IsHead).Sum(l => l.Uses.Count), Is.EqualTo(48), "4 per block × 12");
        Assert.That(layers.Where(l => !l.IsHead).Select(l => l.Module.Split('.')[^1]).Distinct(), Is.EquivalentTo(new[] { "c_attn", "c_proj", "c_fc" }));
        var head = layers.Single(l => l.IsHead);
        Assert.That((head.Module, head.Weight, head.In, head.Out, head.WeightTransposed, head.SharedWith.Count),
            Is.EqualTo(("lm_head", "transformer.wte.weight", 768L, 50257L, true, 1)), "tied to the embedding Gather");
        var targets = LoraTargeting.Select(layers, new LoraConfig { Rank = 16, Alpha = 16, TargetModules = ["c_attn", "c_proj", "c_fc"] });
        long trainable = targets.Sum(t => t.Parameters);
        Assert.That(LoraRewrite.ParameterLine(trainable, LoraRewrite.CountParameters(model) + trainable), Is.EqualTo("trainable params: 2,359,296 || all params: 126,799,104 || trainable%: 1.8607"), "PEFT's numbers for GPT-2");
    }

    [TestCase(true, "trainable params: 2,654,208 || all params: 127,094,016 || trainable%: 2.0884")]
    [TestCase(false, "trainable params: 2,359,296 || all params: 126,799,104 || trainable%: 1.8607")]
    public void PeftParameterLineForGpt2_124M(bool separateQkv, string expected)
    {
        var config = new LoraConfig { Rank = 16, Alpha = 16, TargetModules = ["all-linear"] };
        var result = LoraRewrite.Rewrite(Gpt2ShapeModel.Build(separateQkv), config, "gpt2.onnx", "0");
        Assert.That(result.BaseParameters, Is.EqualTo(124_439_808), "GPT-2 124M with a tied head");
        Assert.That(result.ParameterLine, Is.EqualTo(expected));
    }
}
