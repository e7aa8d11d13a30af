using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Tools;
using Spectre.Console;

namespace OnnxLora.Tests.Rewrite;

/// <summary>`onnxlora inspect` and `onnxlora rewrite` end to end: output, files, and one-line errors that leave nothing behind.</summary>
[NonParallelizable]
public class RewriteCliTests
{
    static (int Code, string Out, string Err) Cli(params string[] args) => CliRunner.Run(args);

    static string SaveMlp(TempDir dir)
    {
        var path = dir.File("mlp.onnx");
        OnnxFile.Save(RewriteTestModels.Mlp(), path);
        return path;
    }

    [Test]
    public void RewriteWritesTheFolderAndPrintsPeftsLine()
    {
        using var dir = new TempDir();
        var model = SaveMlp(dir);
        var before = File.ReadAllBytes(model);
        var outDir = dir.File("out");
        var (code, stdout, err) = Cli("rewrite", model, "--out", outDir, "--rank", "2", "--alpha", "4", "--targets", "fc1,fc2");
        Assert.That(code, Is.EqualTo(0), err);
        // fc1 4→6 and fc2 6→3 at r=2: 2·10 + 2·9 = 38; base: 24 + 6 + 18 = 48
        Assert.That(stdout, Does.Contain("trainable params: 38 || all params: 86 || trainable%: 44.1860"));
        Assert.That(stdout, Does.Contain("fc1").And.Contain("fc2"));
        Assert.That(Directory.GetFiles(outDir).Select(Path.GetFileName).Order(), Is.EqualTo(new[] { ".onnxlora", "deploy.onnx", "lora_config.json", "model.onnx" }));
        var manifest = LoraManifest.Load(Path.Combine(outDir, RunLayout.LoraConfig));
        Assert.That(manifest.BaseModelSha256, Is.EqualTo(LoraRewrite.Sha256(model)));
        Assert.That(manifest.ToolVersion, Is.Not.Empty);
        Assert.That(manifest.Targets.Select(t => (t.Module, t.In, t.Out, t.Rank, t.Scale, t.LoraA)),
            Is.EqualTo(new[] { ("fc1", 4L, 6L, 2, 2.0, "fc1.lora_A.weight"), ("fc2", 6L, 3L, 2, 2.0, "fc2.lora_A.weight") }));
        Assert.That(File.ReadAllBytes(model), Is.EqualTo(before), "the base model is never written");

        // a previous rewrite output is replaced with --overwrite
        var (again, _, err2) = Cli("rewrite", model, "--out", outDir, "--rank", "1", "--targets", "fc2", "--scaling", "rslora", "--overwrite");
        Assert.That(again, Is.EqualTo(0), err2);
        Assert.That(LoraManifest.Load(Path.Combine(outDir, RunLayout.LoraConfig)).Targets.Single().Module, Is.EqualTo("fc2"));
        Assert.That(Directory.GetDirectories(dir.Path), Has.Length.EqualTo(1), "no temp folders left");
    }

    [Test]
    public void PatternsLayersAndScalingReachTheManifest()
    {
        using var dir = new TempDir();
        var path = dir.File("k.onnx");
        OnnxFile.Save(RewriteTestModels.KitchenSink(), path);
        var outDir = dir.File("out");
        var (code, stdout, err) = Cli("rewrite", path, "--out", outDir, "--rank", "4", "--alpha", "8", "--targets", "re:blocks\\..*", "--exclude", "W_value",
            "--layers", "0", "--rank-pattern", "W_key=2", "--alpha-pattern", "c_.*=2", "--scaling", "alpha", "--init", "gaussian", "--seed", "9", "--dropout", "0.1");
        Assert.That(code, Is.EqualTo(0), err);
        var m = LoraManifest.Load(Path.Combine(outDir, RunLayout.LoraConfig));
        Assert.That(m.Targets.Select(t => (t.Module, t.Rank, t.Alpha, t.Scale)), Is.EqualTo(new[]
        {
            ("blocks.0.att.W_query", 4, 8.0, 8.0), ("blocks.0.att.W_key", 2, 8.0, 8.0),
            ("blocks.0.mlp.c_fc", 4, 2.0, 2.0), ("blocks.0.mlp.c_proj", 4, 2.0, 2.0),
        }));
        Assert.That((m.Scaling, m.Init, m.Seed, m.Dropout), Is.EqualTo((LoraScaling.Alpha, "gaussian", 9, 0.1)));
        Assert.That(m.LayersToTransform, Is.EqualTo(new[] { 0 }));
        Assert.That(m.DropoutTrainingModeInput, Is.EqualTo(InjectLora.DropoutTrainingModeInput));
        Assert.That(stdout, Does.Contain("blocks.0.att.W_key"));
    }

    [Test]
    public void InspectListsTheLinearLayers()
    {
        using var dir = new TempDir();
        var path = dir.File("k.onnx");
        OnnxFile.Save(RewriteTestModels.KitchenSink(), path);
        var (code, stdout, err) = Cli("inspect", path);
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(stdout, Does.Contain("IR version 8").And.Contain("input_ids").And.Contain("[batch, seq, 12]"));
        Assert.That(stdout, Does.Contain("blocks.0.att.W_query").And.Contain("blocks.1.ff.0 = blocks.1.ff.2").And.Contain("head shared×2 transposed"));
        Assert.That(stdout, Does.Contain("9 LoRA-able weight MatMul/Gemm nodes in 8 modules, plus 1 output head (tied to the embedding); 2 other"));
        Assert.That(stdout, Does.Contain("float16→float"));
    }

    // (case, extra args, expected message part); the model is the MLP unless the case says otherwise
    [TestCase("unknown target", new[] { "--targets", "fc3" }, "target 'fc3' matches no linear module; nearest: fc1")]
    [TestCase("rank zero", new[] { "--rank", "0" }, "Rank (r) must be > 0")]
    [TestCase("rank above min(in, out)", new[] { "--rank", "5" }, "rank 5 for module 'fc1' exceeds min(in, out) = min(4, 6)")]
    [TestCase("bad scaling", new[] { "--scaling", "sqrt" }, "--scaling: scaling must be peft, rslora or alpha (got 'sqrt')")]
    [TestCase("bad layers", new[] { "--layers", "1-" }, "layers: '1-' is not a block index")]
    [TestCase("no weight MatMuls", new[] { "NOWEIGHTS" }, "no LoRA-able weight MatMul/Gemm")]
    [TestCase("truncated model", new[] { "TRUNCATED" }, "not a valid ONNX model")]
    [TestCase("foreign output folder", new[] { "FOREIGN" }, "exists and was not written by onnxlora")]
    public void BadInputIsOneLineAndWritesNothing(string _, string[] extra, string expected)
    {
        using var dir = new TempDir();
        var model = SaveMlp(dir);
        var outDir = dir.File("out");
        var args = new List<string> { "rewrite", model, "--out", outDir, "--rank", "2" };
        foreach (var e in extra)
            switch (e)
            {
                case "NOWEIGHTS":
                    OnnxFile.Save(RewriteTestModels.NoWeights(), args[1] = dir.File("noweights.onnx"));
                    break;
                case "TRUNCATED":
                    var bytes = File.ReadAllBytes(model);
                    File.WriteAllBytes(args[1] = dir.File("truncated.onnx"), bytes[..(bytes.Length / 2)]);
                    break;
                case "FOREIGN":
                    Directory.CreateDirectory(outDir);
                    File.WriteAllText(Path.Combine(outDir, "notes.txt"), "mine");
                    break;
                default: args.Add(e); break;
            }
        var before = Directory.GetFileSystemEntries(dir.Path, "*", SearchOption.AllDirectories).Order().ToList();
        var (code, stdout, err) = Cli([.. args]);
        Assert.That(code, Is.EqualTo(1), stdout);
        Assert.That(err.TrimEnd().Split('\n'), Has.Length.EqualTo(1), err);
        Assert.That(err, Does.StartWith("error: ").And.Contain(expected));
        Assert.That(Directory.GetFileSystemEntries(dir.Path, "*", SearchOption.AllDirectories).Order(), Is.EqualTo(before), "nothing written");
    }

    [Test]
    public void InspectOfATruncatedFileIsOneLine()
    {
        using var dir = new TempDir();
        var model = SaveMlp(dir);
        var bytes = File.ReadAllBytes(model);
        File.WriteAllBytes(model, bytes[..(bytes.Length - 7)]);
        var (code, _, err) = Cli("inspect", model);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.StartWith("error: ").And.Contain("mlp.onnx"));
    }
}
