using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Tests.Deployment;
using OnnxLora.Tests.Training;

namespace OnnxLora.Tests.Reliability;

/// <summary>Numeric flags with limits: each bad value is one line naming the flag (or config key), before any work.</summary>
[NonParallelizable]
public class OutputsLimitsTests
{
    [TestCase("--threads", "100000", "--threads must be in 0..")]
    [TestCase("--threads", "-1", "--threads must be in 0..")]
    [TestCase("--lr", "Infinity", "--lr must be a finite number > 0")]
    [TestCase("--lr", "NaN", "--lr must be a finite number > 0")]
    [TestCase("--lr", "-1e-3", "--lr must be a finite number > 0")]
    [TestCase("--weight-decay", "Infinity", "--weight-decay")]
    [TestCase("--clip", "NaN", "--clip")]
    [TestCase("--batch", "0", "--batch must be in 1..")]
    [TestCase("--batch", "1000000000", "--batch must be in 1..")]
    [TestCase("--seq", "1", "--seq must be in 2..")]
    [TestCase("--seq", "2000000000", "--seq must be in 2..")]
    [TestCase("--epochs", "-1", "--epochs")]
    [TestCase("--max-steps", "-5", "--epochs and --max-steps must be ≥ 0")]
    [TestCase("--grad-accum", "0", "--grad-accum")]
    [TestCase("--early-stopping", "-1", "--early-stopping")]
    [TestCase("--labels", "ham,ham", "--labels: 'ham' is given 2 times")]
    public void TrainFlagsOutOfRangeAreRefusedAndNothingIsWritten(string flag, string value, string expected)
    {
        using var dir = new TempDir();
        TrainerTests.WriteSequences(dir.File("train.jsonl"), 4, 1);
        var rewrite = TrainerTests.RewriteTiny(dir);
        Tree.FailsCleanly(dir.Path, expected, "train", "--model", rewrite, "--data", dir.File("train.jsonl"), "--format", "tokens", "--out", dir.File("run"), flag, value);
        Assert.That(Directory.Exists(dir.File("run")), Is.False);
    }

    [Test]
    public void TheConfigsThreadsAreBoundedToo()
    {
        using var dir = new TempDir();
        var (code, _, err) = CliRunner.Run("run", "--out", dir.File("run"), "--set", "train.threads=2000");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.StartWith("error: ").And.Contain("train.threads must be in 0.."));
        Assert.That(Directory.Exists(dir.File("run")), Is.False);
    }

    [Test]
    public void ClassifyRefusesNegativeIdsAndRepeatedLabels()
    {
        using var dir = new TempDir();
        var model = BigramModel.Write(dir.File("cls.onnx"), vocab: 64, width: 3);
        Tree.FailsCleanly(dir.Path, "--ids: '-5' is not a token id", "classify", "--model", model, "--ids", "4,-5,6");
        Tree.FailsCleanly(dir.Path, "--labels: 'a' is given 2 times", "classify", "--model", model, "--ids", "4,5,6", "--labels", "a,b,a");
        Tree.FailsCleanly(dir.Path, "out of data bounds", "classify", "--model", model, "--ids", "4,64");   // ids ≥ vocab: ONNX Runtime's Gather refuses them
    }

    [Test]
    public void GenerateRefusesIdsOutsideTheVocabulary()
    {
        using var dir = new TempDir();
        var model = BigramModel.Write(dir.File("lm.onnx"), vocab: 64, width: 64);
        Tree.FailsCleanly(dir.Path, "--ids: '-1' is not a token id", "generate", "--model", model, "--ids", "1,-1", "-n", "2");
        Tree.FailsCleanly(dir.Path, "token id 64 is outside the model's vocabulary", "generate", "--model", model, "--ids", "1,64", "-n", "2");
    }

    [TestCase("-n", "0", "--max-new-tokens must be in 1..")]
    [TestCase("-n", "2000000000", "--max-new-tokens must be in 1..")]
    [TestCase("--temperature", "NaN", "--temperature must be a finite number")]
    [TestCase("--top-p", "0", "--top-p must be in (0, 1]")]
    [TestCase("--top-k", "-1", "--top-k must be ≥ 0")]
    [TestCase("--context", "0", "--context must be ≥ 1")]
    public void GenerateFlagsOutOfRangeNameTheFlag(string flag, string value, string expected)
    {
        using var dir = new TempDir();
        var model = BigramModel.Write(dir.File("lm.onnx"), vocab: 64, width: 64);
        Tree.FailsCleanly(dir.Path, expected, "generate", "--model", model, "--ids", "1,2", flag, value);
    }

    [Test]
    public void LayerRangesAreBounded()
    {
        using var dir = new TempDir();
        var model = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "tiny.onnx");
        Tree.FailsCleanly(dir.Path, "layers: '0-2000000000'", "rewrite", model, "--out", dir.File("rw"), "--layers", "0-2000000000");
    }

    [Test]
    public void TrainingChecksTokenIdsAgainstAVocabularyTheGraphLeavesSymbolic()
    {
        using var dir = new TempDir();
        var rewrite = TrainerTests.RewriteTiny(dir);
        // the vocabulary dim of the logits made symbolic: the check must infer it, not switch itself off
        var path = Path.Combine(rewrite, RunLayout.TrainingModel);
        var model = OnnxFile.Load(path);
        var dims = model.Graph.Output.First(o => o.Name == "logits").Type.TensorType.Shape.Dim;
        dims[^1].ClearDimValue();
        dims[^1].DimParam = "vocab";
        OnnxFile.Save(model, path);
        File.WriteAllText(dir.File("train.jsonl"), "{\"input_ids\": [1, 2, 600, 3]}\n");   // the tiny model has 512 tokens
        var (code, _, err) = CliRunner.Run("train", "--model", rewrite, "--data", dir.File("train.jsonl"), "--format", "tokens", "--out", dir.File("run"), "--max-steps", "1");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.Contain("600"));
        Assert.That(Directory.Exists(dir.File("run")), Is.False, "a failed start leaves nothing");
    }
}
