using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.GraphRewrite.Graphs;

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
        var (host, adapterPath) = Deploy(Fixture(file), targets, dir);
        using (host)
        {
            AssertCacheMatchesNoCache(host, file);

            // the merged export keeps the cache too, and gives what the adapter gives
            var merged = dir.File("merged.onnx");
            var (code, _, err) = CliRunner.Run("merge", "--model", dir.File("rw"), "--adapter", adapterPath, "--out", merged);
            Assert.That(code, Is.EqualTo(0), err);
            using var mergedHost = AdapterHost.Create(merged);
            var mergedGenerator = new TextGenerator(mergedHost);
            Assert.That(mergedGenerator.HasCache, Is.True, $"{file}: merged keeps past/present");
            IReadOnlyList<int>[] prompts = [[5, 17, 99, 3], [8, 11]];
            var options = new GenerationOptions { MaxNewTokens = 10 };
            Assert.That(mergedGenerator.GenerateBatch(prompts, options).Select(r => r.TokenIds),
                        Is.EqualTo(new TextGenerator(host).GenerateBatch(prompts, options, "a").Select(r => r.TokenIds)), $"{file}: merged vs adapter");
        }
    }

    /// <summary>Deploys <paramref name="model"/> with a random nonzero adapter "a" loaded; returns the host and the adapter file.</summary>
    internal static (AdapterHost Host, string AdapterPath) Deploy(string model, string targets, TempDir dir)
    {
        var rw = dir.File("rw");
        var result = LoraRewrite.RewriteFile(model, new LoraConfig { Rank = 4, Alpha = 8, TargetModules = targets.Split(',') }, rw);
        var adapterPath = dir.File("a.onnx_adapter");
        OnnxAdapterFile.Write(adapterPath, LoraAdapter.CreateRandom(result.Manifest, seed: 5, amplitude: 0.5));
        var host = AdapterHost.Create(Path.Combine(rw, RunLayout.DeployableModel));
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

    /// <summary>
    /// <c>model build --with-past</c> (gpt2 and llama archs, the llama tiny preset with grouped-query attention): the
    /// cache path gives the no-cache tokens, and the with-past graph is the same model as the plain build (the same
    /// greedy tokens from the plain build, base and adapter).
    /// </summary>
    [TestCase("gpt2", "c_attn,c_fc")]
    [TestCase("llama", "q_proj,k_proj,v_proj,o_proj,up_proj")]
    public void ModelBuildWithPastGeneratesWhatThePlainBuildGenerates(string arch, string targets)
    {
        using var dir = new TempDir();
        string Build(string name, params string[] extra)
        {
            var path = dir.File(name);
            var (code, _, err) = CliRunner.Run(["model", "build", "--arch", arch, "--preset", "tiny", "--seed", "4", "--out", path, .. extra]);
            Assert.That(code, Is.EqualTo(0), err);
            return path;
        }
        var withPast = Build("past.onnx", "--with-past");
        var plain = Build("plain.onnx");
        using var pastDir = new TempDir();
        using var plainDir = new TempDir();
        var (pastHost, _) = Deploy(withPast, targets, pastDir);
        var (plainHost, _) = Deploy(plain, targets, plainDir);
        using (pastHost)
        using (plainHost)
        {
            AssertCacheMatchesNoCache(pastHost, $"{arch} --with-past");
            Assert.That(new TextGenerator(plainHost).HasCache, Is.False);
            IReadOnlyList<int>[] prompts = [[9, 300, 2, 77], [41, 5]];
            var options = new GenerationOptions { MaxNewTokens = 12 };
            foreach (var adapter in new[] { null, "a" })
                Assert.That(new TextGenerator(pastHost).GenerateBatch(prompts, options, adapter).Select(r => r.TokenIds),
                            Is.EqualTo(new TextGenerator(plainHost).GenerateBatch(prompts, options, adapter).Select(r => r.TokenIds)),
                            $"{arch}, adapter {adapter ?? "none"}: with past (cached) vs the plain build");
        }
    }

    /// <summary>A request of many runs (a cached generation) keeps its adapter when the adapter is removed meanwhile.</summary>
    [Test]
    public void ALeaseKeepsItsAdapterUntilItEnds()
    {
        using var dir = new TempDir();
        var (host, _) = Deploy(Fixture("optimum/gpt2_opset17_with_past.onnx"), "c_attn", dir);
        using (host)
        {
            var signature = ModelSignature.Of(host);
            float[] Logits(Func<Dictionary<string, Microsoft.ML.OnnxRuntime.OrtValue>, Microsoft.ML.OnnxRuntime.IDisposableReadOnlyCollection<Microsoft.ML.OnnxRuntime.OrtValue>> run)
            {
                var feeds = signature.Feeds([[5, 17, 99]], 3, padId: 0);
                try { using var outputs = run(feeds); return outputs[0].GetTensorDataAsSpan<float>().ToArray(); }
                finally { foreach (var v in feeds.Values) v.Dispose(); }
            }
            var adapted = Logits(f => host.Run("a", f, [signature.Logits]));
            var baseline = Logits(f => host.Run((string?)null, f, [signature.Logits]));
            Assert.That(adapted, Is.Not.EqualTo(baseline));
            var lease = host.Lease("a");
            Assert.That(host.RemoveAdapter("a"), Is.True);
            Assert.That(Logits(f => lease.Run(f, [signature.Logits])), Is.EqualTo(adapted), "the lease still runs the removed adapter");
            Assert.Throws<KeyNotFoundException>(() => host.Lease("a"));
            lease.Dispose();
            Assert.Throws<ObjectDisposedException>(() => Logits(f => lease.Run(f, [signature.Logits])));
        }
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
