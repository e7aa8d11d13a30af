using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;
using Spectre.Console;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Tests.Deployment;

/// <summary>`onnxlora export | merge | generate | classify` end to end on a rewritten Hugging Face GPT-2 export.</summary>
[NonParallelizable]
public class DeployCliTests
{
    static (int Code, string Out, string Err) Cli(params string[] args) => CliRunner.Run(args);

    static (string RewriteDir, LoraAdapter Adapter, string AdapterPath) Setup(TempDir dir)
    {
        var basePath = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "torch", "hf_gpt2_conv1d_opset14.onnx");
        var rewriteDir = dir.File("rw");
        var result = LoraRewrite.RewriteFile(basePath, new LoraConfig { Rank = 2, Alpha = 4, TargetModules = ["c_attn", "c_fc"] }, rewriteDir);
        var adapter = LoraAdapter.CreateRandom(result.Manifest, seed: 5, amplitude: 0.3);
        var adapterPath = dir.File("task.onnx_adapter");
        OnnxAdapterFile.Write(adapterPath, adapter);
        return (rewriteDir, adapter, adapterPath);
    }

    [Test]
    public void Export_to_peft_and_back_and_merge()
    {
        using var dir = new TempDir();
        var (rw, adapter, adapterPath) = Setup(dir);
        var (code, output, err) = Cli("export", adapterPath, "--model", rw, "--format", "peft", "--out", dir.File("peft"), "--base-model", "gpt2");
        Assert.That((code, err), Is.EqualTo((0, "")));
        Assert.That(output, Does.Contain("wrote").And.Contain("4 LoRA targets"));
        Assert.That(File.ReadAllText(Path.Combine(dir.File("peft"), PeftAdapter.ConfigFile)), Does.Contain("\"gpt2\""));

        (code, _, err) = Cli("export", dir.File("peft"), "--model", rw, "--format", "onnx-adapter", "--out", dir.File("back.onnx_adapter"));
        Assert.That((code, err), Is.EqualTo((0, "")));
        var original = OnnxAdapterFile.Read(adapterPath).Parameters.ToDictionary(p => p.Name);
        foreach (var p in OnnxAdapterFile.Read(dir.File("back.onnx_adapter")).Parameters)
            Assert.That(p.ToFloats(), Is.EqualTo(original[p.Name].ToFloats()).Within(1e-6), p.Name);

        (code, _, err) = Cli("merge", "--model", rw, "--adapter", adapterPath, "--out", dir.File("merged.onnx"));
        Assert.That((code, err), Is.EqualTo((0, "")));
        long[] ids = [3, 1, 4, 1, 5];
        using var merged = new InferenceSession(dir.File("merged.onnx"));
        using var input = OrtValue.CreateTensorValueFromMemory(ids, [1, 5]);
        using var ro = new RunOptions();
        using var fromMerged = merged.Run(ro, ["input_ids"], [input], ["logits"]);
        using var host = AdapterHost.Create(Path.Combine(rw, RunLayout.DeployableModel));
        host.AddAdapter("task", adapterPath);
        using var fromHost = host.Run("task", new Dictionary<string, OrtValue> { ["input_ids"] = input }, ["logits"]);
        Assert.That(TinyDeployable.MaxAbsDiff(fromMerged[0].GetTensorDataAsSpan<float>().ToArray(), fromHost[0].GetTensorDataAsSpan<float>().ToArray()),
            Is.LessThanOrEqualTo(1e-4));
    }

    [Test]
    public void Export_reads_a_training_run_folder()
    {
        using var dir = new TempDir();
        var (rw, adapter, _) = Setup(dir);
        // a run folder as the trainer leaves it: the manifest copy, the adapter in OnnxLora's layout, train_config.json
        var run = Directory.CreateDirectory(dir.File("run")).FullName;
        File.Copy(Path.Combine(rw, RunLayout.LoraConfig), Path.Combine(run, RunLayout.LoraConfig));
        OnnxLora.Models.SafeTensorsFile.Write(Path.Combine(run, "adapter.safetensors"),
            adapter.LoraTensors.Select(kv => KeyValuePair.Create(kv.Key, OnnxLora.Models.SafeTensor.FromFloats(kv.Value.Shape, kv.Value.Data))));
        File.WriteAllText(Path.Combine(run, "train_config.json"), $$"""{"model_dir": "{{rw}}", "out_dir": "{{run}}"}""");

        var (code, _, err) = Cli("export", run, "--format", "merged", "--out", dir.File("merged.onnx"));
        Assert.That((code, err), Is.EqualTo((0, "")));
        (code, _, err) = Cli("merge", "--model", rw, "--adapter", Path.Combine(run, "adapter.safetensors"), "--out", dir.File("merged2.onnx"));
        Assert.That((code, err), Is.EqualTo((0, "")));
        Assert.That(File.ReadAllBytes(dir.File("merged.onnx")), Is.EqualTo(File.ReadAllBytes(dir.File("merged2.onnx"))));
        (code, _, err) = Cli("export", run, "--format", "onnx-adapter", "--out", dir.File("run.onnx_adapter"));
        Assert.That((code, err), Is.EqualTo((0, "")));
        var written = OnnxAdapterFile.Read(dir.File("run.onnx_adapter")).Parameters.ToDictionary(p => p.Name);
        foreach (var t in adapter.Manifest.Targets)
            Assert.That(written[t.LoraB].ToFloats(), Is.EqualTo(adapter.B(t).Data.Select(v => (float)(v * t.Scale))).Within(1e-6));
    }

    [Test]
    public void Generate_runs_each_adapter_and_matches_the_library()
    {
        using var dir = new TempDir();
        var (rw, _, adapterPath) = Setup(dir);
        var (code, output, err) = Cli("generate", "--model", rw, "--adapter", "task=" + adapterPath, "--ids", "1,2,3", "-n", "4");
        Assert.That((code, err), Is.EqualTo((0, TextGenerator.NoCacheNotice + Environment.NewLine)), "a model without a cache: the one-line note only");
        using var host = AdapterHost.Create(Path.Combine(rw, RunLayout.DeployableModel));
        host.AddAdapter("task", adapterPath);
        var expected = new TextGenerator(host).Generate([1, 2, 3], new GenerationOptions { MaxNewTokens = 4 }, "task");
        Assert.That(output, Does.Contain("task").And.Contain(string.Join(",", expected.TokenIds)));

        (code, _, err) = Cli("generate", "--model", rw, "--prompt", "hello");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err.Trim(), Does.StartWith("error: ").And.Contain("pass --ids"));
        Assert.That(err.Trim().Split('\n'), Has.Length.EqualTo(1));
    }

    [Test]
    public void Classify_prints_label_and_probabilities()
    {
        using var dir = new TempDir();
        var model = BigramModel.Write(dir.File("cls.onnx"), vocab: 64, width: 3);
        var (code, output, err) = Cli("classify", "--model", model, "--ids", "4,5,6", "--labels", "a,b,c");
        Assert.That((code, err), Is.EqualTo((0, "")));
        using var host = AdapterHost.Create(model);
        var expected = new Classifier(host, options: new ClassifierOptions { Labels = ["a", "b", "c"] }).Classify([4, 5, 6]);
        Assert.That(output, Does.Contain(expected.Probabilities[0].ToString("F4", System.Globalization.CultureInfo.InvariantCulture)));
        Assert.That(output, Does.Contain(" " + expected.LabelName + " "));
    }

    [Test]
    public void Bad_adapters_and_missing_options_are_one_line_errors()
    {
        using var dir = new TempDir();
        var (rw, _, adapterPath) = Setup(dir);
        File.WriteAllBytes(dir.File("bad.onnx_adapter"), File.ReadAllBytes(adapterPath)[..100]);
        var (code, _, err) = Cli("generate", "--model", rw, "--adapter", dir.File("bad.onnx_adapter"), "--ids", "1");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.StartWith("error: " + dir.File("bad.onnx_adapter")));
        (code, _, err) = Cli("export", adapterPath, "--format", "merged");
        Assert.That((code, err.Trim()), Is.EqualTo((1, "error: --out PATH is required")));
        (code, _, err) = Cli("export", adapterPath, "--format", "zip", "--out", dir.File("x"), "--model", rw);
        Assert.That(err, Does.Contain("onnx-adapter, peft, merged"));
        (code, _, err) = Cli("export", adapterPath, "--out", dir.File("x.onnx_adapter"));
        Assert.That(err, Does.Contain("--model DIR"));
        Assert.That(File.Exists(dir.File("x.onnx_adapter")), Is.False);
    }
}
