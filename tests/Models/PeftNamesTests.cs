using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;

namespace OnnxLora.Tests.Models;

/// <summary>
/// PEFT tensor names as Hugging Face PEFT writes them for each architecture, both ways: an adapter of a rewritten
/// builder model exports as base_model.model.&lt;HF module&gt;.lora_A/B.weight ([r, in] / [out, r]) with fan_in_fan_out
/// only for GPT-2's Conv1D, and a folder written under those names reads back into the same A/B.
/// </summary>
public class PeftNamesTests
{
    static IEnumerable<TestCaseData> Cases()
    {
        var llama = LlamaWeights.Random(LlamaConfig.Preset("tiny"), seed: 1);
        yield return new TestCaseData("llama", (Func<Onnx.ModelProto>)(() => LlamaBuilder.Build(llama)), "q_proj,v_proj,down_proj",
            new[] { "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" },
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", new long[] { 4, 32 }, false).SetName("PeftNamesRoundTrip(llama)");
        var gpt2 = GptConfig.Preset("tiny");
        yield return new TestCaseData("gpt2", (Func<Onnx.ModelProto>)(() => GptBuilder.Build(gpt2, GptWeights.Random(gpt2, 1))), "c_attn,c_fc",
            new[] { "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight" },
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight", new long[] { 96, 4 }, true).SetName("PeftNamesRoundTrip(gpt2)");
    }

    [TestCaseSource(nameof(Cases))]
    public void PeftNamesRoundTrip(string arch, Func<Onnx.ModelProto> build, string targets, string[] someNames, string shapedName, long[] shape, bool fanInFanOut)
    {
        using var dir = new TempDir();
        var rewrite = LoraRewrite.Rewrite(build(), new LoraConfig { Rank = 4, Alpha = 8, TargetModules = targets.Split(',') }, "model.onnx", "0");
        var manifest = rewrite.Manifest;
        var adapter = LoraAdapter.CreateRandom(manifest, seed: 3);
        PeftAdapter.Write(dir.Path, adapter);

        var (tensors, _) = SafeTensorsFile.Read(Path.Combine(dir.Path, PeftAdapter.WeightsFile));
        Assert.That(tensors.Keys, Is.SupersetOf(someNames), arch);
        Assert.That(tensors, Has.Count.EqualTo(2 * manifest.Targets.Count));
        Assert.That(tensors[shapedName].Shape, Is.EqualTo(shape), "PEFT's [r, in] / [out, r]");
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, PeftAdapter.ConfigFile)))!.AsObject();
        Assert.That(config["fan_in_fan_out"]!.GetValue<bool>(), Is.EqualTo(fanInFanOut), "true only for GPT-2's Conv1D");
        Assert.That(config["target_modules"]!.AsArray().Select(n => n!.GetValue<string>()), Is.EquivalentTo(targets.Split(',')));

        // the other way: a folder under PEFT's names (here with the ".default" infix a live PeftModel's state dict has) reads back
        var live = dir.File("live");
        Directory.CreateDirectory(live);
        SafeTensorsFile.Write(Path.Combine(live, PeftAdapter.WeightsFile),
            tensors.Select(kv => KeyValuePair.Create(kv.Key.Replace(".lora_A.weight", ".lora_A.default.weight").Replace(".lora_B.weight", ".lora_B.default.weight"), kv.Value)));
        File.Copy(Path.Combine(dir.Path, PeftAdapter.ConfigFile), Path.Combine(live, PeftAdapter.ConfigFile));
        foreach (var folder in new[] { dir.Path, live })
        {
            var back = PeftAdapter.Read(folder, manifest);
            foreach (var t in manifest.Targets)
            {
                Assert.That(back.A(t).Data, Is.EqualTo(adapter.A(t).Data), $"{t.Module} A");
                Assert.That(back.B(t).Data, Is.EqualTo(adapter.B(t).Data).Within(1e-6), $"{t.Module} B");
            }
        }
    }
}
