using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Tests.Deployment;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Reliability;

/// <summary>
/// Hostile adapters: an .onnx_adapter with a parameter twice or non-finite values, and PEFT folders whose
/// adapter_config.json has values of the wrong type or range, a rank that disagrees with the tensors, or a pattern
/// key that would make a backtracking regex engine hang.
/// </summary>
public class ReadersAdapterTests
{
    static readonly LoraManifest Manifest = TinyDeployable.Manifest();

    [Test]
    public void Onnx_adapter_with_a_parameter_twice_is_refused()
    {
        var p = AdapterParameter.FromFloats("lora_A.x", [1, 2], [1f, 2f]);
        var bytes = OnnxAdapterFile.Serialize([p, p]);
        var e = Assert.Throws<InvalidDataException>(() => OnnxAdapterFile.Parse(bytes, "dup.onnx_adapter"))!;
        Assert.That(e.Message, Does.StartWith("dup.onnx_adapter: parameter 'lora_A.x' appears twice"));
    }

    [Test]
    public void Onnx_adapter_dims_whose_byte_count_overflows_are_refused()
    {
        var bytes = OnnxAdapterFile.Serialize([new AdapterParameter("p", [1L << 62, 4], DataType.Float, ReadOnlyMemory<byte>.Empty)]);
        var e = Assert.Throws<InvalidDataException>(() => OnnxAdapterFile.Parse(bytes, "big.onnx_adapter"))!;
        Assert.That(e.Message, Does.StartWith("big.onnx_adapter: parameter 'p' has dims [4611686018427387904, 4], negative or overflowing int64"));
    }

    [Test]
    public void Onnx_adapter_with_a_nan_is_refused_with_the_tensor_and_index()
    {
        using var dir = new TempDir();
        var good = LoraAdapter.CreateRandom(Manifest, 1);
        var parameters = OnnxAdapterFile.DeployableParameters(good).ToList();
        var a = parameters[0];
        var values = a.ToFloats();
        values[5] = float.NaN;
        parameters[0] = AdapterParameter.FromFloats(a.Name, a.Dims, values);
        var path = dir.File("nan.onnx_adapter");
        File.WriteAllBytes(path, OnnxAdapterFile.Serialize(parameters));
        var e = Assert.Throws<InvalidDataException>(() => OnnxAdapterFile.Load(path, Manifest))!;
        Assert.That(e.Message, Is.EqualTo($"{path}: tensor '{a.Name}' holds NaN at index 5; adapter values must be finite"));
    }

    /// <summary>A PEFT folder of a random adapter, its adapter_config.json edited by <paramref name="edit"/>.</summary>
    static (string Dir, LoraAdapter Adapter) Peft(TempDir dir, Action<JsonObject> edit)
    {
        var adapter = LoraAdapter.CreateRandom(Manifest, 3);
        PeftAdapter.Write(dir.Path, adapter);
        var path = Path.Combine(dir.Path, PeftAdapter.ConfigFile);
        var json = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        edit(json);
        File.WriteAllText(path, json.ToJsonString());
        return (dir.Path, adapter);
    }

    static readonly (string Case, Action<JsonObject> Edit, string Expected)[] BadConfigs =
    [
        ("r 0", j => j["r"] = 0, "'r' is 0, expected a whole number from 1 to 65536"),
        ("r string", j => j["r"] = "8", "'r' is \"8\", expected a finite number"),
        ("r fraction", j => j["r"] = 2.5, "'r' is 2.5, expected a whole number"),
        ("r disagrees with tensors", j => j["r"] = 2 * TinyDeployable.Rank, $"r for module 'transformer.h.0.mlp.c_fc' is {2 * TinyDeployable.Rank}, but its tensor 'base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight' has rank {TinyDeployable.Rank}"),
        ("lora_alpha 1e300", j => j["lora_alpha"] = 1e300, "'lora_alpha' is 1E+300, expected a number in (0, 1000000]"),
        ("lora_alpha negative", j => j["lora_alpha"] = -8, "'lora_alpha' is -8, expected a number in (0, 1000000]"),
        ("lora_alpha NaN string", j => j["lora_alpha"] = "NaN", "'lora_alpha' is \"NaN\", expected a finite number"),
        ("no lora_alpha", j => j.Remove("lora_alpha"), "no 'lora_alpha'"),
        ("use_rslora string", j => j["use_rslora"] = "yes", "'use_rslora' is \"yes\", expected true or false"),
        ("peft_type number", j => j["peft_type"] = 5, "'peft_type' is 5, expected a string"),
        ("rank_pattern fraction", j => j["rank_pattern"] = new JsonObject { ["c_fc"] = 1.5 }, "'rank_pattern.c_fc' is 1.5, expected a whole number"),
        ("alpha_pattern not an object", j => j["alpha_pattern"] = new JsonArray(1), "'alpha_pattern' is [1], expected an object"),
        ("lookaround key", j => j["alpha_pattern"] = new JsonObject { ["(?=c)c_fc"] = 4 }, "'alpha_pattern' key: pattern '(?=c)c_fc' uses a regex feature"),
        ("invalid regex key", j => j["rank_pattern"] = new JsonObject { ["c_fc("] = 3 }, "'rank_pattern' key: pattern 'c_fc(' is not a valid regex"),
    ];

    static IEnumerable<TestCaseData> BadConfigCases() => BadConfigs.Select(c => new TestCaseData(c.Case).SetName($"Peft_config_refuses_{c.Case.Replace(' ', '_')}"));

    [TestCaseSource(nameof(BadConfigCases))]
    public void Peft_config_faults_name_the_file_and_the_key(string name)
    {
        var c = BadConfigs.Single(x => x.Case == name);
        using var dir = new TempDir();
        var (folder, _) = Peft(dir, c.Edit);
        var e = Assert.Throws<InvalidDataException>(() => PeftAdapter.Read(folder, Manifest))!;
        Assert.That(e.Message, Does.StartWith(Path.Combine(folder, PeftAdapter.ConfigFile) + ": ").And.Contain(c.Expected).And.Not.Contain("\n"));
    }

    [Test]
    public void Catastrophic_pattern_key_is_matched_in_linear_time()
    {
        // a backtracking engine tries 2^n ways to split the path between the two '.' branches before failing
        var module = string.Join('.', Enumerable.Repeat("transformer_h_block", 20));
        var match = Task.Run(() => LoraTargeting.MatchesPatternKey("(.|.)*Z", module));
        Assert.That(match.Wait(TimeSpan.FromSeconds(60)), Is.True, "must not hang");
        Assert.That(match.Result, Is.False);

        using var dir = new TempDir();
        var (folder, adapter) = Peft(dir, j => j["alpha_pattern"] = new JsonObject { ["(.|.)*Z"] = 1 });
        var back = PeftAdapter.Read(folder, Manifest);
        Assert.That(back.B(Manifest.Targets[0]).Data, Is.EqualTo(adapter.B(Manifest.Targets[0]).Data).Within(1e-6), "a key that matches nothing changes nothing");
    }

    [Test]
    public void An_alternation_key_matches_the_same_modules_in_the_rewrite_and_the_peft_import()
    {
        // "c_f|xyz" used to match "….c_fc" in the importer (its regex lost the group around the key), not in the rewrite
        const string key = "c_f|xyz";
        Assert.That(LoraTargeting.MatchesPatternKey(key, "transformer.h.0.mlp.c_fc"), Is.False);
        Assert.That(LoraTargeting.MatchesPatternKey("c_fc|xyz", "transformer.h.0.mlp.c_fc"), Is.True);
        using var dir = new TempDir();
        var (folder, adapter) = Peft(dir, j => j["alpha_pattern"] = new JsonObject { [key] = 1000 });
        var back = PeftAdapter.Read(folder, Manifest);
        foreach (var t in Manifest.Targets)
            Assert.That(back.B(t).Data, Is.EqualTo(adapter.B(t).Data).Within(1e-6), t.Module);

        using var dir2 = new TempDir();
        var (folder2, adapter2) = Peft(dir2, j => j["alpha_pattern"] = new JsonObject { ["c_fc|xyz"] = 2 * TinyDeployable.Alpha });
        var scaled = PeftAdapter.Read(folder2, Manifest).B(Manifest.Targets[0]).Data;
        Assert.That(scaled, Is.EqualTo(adapter2.B(Manifest.Targets[0]).Data.Select(v => 2 * v)).Within(1e-5), "PEFT's alpha 2× the manifest's doubles B");
    }

    [Test]
    public void Peft_tensors_must_be_finite_and_float()
    {
        using var dir = new TempDir();
        var (folder, _) = Peft(dir, _ => { });
        var weights = Path.Combine(folder, PeftAdapter.WeightsFile);
        var (tensors, metadata) = SafeTensorsFile.Read(weights);
        var key = tensors.Keys.First(k => k.EndsWith("lora_B.weight", StringComparison.Ordinal));
        var values = tensors[key].ToFloats();
        values[0] = float.PositiveInfinity;
        tensors[key] = SafeTensor.FromFloats(tensors[key].Shape, values);
        SafeTensorsFile.Write(weights, tensors, metadata);
        var e = Assert.Throws<InvalidDataException>(() => PeftAdapter.Read(folder, Manifest))!;
        Assert.That(e.Message, Does.StartWith(weights).And.Contain("holds ∞ at index 0; adapter values must be finite").Or.Contain("holds Infinity at index 0"));

        tensors[key] = new SafeTensor("I64", tensors[key].Shape, new byte[tensors[key].ElementCount * 8]);
        SafeTensorsFile.Write(weights, tensors, metadata);
        e = Assert.Throws<InvalidDataException>(() => PeftAdapter.Read(folder, Manifest))!;
        Assert.That(e.Message, Does.StartWith(weights).And.Contain($"tensor '{key}' has dtype I64"));
    }
}
