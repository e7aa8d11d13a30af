using System.Text.Json.Nodes;

namespace OnnxLora.Tests.Reliability;

/// <summary>
/// lora_config.json is a file a user may be handed with a rewrite: a manifest whose scales, ranks or names do not add up,
/// or that belongs to another rewrite's model, is refused by `train` before any step, naming the file and the target,
/// and the run folder is left as it was (not created).
/// </summary>
[NonParallelizable]
public class ReadersManifestTests
{
    static string Tiny => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "tiny.onnx");

    static IEnumerable<TestCaseData> Corruptions()
    {
        yield return new TestCaseData("scale", (Action<JsonObject>)(t => t["scale"] = 1e300), "'scale' is 1E+300, but Peft scaling of alpha 8 at rank 8 gives 1").SetName("Manifest_refuses_a_stray_scale");
        yield return new TestCaseData("alpha", (Action<JsonObject>)(t => t["alpha"] = -2.0), "'alpha' is -2, expected a finite number > 0").SetName("Manifest_refuses_a_negative_alpha");
        yield return new TestCaseData("rank", (Action<JsonObject>)(t => t["rank"] = 0), "'rank' is 0, expected 1 to 65,536").SetName("Manifest_refuses_rank_zero");
        yield return new TestCaseData("in", (Action<JsonObject>)(t => t["in"] = -5), "'in' -5 and 'out' 96 must be between 1").SetName("Manifest_refuses_negative_dims");
        yield return new TestCaseData("lora_a", (Action<JsonObject>)(t => t["lora_a"] = t["lora_b"]!.GetValue<string>()), "is named twice").SetName("Manifest_refuses_a_parameter_named_twice");
        // a consistent manifest of rank 4 beside a model rewritten at rank 8: caught against the model's inputs
        yield return new TestCaseData("rank", (Action<JsonObject>)(t => { t["rank"] = 4; t["alpha"] = 4.0; }), "has shape [32, 8], but lora_config.json needs [32, 4]").SetName("Manifest_refuses_a_rank_its_model_does_not_have");
    }

    [TestCaseSource(nameof(Corruptions))]
    public void Train_refuses_a_manifest_that_does_not_add_up(string field, Action<JsonObject> corrupt, string expected)
    {
        using var dir = new TempDir();
        var (code, _, err) = CliRunner.Run("rewrite", Tiny, "--rank", "8", "--alpha", "8", "--out", dir.File("rw"));
        Assert.That(code, Is.Zero, err);
        var manifestPath = dir.File("rw/lora_config.json");
        var manifest = JsonNode.Parse(File.ReadAllText(manifestPath))!.AsObject();
        var target = manifest["targets"]!.AsArray()[0]!.AsObject();
        Assert.That(target["module"]!.GetValue<string>(), Is.EqualTo("transformer.h.0.attn.c_attn"), "the fixture's first target, which the messages name");
        corrupt(target);
        File.WriteAllText(manifestPath, manifest.ToJsonString());
        File.WriteAllText(dir.File("t.jsonl"), "{\"input_ids\":[1,2,3,4,5,6,7,8,9]}\n");

        (code, _, err) = CliRunner.Run("train", "--model", dir.File("rw"), "--data", dir.File("t.jsonl"), "--format", "tokens", "--max-steps", "1", "--out", dir.File("run"));
        Assert.That(code, Is.EqualTo(1), $"a corrupt '{field}' must not train");
        Assert.That(err.Trim(), Does.StartWith("error: ").And.Contain("lora_config.json").And.Contain(expected).And.Not.Contain("\n"));
        Assert.That(Directory.Exists(dir.File("run")), Is.False, "a refused start leaves no run folder behind");
    }

    [Test]
    public void Train_refuses_a_manifest_with_a_module_listed_twice()
    {
        using var dir = new TempDir();
        Assert.That(CliRunner.Run("rewrite", Tiny, "--rank", "8", "--alpha", "8", "--out", dir.File("rw")).Code, Is.Zero);
        var manifestPath = dir.File("rw/lora_config.json");
        var manifest = JsonNode.Parse(File.ReadAllText(manifestPath))!.AsObject();
        var targets = manifest["targets"]!.AsArray();
        targets.Add(targets[0]!.DeepClone());
        File.WriteAllText(manifestPath, manifest.ToJsonString());
        File.WriteAllText(dir.File("t.jsonl"), "{\"input_ids\":[1,2,3,4,5,6,7,8,9]}\n");
        var (code, _, err) = CliRunner.Run("train", "--model", dir.File("rw"), "--data", dir.File("t.jsonl"), "--format", "tokens", "--max-steps", "1", "--out", dir.File("run"));
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err.Trim(), Is.EqualTo($"error: {manifestPath}: targets[{targets.Count - 1}] ('transformer.h.0.attn.c_attn'): the module is listed twice; re-run 'onnxlora rewrite'"));
    }
}
