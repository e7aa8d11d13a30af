using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// The KV-cache generator against the no-cache one on the same deployable model: torch exports with past (Optimum's
/// GPT-2, a Llama) and our own with-past builds, ragged batches (left padding), with and without a nonzero adapter.
/// </summary>
public class CachedGenerationTests
{
    static string Fixture(string path) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", path);

    public static IEnumerable<TestCaseData> Models()
    {
        yield return new TestCaseData("optimum/gpt2_opset14_with_past.onnx", "c_attn,c_fc");
        yield return new TestCaseData("optimum/gpt2_opset17_with_past.onnx", "c_attn,c_proj");
        yield return new TestCaseData("llama/llama_opset17_with_past.onnx", "q_proj,v_proj,down_proj");
    }

    [TestCaseSource(nameof(Models))]
    public void CachedGreedyTokensEqualTheNoCacheTokens(string file, string targets)
    {
        using var dir = new TempDir();
        var (host, _) = Deploy(Fixture(file), targets, dir);
        using (host)
            AssertCacheMatchesNoCache(host, file);
    }

    /// <summary>Deploys <paramref name="model"/> with a random nonzero adapter "a" loaded; returns the host and the adapter file.</summary>
    internal static (AdapterHost Host, string AdapterPath) Deploy(string model, string targets, TempDir dir)
    {
        var rw = dir.File("rw");
        var result = LoraRewrite.RewriteFile(model, new LoraConfig { Rank = 4, Alpha = 8, TargetModules = targets.Split(',') }, rw);
        var adapterPath = dir.File("a.onnx_adapter");
        OnnxAdapterFile.Write(adapterPath, LoraAdapter.CreateRandom(result.Manifest, seed: 5, amplitude: 0.5));
        var host = AdapterHost.Create(Path.Combine(rw, LoraManifest.DeployableModelFile));
        host.AddAdapter("a", adapterPath);
        return (host, adapterPath);
    }

    internal static void AssertCacheMatchesNoCache(AdapterHost host, string what)
    {
        var generator = new TextGenerator(host);
        Assert.That(generator.HasCache, Is.True, $"{what}: the deployable model keeps past/present");
        IReadOnlyList<int>[] prompts = [[5, 17, 99, 3, 42, 8, 11], [7], [120, 1, 33]];
        var greedy = new GenerationOptions { MaxNewTokens = 10 };
        var byAdapter = new Dictionary<string, IReadOnlyList<GenerationResult>>();
        foreach (var adapter in new[] { null, "a" })
        {
            var cached = generator.GenerateBatch(prompts, greedy, adapter);
            var plain = generator.GenerateBatch(prompts, greedy with { UseCache = false }, adapter);
            for (int r = 0; r < prompts.Length; r++)
            {
                Assert.That(cached[r].TokenIds, Has.Count.EqualTo(10));
                Assert.That(cached[r].TokenIds, Is.EqualTo(plain[r].TokenIds), $"{what}, adapter {adapter ?? "none"}, prompt {r}: cache vs no cache");
                Assert.That(generator.Generate(prompts[r], greedy, adapter).TokenIds, Is.EqualTo(cached[r].TokenIds), $"{what}, adapter {adapter ?? "none"}, prompt {r}: alone vs batched");
            }
            byAdapter[adapter ?? ""] = cached;
        }
        Assert.That(byAdapter["a"].Select(r => r.TokenIds), Is.Not.EqualTo(byAdapter[""].Select(r => r.TokenIds)), $"{what}: the adapter changes the tokens (else the comparison shows nothing)");

        // sampling and stop tokens walk the same path with a cache: the same seed gives the same tokens
        var stopAt = byAdapter[""][0].TokenIds[4];
        var sampled = new GenerationOptions { MaxNewTokens = 8, Sampling = new SamplingOptions { Temperature = 0.9, TopK = 20, TopP = 0.95, Seed = 11 }, StopTokenIds = [stopAt] };
        var withCache = generator.GenerateBatch(prompts, sampled, "a");
        var without = generator.GenerateBatch(prompts, sampled with { UseCache = false }, "a");
        for (int r = 0; r < prompts.Length; r++)
            Assert.That((withCache[r].TokenIds, withCache[r].StopReason), Is.EqualTo((without[r].TokenIds, without[r].StopReason)), $"{what}, sampled, prompt {r}");
        var stopped = generator.Generate(prompts[0], greedy with { StopTokenIds = [stopAt] });
        Assert.That((stopped.TokenIds, stopped.StopReason), Is.EqualTo((byAdapter[""][0].TokenIds.TakeWhile(t => t != stopAt).ToList(), "stop_token")));
    }

    [Test]
    public void AModelWithoutACacheStillGenerates()
    {
        using var host = AdapterHost.Create(Fixture("optimum/gpt2_opset17.onnx"));
        var generator = new TextGenerator(host);
        Assert.That(generator.HasCache, Is.False);
        Assert.That(generator.Generate([5, 17, 99], new GenerationOptions { MaxNewTokens = 3 }).TokenIds, Has.Count.EqualTo(3));
    }
}
