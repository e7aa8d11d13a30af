using System.Text.Json.Nodes;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// Rewrite a real export (Hugging Face GPT-2, Conv1D as Gemm/MatMul), then: deployable model + .onnx_adapter through
/// OrtLoraAdapter == the merged model in plain ORT, and no adapter == the base model (and its PyTorch logits).
/// </summary>
public class EndToEndTests
{
    static string Fixture(string name) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "torch", name);

    static float[] RunPlain(string model, long[] ids, int batch)
    {
        using var session = new InferenceSession(model);
        using var input = OrtValue.CreateTensorValueFromMemory(ids, [batch, ids.Length / batch]);
        using var runOptions = new RunOptions();
        using var outputs = session.Run(runOptions, ["input_ids"], [input], ["logits"]);
        return outputs[0].GetTensorDataAsSpan<float>().ToArray();
    }

    static float[] RunHost(AdapterHost host, string? adapter, long[] ids, int batch)
    {
        using var input = OrtValue.CreateTensorValueFromMemory(ids, [batch, ids.Length / batch]);
        using var outputs = host.Run(adapter, new Dictionary<string, OrtValue> { ["input_ids"] = input }, ["logits"]);
        return outputs[0].GetTensorDataAsSpan<float>().ToArray();
    }

    [TestCase("hf_gpt2_conv1d_opset14", LoraScaling.Peft)]
    [TestCase("gpt_opset17_fused_ln_tanh_gelu_noqkvbias", LoraScaling.RsLora)]
    public void Deployable_plus_adapter_equals_merged_and_no_adapter_equals_base(string fixture, LoraScaling scaling)
    {
        using var dir = new TempDir();
        var basePath = Fixture(fixture + ".onnx");
        var golden = JsonNode.Parse(File.ReadAllText(Fixture(fixture + ".json")))!;
        var ids = golden["input_ids"]!.AsArray().SelectMany(r => r!.AsArray().Select(v => v!.GetValue<long>())).ToArray();
        int batch = golden["input_ids"]!.AsArray().Count;
        var torchLogits = golden["logits"]!.AsArray().Select(v => v!.GetValue<float>()).ToArray();

        var rewriteDir = Path.Combine(dir.Path, "rewrite");
        var result = LoraRewrite.RewriteFile(basePath, new LoraConfig { Rank = 4, Alpha = 8, Scaling = scaling }, rewriteDir);
        Assert.That(result.Manifest.Targets, Has.Count.GreaterThanOrEqualTo(8));
        var adapter = LoraAdapter.CreateRandom(result.Manifest, seed: 3, amplitude: 0.3);
        var adapterPath = dir.File("task.onnx_adapter");
        AdapterFiles.Write(adapter, AdapterFormat.OnnxAdapter, adapterPath, rewriteDir);
        var mergedPath = dir.File("merged.onnx");
        AdapterFiles.Write(adapter, AdapterFormat.Merged, mergedPath, rewriteDir);

        using var host = AdapterHost.Create(Path.Combine(rewriteDir, RunLayout.DeployableModel));
        host.AddAdapter("task", adapterPath);
        var withAdapter = RunHost(host, "task", ids, batch);
        var merged = RunPlain(mergedPath, ids, batch);
        var baseline = RunPlain(basePath, ids, batch);
        Assert.That(TinyDeployable.MaxAbsDiff(withAdapter, merged), Is.LessThanOrEqualTo(1e-4), "deployable + adapter vs merged");
        Assert.That(TinyDeployable.MaxAbsDiff(withAdapter, baseline), Is.GreaterThan(1e-2), "the adapter must change the logits");
        var noAdapter = RunHost(host, null, ids, batch);
        Assert.That(TinyDeployable.MaxAbsDiff(noAdapter, baseline), Is.LessThanOrEqualTo(1e-5), "no adapter vs base");
        Assert.That(TinyDeployable.MaxAbsDiff(noAdapter, torchLogits), Is.LessThanOrEqualTo(1e-4), "no adapter vs PyTorch");

        // the same adapter through PEFT and back gives the same deployable parameters
        AdapterFiles.Write(adapter, AdapterFormat.Peft, dir.File("peft"));
        var viaPeft = AdapterFiles.Read(dir.File("peft"), result.Manifest);
        host.AddAdapter("via-peft", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(viaPeft)));
        Assert.That(TinyDeployable.MaxAbsDiff(RunHost(host, "via-peft", ids, batch), withAdapter), Is.LessThanOrEqualTo(1e-5));
    }
}
