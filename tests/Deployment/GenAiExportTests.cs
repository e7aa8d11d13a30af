using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// `export --format genai` as a user drives it: genai_config.json from the model (a Qwen2 folder with grouped-query
/// attention), the special ids and tokenizer files from the Hugging Face folder. ONNX Runtime GenAI itself runs on
/// these folders in tests/GenAI (a project of its own).
/// </summary>
public class GenAiExportTests
{
    [Test]
    public void ExportWritesTheConfigFromTheModelAndTheHuggingFaceFolder()
    {
        using var dir = new TempDir();
        var hf = dir.File("hf");
        Directory.CreateDirectory(hf);
        foreach (var f in Directory.GetFiles(Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "llama", "hf-qwen2")))
            File.Copy(f, Path.Combine(hf, Path.GetFileName(f)));
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(hf, "config.json")))!.AsObject();
        config["bos_token_id"] = 3;
        config["eos_token_id"] = 9;
        File.WriteAllText(Path.Combine(hf, "config.json"), config.ToJsonString());
        File.WriteAllText(Path.Combine(hf, "generation_config.json"), """{"eos_token_id": [11, 9]}""");
        File.WriteAllText(Path.Combine(hf, "tokenizer.json"), """{"model": {"type": "BPE"}}""");

        Assert.That(CliRunner.Run("model", "build", "--from", hf, "--with-past", "--out", dir.File("past.onnx")).Code, Is.EqualTo(0));
        var result = LoraRewrite.RewriteFile(dir.File("past.onnx"), new LoraConfig { Rank = 2, TargetModules = ["q_proj"] }, dir.File("rw"));
        OnnxAdapterFile.Write(dir.File("a.onnx_adapter"), LoraAdapter.CreateRandom(result.Manifest, seed: 1));
        var (code, _, err) = CliRunner.Run("export", dir.File("a.onnx_adapter"), "--model", dir.File("rw"), "--format", "genai", "--out", dir.File("genai"), "--from", hf);
        Assert.That(code, Is.EqualTo(0), err);

        var genai = JsonNode.Parse(File.ReadAllText(dir.File("genai/genai_config.json")))!["model"]!;
        var decoder = genai["decoder"]!;
        Assert.That((genai["type"]!.GetValue<string>(), genai["context_length"]!.GetValue<int>(), genai["vocab_size"]!.GetValue<int>()), Is.EqualTo(("qwen2", 64, 128)));
        Assert.That((genai["bos_token_id"]!.GetValue<int>(), genai["eos_token_id"]!.GetValue<int>(), genai["pad_token_id"]!.GetValue<int>()), Is.EqualTo((3, 11, 0)),
                    "config.json, then generation_config.json's first eos; pad: none given, the default");
        Assert.That((decoder["head_size"]!.GetValue<int>(), decoder["num_attention_heads"]!.GetValue<int>(), decoder["num_key_value_heads"]!.GetValue<int>(),
                     decoder["hidden_size"]!.GetValue<int>(), decoder["num_hidden_layers"]!.GetValue<int>()), Is.EqualTo((8, 4, 2, 32, 2)));
        Assert.That(decoder["inputs"]!["past_key_names"]!.GetValue<string>(), Is.EqualTo("past_key_values.%d.key"));
        Assert.That(decoder["outputs"]!["present_value_names"]!.GetValue<string>(), Is.EqualTo("present.%d.value"));
        Assert.That(File.ReadAllText(dir.File("genai/tokenizer.json")), Is.EqualTo("""{"model": {"type": "BPE"}}"""));
        Assert.That(File.Exists(dir.File("genai/model.onnx")) && File.Exists(dir.File("genai/adapter.onnx_adapter")), Is.True);

        // a model without a cache: one line that says what to do
        Assert.That(CliRunner.Run("model", "build", "--from", hf, "--out", dir.File("plain.onnx")).Code, Is.EqualTo(0));
        var plain = LoraRewrite.RewriteFile(dir.File("plain.onnx"), new LoraConfig { Rank = 2, TargetModules = ["q_proj"] }, dir.File("rw-plain"));
        OnnxAdapterFile.Write(dir.File("p.onnx_adapter"), LoraAdapter.CreateRandom(plain.Manifest, seed: 1));
        (code, _, err) = CliRunner.Run("export", dir.File("p.onnx_adapter"), "--model", dir.File("rw-plain"), "--format", "genai", "--out", dir.File("genai2"));
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.Contain("needs a KV cache").And.Contain("--with-past"));
    }
}
