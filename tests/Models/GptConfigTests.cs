using OnnxLora.Models;

namespace OnnxLora.Tests.Models;

public class GptConfigTests
{
    [TestCase("tiny", 512, 64, 32, 2, 2)]
    [TestCase("small", 50257, 256, 128, 4, 4)]
    [TestCase("gpt2", 50257, 1024, 768, 12, 12)]
    [TestCase("gpt2-medium", 50257, 1024, 1024, 16, 24)]
    [TestCase("gpt2-large", 50257, 1024, 1280, 20, 36)]
    [TestCase("GPT2-XL", 50257, 1024, 1600, 25, 48)]
    public void PresetsHaveThePublishedShapes(string name, int vocab, int context, int width, int heads, int layers)
    {
        var c = GptConfig.Preset(name);
        Assert.That((c.VocabSize, c.ContextLength, c.EmbedDim, c.Heads, c.Layers), Is.EqualTo((vocab, context, width, heads, layers)));
        Assert.That(c.LayerNormEpsilon, Is.EqualTo(1e-5));
        Assert.That(c.QkvBias, Is.True);
        Assert.That(c.PresetName, Is.EqualTo(name.ToLowerInvariant()));
    }

    [Test]
    public void ParameterCountsMatchHuggingFace()
    {
        // GPT2LMHeadModel.num_parameters() for the published checkpoints (tied head counted once)
        Assert.That(GptConfig.Preset("gpt2").ParameterCount, Is.EqualTo(124_439_808));
        Assert.That(GptConfig.Preset("gpt2-medium").ParameterCount, Is.EqualTo(354_823_168));
        Assert.That(GptConfig.Preset("gpt2-large").ParameterCount, Is.EqualTo(774_030_080));
        Assert.That(GptConfig.Preset("gpt2-xl").ParameterCount, Is.EqualTo(1_557_611_200));
        var tiny = GptConfig.Preset("tiny");
        Assert.That(GptWeights.Random(tiny).ParameterCount, Is.EqualTo(tiny.ParameterCount));
    }

    [Test]
    public void UnknownPresetListsTheValidNames()
    {
        var e = Assert.Throws<ArgumentException>(() => GptConfig.Preset("gpt3"));
        Assert.That(e!.Message, Does.Contain("'gpt3'").And.Contain("tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl"));
    }

    [Test]
    public void InvalidConfigsNameTheField()
    {
        Assert.That(() => new GptConfig(512, 64, 30, 4, 2), Throws.ArgumentException.With.Message.Contains("EmbedDim (30) must be divisible by Heads (4)"));
        Assert.That(() => new GptConfig(0, 64, 32, 2, 2), Throws.ArgumentException.With.Message.Contains("VocabSize must be positive"));
        Assert.That(() => new GptConfig(512, 64, 32, 2, -1), Throws.ArgumentException.With.Message.Contains("Layers must be positive"));
        Assert.That(() => new GptConfig(512, 64, 32, 2, 2, LayerNormEpsilon: 0), Throws.ArgumentException.With.Message.Contains("LayerNormEpsilon"));
        // `with` skips the constructor, so consumers validate again
        var copy = GptConfig.Preset("tiny") with { Heads = 5 };
        Assert.That(copy.Validate, Throws.ArgumentException.With.Message.Contains("divisible"));
    }
}
