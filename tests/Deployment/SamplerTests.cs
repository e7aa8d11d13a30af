using OnnxLora.Pipeline.Deployment;

namespace OnnxLora.Tests.Deployment;

public class SamplerTests
{
    // softmax → [0.5, 0.3, 0.15, 0.05]
    static readonly float[] Logits = [MathF.Log(0.5f), MathF.Log(0.3f), MathF.Log(0.15f), MathF.Log(0.05f)];
    static readonly float[] Shuffled = [Logits[2], Logits[0], Logits[3], Logits[1]];   // ids 1, 3, 0, 2 in order of likelihood

    static int[] Support(double[] p) => Enumerable.Range(0, p.Length).Where(i => p[i] > 0).ToArray();

    [Test]
    public void Greedy_is_the_argmax_lowest_id_on_ties()
    {
        Assert.That(new Sampler(SamplingOptions.Greedy).Next(Shuffled), Is.EqualTo(1));
        Assert.That(Sampler.ArgMax([1f, 3f, 3f, 0f]), Is.EqualTo(1));
        Assert.That(Support(Sampler.Distribution(Shuffled, SamplingOptions.Greedy)), Is.EqualTo(new[] { 1 }));
    }

    [Test]
    public void Temperature_one_is_the_softmax_and_higher_temperature_is_flatter()
    {
        var p = Sampler.Distribution(Logits, new SamplingOptions { Temperature = 1 });
        Assert.That(p, Is.EqualTo(new[] { 0.5, 0.3, 0.15, 0.05 }).Within(1e-6));
        var hot = Sampler.Distribution(Logits, new SamplingOptions { Temperature = 4 });
        Assert.That(hot[0], Is.LessThan(0.5));
        Assert.That(hot[3], Is.GreaterThan(0.05));
        Assert.That(hot.Sum(), Is.EqualTo(1).Within(1e-12));
    }

    static readonly object[] Restrictions =
    [
        new object[] { 0, 1.0, new[] { 0, 1, 2, 3 } },
        new object[] { 2, 1.0, new[] { 1, 3 } },
        new object[] { 1, 1.0, new[] { 1 } },
        new object[] { 0, 0.5, new[] { 1 } },
        new object[] { 0, 0.75, new[] { 1, 3 } },
        new object[] { 0, 0.9, new[] { 0, 1, 3 } },
        new object[] { 2, 0.9, new[] { 1, 3 } },         // top-k first, then the nucleus of what is left
    ];

    [TestCaseSource(nameof(Restrictions))]
    public void TopK_and_TopP_restrict_the_support(int topK, double topP, int[] support)
    {
        var options = new SamplingOptions { Temperature = 1, TopK = topK, TopP = topP, Seed = 1 };
        var p = Sampler.Distribution(Shuffled, options);
        Assert.That(Support(p), Is.EqualTo(support));
        Assert.That(p.Sum(), Is.EqualTo(1).Within(1e-12));
        var sampler = new Sampler(options);
        var drawn = Enumerable.Range(0, 500).Select(_ => sampler.Next(Shuffled)).Distinct().Order().ToArray();
        Assert.That(drawn, Is.EqualTo(support), "every draw lies in the support, and all of it is reached");
    }

    [Test]
    public void Seeded_sampling_is_reproducible_and_follows_the_distribution()
    {
        var options = new SamplingOptions { Temperature = 1, Seed = 42 };
        var a = new Sampler(options);
        var b = new Sampler(options);
        var first = Enumerable.Range(0, 20000).Select(_ => a.Next(Logits)).ToArray();
        Assert.That(Enumerable.Range(0, 20000).Select(_ => b.Next(Logits)), Is.EqualTo(first));
        var other = new Sampler(options with { Seed = 43 });
        Assert.That(Enumerable.Range(0, 200).Select(_ => other.Next(Logits)), Is.Not.EqualTo(first.Take(200)));
        var freq = Enumerable.Range(0, 4).Select(i => first.Count(x => x == i) / 20000.0).ToArray();
        Assert.That(freq, Is.EqualTo(new[] { 0.5, 0.3, 0.15, 0.05 }).Within(0.015));
    }

    [Test]
    public void Bad_options_name_the_field()
    {
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { TopP = 0 })!.Message, Does.Contain("TopP"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { Temperature = -1 })!.Message, Does.Contain("Temperature"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { TopK = -1 })!.Message, Does.Contain("TopK"));
    }
}
