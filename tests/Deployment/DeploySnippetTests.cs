using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Tests.Deployment;

public class DeploySnippetTests
{
    // the checkout, found from the test assembly upwards: a CI build maps [CallerFilePath] to "/_/" (deterministic paths)
    static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "OnnxLora.sln"))) return dir.FullName;
        throw new DirectoryNotFoundException($"{TestContext.CurrentContext.TestDirectory}: no OnnxLora.sln above the test folder");
    }

    static string SourceDir() => Path.Combine(RepoRoot(), "tests", "Deployment");

    static string[] Lines(string text, string begin, string end)
    {
        var lines = text.Split('\n').Select(l => l.Trim()).ToList();
        int b = lines.FindIndex(l => l.Contains(begin)), e = lines.FindIndex(b + 1, l => l.Contains(end));
        Assert.That(b, Is.GreaterThanOrEqualTo(0), begin);
        return lines.Skip(b + 1).Take(e - b - 1).Where(l => l.Length > 0).ToArray();
    }

    [Test]
    public void The_documented_plain_ORT_sample_is_the_compiled_one()
    {
        var compiled = Lines(File.ReadAllText(Path.Combine(SourceDir(), "DeploySnippet.cs")), "snippet-begin", "snippet-end");
        var docPath = Path.Combine(RepoRoot(), "docs", "DEPLOY.md");
        var documented = Lines(File.ReadAllText(docPath), "```csharp", "```").Where(l => !l.StartsWith("using Microsoft", StringComparison.Ordinal) && !l.StartsWith("long[] ids", StringComparison.Ordinal) && !l.StartsWith("string ", StringComparison.Ordinal)).ToArray();
        Assert.That(documented, Is.EqualTo(compiled));
        Assert.That(File.ReadAllText(Path.Combine(SourceDir(), "DeploySnippet.cs")), Does.Not.Contain("using OnnxLora"));
    }

    [Test]
    public void The_plain_ORT_sample_gives_the_hosts_outputs()
    {
        using var dir = new TempDir();
        var basePath = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "torch", "hf_gpt2_conv1d_opset14.onnx");
        var result = LoraRewrite.RewriteFile(basePath, new LoraConfig { Rank = 2, Alpha = 2 }, dir.File("rw"));
        var adapterPath = dir.File("task.onnx_adapter");
        OnnxAdapterFile.Write(adapterPath, LoraAdapter.CreateRandom(result.Manifest, 2, 0.3));
        var deploy = Path.Combine(dir.File("rw"), RunLayout.DeployableModel);
        long[] ids = [5, 6, 7];

        var plain = DeploySnippet.Run(deploy, adapterPath, ids);
        using var host = AdapterHost.Create(deploy);
        host.AddAdapter("task", adapterPath);
        using var input = OrtValue.CreateTensorValueFromMemory(ids, [1, 3]);
        using var outputs = host.Run("task", new Dictionary<string, OrtValue> { ["input_ids"] = input }, ["logits"]);
        Assert.That(TinyDeployable.MaxAbsDiff(plain, outputs[0].GetTensorDataAsSpan<float>().ToArray()), Is.LessThanOrEqualTo(1e-6));
        using var baseOut = host.Run(null, new Dictionary<string, OrtValue> { ["input_ids"] = input }, ["logits"]);
        Assert.That(TinyDeployable.MaxAbsDiff(plain, baseOut[0].GetTensorDataAsSpan<float>().ToArray()), Is.GreaterThan(1e-3));
    }
}
