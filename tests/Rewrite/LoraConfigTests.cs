using OnnxLora.GraphRewrite.Lora;

namespace OnnxLora.Tests.Rewrite;

public class LoraConfigTests
{
    static LinearLayer Layer(string module, bool head = false, long @in = 8, long @out = 8) => new()
    {
        Module = module, Weight = module + ".weight", Uses = [], In = @in, Out = @out, WeightTransposed = false,
        WeightType = 1, ComputeType = 1, IsHead = head, SharedWith = [], BlockIndex = LinearLayers.BlockIndexOf(module),
    };

    static readonly LinearLayer[] Gpt2Block =
    [
        Layer("transformer.h.0.attn.c_attn", @out: 24), Layer("transformer.h.0.attn.c_proj"),
        Layer("transformer.h.0.mlp.c_fc", @out: 32), Layer("transformer.h.0.mlp.c_proj", @in: 32),
        Layer("transformer.h.1.attn.c_attn", @out: 24), Layer("transformer.h.1.attn.c_proj"),
        Layer("transformer.h.10.mlp.c_fc", @out: 32), Layer("lm_head", head: true, @out: 50),
    ];

    // (case, pattern, module, head, matches): PEFT's check_target_module_exists semantics
    [TestCase("exact name", "lm_head", "lm_head", false, true)]
    [TestCase("suffix at a dot", "c_attn", "transformer.h.0.attn.c_attn", false, true)]
    [TestCase("multi-segment suffix", "attn.c_proj", "transformer.h.0.attn.c_proj", false, true)]
    [TestCase("suffix must start at a dot", "attn", "transformer.h.0.attn.c_attn", false, false)]
    [TestCase("no partial segment", "proj", "transformer.h.0.attn.c_proj", false, false)]
    [TestCase("regex is a full match", "re:.*\\.attn\\..*", "transformer.h.0.attn.c_attn", false, true)]
    [TestCase("regex must match all", "re:attn", "transformer.h.0.attn.c_attn", false, false)]
    [TestCase("regex alternation", "re:.*(W_query|W_value)", "trf_blocks.0.att.W_value", false, true)]
    [TestCase("all-linear takes linears", "all-linear", "transformer.h.0.mlp.c_fc", false, true)]
    [TestCase("all-linear skips the head", "all-linear", "lm_head", true, false)]
    [TestCase("a head can be named", "lm_head", "lm_head", true, true)]
    public void PatternMatching(string _, string pattern, string module, bool head, bool expected) =>
        Assert.That(LoraTargeting.Matches(pattern, Layer(module, head)), Is.EqualTo(expected));

    // (case, targets, exclude, layers, expected modules)
    static IEnumerable<TestCaseData> SelectionCases()
    {
        yield return new TestCaseData(new[] { "c_attn" }, Array.Empty<string>(), null, new[] { "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn" }).SetName("names select every block");
        yield return new TestCaseData(new[] { "all-linear" }, new[] { "c_proj" }, null, new[] { "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn", "transformer.h.10.mlp.c_fc" }).SetName("exclude removes");
        yield return new TestCaseData(new[] { "all-linear" }, Array.Empty<string>(), new[] { 1, 10 }, new[] { "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.10.mlp.c_fc" }).SetName("layers filter by block index");
        yield return new TestCaseData(new[] { "re:.*\\.mlp\\..*" }, new[] { "re:.*c_proj" }, null, new[] { "transformer.h.0.mlp.c_fc", "transformer.h.10.mlp.c_fc" }).SetName("regex targets and excludes");
        yield return new TestCaseData(new[] { "lm_head", "c_fc" }, Array.Empty<string>(), null, new[] { "transformer.h.0.mlp.c_fc", "transformer.h.10.mlp.c_fc", "lm_head" }).SetName("head by name, graph order kept");
    }

    [TestCaseSource(nameof(SelectionCases))]
    public void Selection(string[] targets, string[] exclude, int[]? layers, string[] expected)
    {
        var config = new LoraConfig { Rank = 4, Alpha = 8, TargetModules = targets, ExcludeModules = exclude, LayersToTransform = layers };
        var chosen = LoraTargeting.Select(Gpt2Block, config);
        Assert.That(chosen.Select(c => c.Layer.Module), Is.EqualTo(expected));
        Assert.That(chosen.All(c => c.Scale == 2.0), "alpha/r = 8/4");
    }

    [Test]
    public void RankAndAlphaPatternsOverridePerModule()
    {
        var config = new LoraConfig
        {
            Rank = 4, Alpha = 8, TargetModules = ["all-linear"], Scaling = LoraScaling.RsLora,
            RankPattern = new Dictionary<string, int> { ["c_attn"] = 2, ["h\\.1\\..*"] = 6 },
            AlphaPattern = new Dictionary<string, double> { ["mlp.c_fc"] = 1 },
        };
        var chosen = LoraTargeting.Select(Gpt2Block, config).ToDictionary(c => c.Layer.Module);
        Assert.That(chosen["transformer.h.0.attn.c_attn"].Rank, Is.EqualTo(2), "first matching key wins");
        Assert.That(chosen["transformer.h.1.attn.c_attn"].Rank, Is.EqualTo(2));
        Assert.That(chosen["transformer.h.1.attn.c_proj"].Rank, Is.EqualTo(6));
        Assert.That(chosen["transformer.h.0.attn.c_proj"].Rank, Is.EqualTo(4));
        Assert.That(chosen["transformer.h.0.mlp.c_fc"].Alpha, Is.EqualTo(1));
        Assert.That(chosen["transformer.h.0.mlp.c_fc"].Scale, Is.EqualTo(1 / Math.Sqrt(4)).Within(1e-15), "rsLoRA: alpha/√r");
        Assert.That(chosen["transformer.h.1.attn.c_proj"].Scale, Is.EqualTo(8 / Math.Sqrt(6)).Within(1e-15));
    }

    [TestCase(LoraScaling.Peft, 16, 8, 2)]
    [TestCase(LoraScaling.Peft, 8, 16, 0.5)]
    [TestCase(LoraScaling.RsLora, 16, 4, 8)]
    [TestCase(LoraScaling.Alpha, 16, 8, 16)]
    public void Scaling(LoraScaling scaling, double alpha, int rank, double expected) =>
        Assert.That(new LoraConfig { Scaling = scaling }.ScaleFor(rank, alpha), Is.EqualTo(expected));

    [Test]
    public void UnknownTargetListsNearestCandidates()
    {
        var e = Assert.Throws<ArgumentException>(() => LoraTargeting.Select(Gpt2Block, new LoraConfig { TargetModules = ["c_atn"] }));
        Assert.That(e!.Message, Does.StartWith("target 'c_atn' matches no linear module; nearest: c_attn,"));
    }

    [Test]
    public void RankAboveMinInOutNamesTheModule()
    {
        var e = Assert.Throws<ArgumentException>(() => LoraTargeting.Select(Gpt2Block, new LoraConfig { Rank = 9, TargetModules = ["c_attn"] }));
        Assert.That(e!.Message, Does.Contain("'transformer.h.0.attn.c_attn'").And.Contain("min(8, 24)"));
    }

    [Test]
    public void NoLayersIsAnError() =>
        Assert.That(() => LoraTargeting.Select([], new LoraConfig()), Throws.ArgumentException.With.Message.Contains("no LoRA-able"));

    [Test]
    public void EverythingFilteredAwayIsAnError() =>
        Assert.That(() => LoraTargeting.Select(Gpt2Block, new LoraConfig { TargetModules = ["c_attn"], LayersToTransform = [5] }),
            Throws.ArgumentException.With.Message.Contains("remove all of them"));

    [TestCase("Rank", 0)]
    [TestCase("Rank", -3)]
    [TestCase("Alpha", 0)]
    [TestCase("Dropout", 1)]
    [TestCase("Dropout", -0.1)]
    public void InvalidValuesAreRejectedOnConstruction(string field, double value)
    {
        Action make = field switch
        {
            "Rank" => () => _ = new LoraConfig { Rank = (int)value },
            "Alpha" => () => _ = new LoraConfig { Alpha = value },
            _ => () => _ = new LoraConfig { Dropout = value },
        };
        var e = Assert.Throws<LoraConfigException>(() => make());
        Assert.That(e!.Field, Is.EqualTo(field));
        Assert.That(e.Message, Does.StartWith(field));
        // `with` goes through the same checks
        if (field == "Rank") Assert.Throws<LoraConfigException>(() => _ = new LoraConfig() with { Rank = (int)value });
    }

    [Test]
    public void BadRegexIsRejected() =>
        Assert.That(() => new LoraConfig { TargetModules = ["re:(unclosed"] }, Throws.InstanceOf<ArgumentException>().With.Message.Contains("not a valid regular expression"));

    [TestCase("0,1,10-11", new[] { 0, 1, 10, 11 })]
    [TestCase(" 3 , 2-2 ", new[] { 2, 3 })]
    public void ParseLayers(string text, int[] expected) => Assert.That(LoraConfig.ParseLayers(text), Is.EqualTo(expected));

    [TestCase("1-")]
    [TestCase("a")]
    [TestCase("5-2")]
    public void ParseLayersRejects(string text) => Assert.Throws<FormatException>(() => LoraConfig.ParseLayers(text));

    [Test]
    public void ParsePatternValuesSplitsAtTheLastEquals() =>
        Assert.That(LoraConfig.ParsePatternValues("c_attn=4,re.*(?=x)=2", "rank-pattern"),
            Is.EqualTo(new Dictionary<string, double> { ["c_attn"] = 4, ["re.*(?=x)"] = 2 }));
}

public class LoraInitialValuesTests
{
    [Test]
    public void KaimingUniformIsBoundedByOneOverSqrtInAndSeeded()
    {
        var a = LoraInitialValues.A(768, 16, LoraInit.Kaiming, seed: 1, "h.0.attn.c_attn");
        double bound = 1 / Math.Sqrt(768);
        Assert.That(a, Has.Length.EqualTo(768 * 16));
        Assert.That(a.Max(Math.Abs), Is.LessThanOrEqualTo(bound).And.GreaterThan(0.95 * bound), "U(-1/√in, 1/√in) fills its range");
        Assert.That(a.Average(), Is.EqualTo(0).Within(bound / 20));
        Assert.That(LoraInitialValues.A(768, 16, LoraInit.Kaiming, 1, "h.0.attn.c_attn"), Is.EqualTo(a), "same seed and module, same values");
        Assert.That(LoraInitialValues.A(768, 16, LoraInit.Kaiming, 2, "h.0.attn.c_attn"), Is.Not.EqualTo(a), "another seed");
        Assert.That(LoraInitialValues.A(768, 16, LoraInit.Kaiming, 1, "h.1.attn.c_attn"), Is.Not.EqualTo(a), "another module");
    }

    [Test]
    public void GaussianHasStandardDeviationOneOverRank()
    {
        var a = LoraInitialValues.A(1024, 8, LoraInit.Gaussian, seed: 3, "m");
        double mean = a.Average();
        double std = Math.Sqrt(a.Select(v => (v - mean) * (v - mean)).Average());
        Assert.That(std, Is.EqualTo(1.0 / 8).Within(0.005), "PEFT's gaussian: σ = 1/r");
        Assert.That(mean, Is.EqualTo(0).Within(0.005));
    }
}
