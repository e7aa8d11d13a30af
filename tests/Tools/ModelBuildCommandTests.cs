using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.Tests.Models;
using OnnxLora.Tools;
using Spectre.Console;

namespace OnnxLora.Tests.Tools;

[NonParallelizable]   // redirects Console.Error, where the CLI's failure gate writes
public class ModelBuildCommandTests
{
    static (int Code, string Out, string Err) Run(params string[] args) => CliRunner.Run(args);

    [Test]
    public void BuildsTinyThatLoadsInOrt()
    {
        using var dir = new TempDir();
        var path = dir.File("tiny.onnx");
        var (code, output, error) = Run("model", "build", "--preset", "tiny", "--seed", "3", "--out", path);
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain($"wrote {path}: {new FileInfo(path).Length:N0} bytes, 43,904 parameters").And.Contain("random, seed 3"));
        using var session = new InferenceSession(path);
        GptBuilderTests.OrtLogits(session, GptBuilderTests.RandomIds(1, 5, 512, 0), out var shape);
        Assert.That(shape, Is.EqualTo(new long[] { 1, 5, 512 }));
        // the same seed through the API gives the same file
        var config = GptConfig.Preset("tiny");
        Assert.That(File.ReadAllBytes(path), Is.EqualTo(GptBuilder.Build(config, GptWeights.Random(config, 3)).ToByteArray()));
    }

    [Test]
    public void BuildsFromSafeTensorsWithoutAPreset()
    {
        using var dir = new TempDir();
        var weights = GptWeights.Random(GptConfig.Preset("tiny") with { Layers = 1 }, 4);
        weights.SaveSafeTensors(dir.File("model.safetensors"));
        var (code, output, error) = Run("model", "build", "--weights", dir.File("model.safetensors"), "--out", dir.File("m.onnx"));
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain("1 layers").And.Contain("weights: " + dir.File("model.safetensors")));
        var model = OnnxFile.Load(dir.File("m.onnx"));
        Assert.That(Tensors.ToFloats(model.Graph.Initializer.Single(t => t.Name == "transformer.h.0.mlp.c_fc.weight")),
                    Is.EqualTo(weights["transformer.h.0.mlp.c_fc.weight"].Values));
    }

    [Test]
    public void WrongPresetIsOneLineNamingTheValidOnes()
    {
        using var dir = new TempDir();
        var (code, _, error) = Run("model", "build", "--preset", "gpt5", "--out", dir.File("m.onnx"));
        Assert.That(code, Is.EqualTo(1));
        Assert.That(error.TrimEnd(), Is.EqualTo("error: unknown GPT preset 'gpt5'; valid presets: tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl"));
        Assert.That(File.Exists(dir.File("m.onnx")), Is.False);
    }

    [Test]
    public void RefusesToOverwriteWithoutForce()
    {
        using var dir = new TempDir();
        var path = dir.File("m.onnx");
        File.WriteAllText(path, "keep me");
        var (code, _, error) = Run("model", "build", "--preset", "tiny", "--out", path);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(error, Does.Contain("exists; pass --overwrite"));
        Assert.That(File.ReadAllText(path), Is.EqualTo("keep me"));
        Assert.That(Run("model", "build", "--preset", "tiny", "--out", path, "--force").Code, Is.EqualTo(0));
        Assert.That(OnnxFile.Load(path).Graph.Node, Is.Not.Empty);
    }

    [TestCase(new[] { "model", "build", "--preset", "tiny" }, "--out is required")]
    [TestCase(new[] { "model", "build", "--out", "x.onnx" }, "give --preset")]
    [TestCase(new[] { "model", "build", "--weights", "w.safetensors", "--seed", "1", "--out", "x.onnx" }, "--seed applies to random weights only")]
    [TestCase(new[] { "model", "build", "--weights", "missing.safetensors", "--out", "x.onnx" }, "missing.safetensors: no such file")]
    public void BadArgumentsFailWithOneLine(string[] args, string message)
    {
        var (code, _, error) = Run(args);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(error, Does.Contain(message));
        Assert.That(error.TrimEnd().Split('\n'), Has.Length.EqualTo(1));
    }

    [Test]
    public void HelpDescribesEveryOption()
    {
        var (code, output, _) = Run("model", "build", "--help");
        Assert.That(code, Is.EqualTo(0));
        Assert.That(output, Does.Contain("--preset").And.Contain("--weights").And.Contain("--seed").And.Contain("--out").And.Contain("--force").And.Contain("gpt2-xl"));
    }
}
