using Google.Protobuf;
using OnnxLora.Models;

namespace OnnxLora.Tests.Models;

public class TinyFixtureTests
{
    [Test]
    public void CommittedTinyOnnxEqualsAFreshBuild()
    {
        // tests/fixtures/tiny.onnx is what other tests load; it must stay what the builder writes today. Regenerate with
        //   dotnet run --project tools -- model build --preset tiny --seed 0 --out tests/fixtures/tiny.onnx --force
        var committed = File.ReadAllBytes(Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "tiny.onnx"));
        var config = GptConfig.Preset("tiny");
        var fresh = GptBuilder.Build(config, GptWeights.Random(config, 0)).ToByteArray();
        Assert.That(committed.SequenceEqual(fresh), "tests/fixtures/tiny.onnx is stale: regenerate it (see the comment above)");
    }
}

/// <summary>
/// tests/fixtures/hf-gpt2-tiny: a Hugging Face-layout GPT-2 checkpoint (GPT2Model names, attn.bias buffers,
/// config.json) with PyTorch's logits, written by tools/fixtures/make_hf_gpt2.py.
/// </summary>
public class HfGpt2FixtureTests
{
    static string Fixture(string name) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "hf-gpt2-tiny", name);

    static (GptConfig Config, long[,] InputIds, long[] Shape, double[] Logits) Golden()
    {
        using var json = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Fixture("golden.json")));
        var root = json.RootElement;
        var c = root.GetProperty("config");
        var config = new GptConfig(c.GetProperty("vocab_size").GetInt32(), c.GetProperty("n_positions").GetInt32(),
                                   c.GetProperty("n_embd").GetInt32(), c.GetProperty("n_head").GetInt32(), c.GetProperty("n_layer").GetInt32());
        var rows = root.GetProperty("input_ids").EnumerateArray().Select(r => r.EnumerateArray().Select(x => x.GetInt64()).ToArray()).ToArray();
        var ids = new long[rows.Length, rows[0].Length];
        for (int b = 0; b < rows.Length; b++) for (int t = 0; t < rows[b].Length; t++) ids[b, t] = rows[b][t];
        return (config, ids, root.GetProperty("logits_shape").EnumerateArray().Select(x => x.GetInt64()).ToArray(),
                root.GetProperty("logits").EnumerateArray().Select(x => x.GetDouble()).ToArray());
    }

    [Test]
    public void ImportedCheckpointReproducesPyTorchLogits()
    {
        var (config, ids, shape, logits) = Golden();
        // without a config, the head count (4, where the tiny preset of the same width has 2) comes from config.json
        var weights = GptWeights.FromSafeTensors(Fixture("model.safetensors"));
        Assert.That(weights.Config, Is.EqualTo(config));
        Assert.That(GptWeights.FromSafeTensors(Fixture("model.safetensors"), config).Config, Is.EqualTo(config));

        using var session = new Microsoft.ML.OnnxRuntime.InferenceSession(GptBuilder.Build(config, weights).ToByteArray());
        var actual = GptBuilderTests.OrtLogits(session, ids, out var actualShape);
        Assert.That(actualShape, Is.EqualTo(shape));
        GptBuilderTests.AssertClose(actual, logits, 1e-4, "hf-gpt2-tiny vs PyTorch");
        var reference = ReferenceGpt.Forward(weights, config.Heads, config.LayerNormEpsilon, ids);
        GptBuilderTests.AssertClose(Array.ConvertAll(reference, x => (float)x), logits, 1e-4, "reference forward vs PyTorch");
    }
}
