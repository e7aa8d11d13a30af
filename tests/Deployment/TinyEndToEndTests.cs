using System.Text.Json.Nodes;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// The `tiny` preset with the adapter PyTorch trained for 20 AdamW steps (fixtures helper's golden): deployable model +
/// .onnx_adapter through OrtLoraAdapter == merged model (1e-4), no adapter == base, and all of it round-trips through PEFT.
/// </summary>
public class TinyEndToEndTests
{
    static string Fixture(params string[] parts) => Path.Combine([TestContext.CurrentContext.TestDirectory, "fixtures", .. parts]);

    static float[] Logits(Func<OrtValue, IDisposableReadOnlyCollection<OrtValue>> run, long[] ids, int batch)
    {
        using var input = OrtValue.CreateTensorValueFromMemory(ids, [batch, ids.Length / batch]);
        using var outputs = run(input);
        return outputs[0].GetTensorDataAsSpan<float>().ToArray();
    }

    [Test]
    public void Trained_tiny_adapter_deployable_equals_merged_and_base_without_adapter()
    {
        using var dir = new TempDir();
        var golden = JsonNode.Parse(File.ReadAllText(Fixture("train", "tiny_lm_golden.json")))!;
        var lora = golden["lora"]!;
        var config = new LoraConfig
        {
            Rank = lora["rank"]!.GetValue<int>(), Alpha = lora["alpha"]!.GetValue<double>(),
            TargetModules = lora["targets"]!.AsArray().Select(t => t!.GetValue<string>()).ToList(),
        };
        var rw = dir.File("rw");
        var result = LoraRewrite.RewriteFile(Fixture("tiny.onnx"), config, rw);
        Assert.That(result.Manifest.Targets.Select(t => t.Scale).Distinct(), Is.EqualTo(new[] { lora["scale"]!.GetValue<double>() }));

        var adapter = AdapterFiles.Read(Fixture("train", "tiny_lora_after20_adamw.safetensors"), result.Manifest);
        AdapterFiles.Write(adapter, AdapterFormat.OnnxAdapter, dir.File("tiny.onnx_adapter"), rw);
        AdapterFiles.Write(adapter, AdapterFormat.Merged, dir.File("merged.onnx"), rw);
        AdapterFiles.Write(adapter, AdapterFormat.Peft, dir.File("peft"), rw);

        var batch = golden["batches"]![0]!.AsArray();
        var ids = batch.SelectMany(r => r!.AsArray().Select(v => v!.GetValue<long>())).ToArray();
        using var host = AdapterHost.Create(Path.Combine(rw, RunLayout.DeployableModel));
        host.AddAdapter("adamw", dir.File("tiny.onnx_adapter"));
        host.AddAdapter("via-peft", AdapterFiles.DeployableBytes(dir.File("peft"), result.Manifest));
        using var merged = new InferenceSession(dir.File("merged.onnx"));
        using var baseline = new InferenceSession(Fixture("tiny.onnx"));
        using var ro = new RunOptions();

        var withAdapter = Logits(x => host.Run("adamw", new Dictionary<string, OrtValue> { ["input_ids"] = x }, ["logits"]), ids, batch.Count);
        var fromMerged = Logits(x => merged.Run(ro, ["input_ids"], [x], ["logits"]), ids, batch.Count);
        var fromBase = Logits(x => baseline.Run(ro, ["input_ids"], [x], ["logits"]), ids, batch.Count);
        var noAdapter = Logits(x => host.Run(null, new Dictionary<string, OrtValue> { ["input_ids"] = x }, ["logits"]), ids, batch.Count);
        var viaPeft = Logits(x => host.Run("via-peft", new Dictionary<string, OrtValue> { ["input_ids"] = x }, ["logits"]), ids, batch.Count);

        Assert.That(TinyDeployable.MaxAbsDiff(withAdapter, fromMerged), Is.LessThanOrEqualTo(1e-4), "deployable + adapter vs merged");
        Assert.That(TinyDeployable.MaxAbsDiff(noAdapter, fromBase), Is.LessThanOrEqualTo(1e-5), "no adapter vs base");
        Assert.That(TinyDeployable.MaxAbsDiff(viaPeft, withAdapter), Is.LessThanOrEqualTo(1e-5), "PEFT round trip");
        Assert.That(TinyDeployable.MaxAbsDiff(withAdapter, fromBase), Is.GreaterThan(1e-3), "the trained adapter changes the logits");
    }
}
