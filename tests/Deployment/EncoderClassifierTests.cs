using System.Globalization;
using System.Text.Json.Nodes;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Contracts;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// A BERT-family encoder (tools/fixtures/make_tiny_bert.py: input_ids, attention_mask, token_type_ids; Erf GELU,
/// decomposed LayerNorm, MatMul linears; last_hidden_state out) as a classifier: pooling against PyTorch on a padded
/// batch, and rewrite → train → export → eval → classify from WordPiece text.
/// </summary>
[NonParallelizable]
public class EncoderClassifierTests
{
    static string Fixture(string name) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "bert", name);

    [TestCase("last")]
    [TestCase("first")]
    [TestCase("mean")]
    public void PoolingMatchesPyTorchOnAPaddedBatch(string pooling)
    {
        var golden = JsonNode.Parse(File.ReadAllText(Fixture("pooling.json")))!;
        var ids = golden["input_ids"]!.AsArray().Select(r => r!.AsArray().Select(v => v!.GetValue<long>()).ToArray()).ToArray();
        var mask = golden["attention_mask"]!.AsArray().SelectMany(r => r!.AsArray().Select(v => v!.GetValue<long>())).ToArray();
        var head = golden["head"]!.AsArray().Select(v => v!.GetValue<float>()).ToArray();
        int classes = golden["classes"]!.GetValue<int>();
        var expected = golden["class_logits"]![pooling]!.AsArray().Select(v => v!.GetValue<float>()).ToArray();

        var model = ClassHead.BuildClassifier(OnnxFile.Load(Fixture("tiny_bert.onnx")), head, new ClassifierInfo { Classes = classes, Pooling = WireNames.Parse<Pooling>(pooling, "pooling") }, headAsInput: false, "tiny_bert.onnx");
        using var session = new InferenceSession(model.ToByteArray());
        long[] shape = [ids.Length, ids[0].Length];
        using var idsValue = OrtValue.CreateTensorValueFromMemory(ids.SelectMany(r => r).ToArray(), shape);
        using var maskValue = OrtValue.CreateTensorValueFromMemory(mask, shape);
        using var typesValue = OrtValue.CreateTensorValueFromMemory(new long[mask.Length], shape);
        using var run = new RunOptions();
        using var outputs = session.Run(run, ["input_ids", "attention_mask", "token_type_ids"], [idsValue, maskValue, typesValue], [ClassHead.Output]);
        var actual = outputs[0].GetTensorDataAsSpan<float>().ToArray();
        // float32 through two layers on both sides: differences are rounding, ~1e-6 of logits of size ~1
        Assert.That(actual, Is.EqualTo(expected).Within(1e-4), $"{pooling} pooling vs PyTorch");
    }

    [Test]
    public void AnEncoderTrainsDeploysAndClassifiesWordPieceText()
    {
        using var dir = new TempDir();
        string[] spam = ["win free cash now", "claim your prize now", "urgent you have won", "free prize call now", "text win cash", "you are urgent win"];
        string[] ham = ["hi mum see you later", "ok thanks love", "how are you tonight", "sorry see you home", "lunch later ok", "love you mum thanks"];
        var rows = spam.Select(t => "spam\t" + t).Concat(ham.Select(t => "ham\t" + t)).ToList();
        var train = dir.File("train.tsv");
        File.WriteAllLines(train, Enumerable.Repeat(rows, 3).SelectMany(r => r));
        var vocab = Fixture("vocab.txt");
        var rw = dir.File("rw");
        Run("rewrite", Fixture("tiny_bert.onnx"), "--out", rw, "--rank", "4");
        var run = dir.File("run");
        Run("train", "--model", rw, "--data", train, "--task", "cls", "--tokenizer", vocab, "--pooling", "first", "--out", run,
            "--epochs", "10", "--batch", "6", "--lr", "1e-2", "--threads", "1", "--eval-data", train);
        var lastEval = File.ReadAllLines(Path.Combine(run, RunLayout.Metrics)).Select(l => JsonNode.Parse(l)!).Last(m => (string?)m["kind"] == "eval");
        double accuracy = lastEval["accuracy"]!.GetValue<double>();
        Assert.That(accuracy, Is.GreaterThanOrEqualTo(0.9), "two word sets: the [CLS] state separates them once trained");

        var merged = dir.File("merged.onnx");
        Run("export", run, "--format", "merged", "--out", merged);
        string accuracyText = $"accuracy {accuracy.ToString("P2", CultureInfo.InvariantCulture)}";
        foreach (var serve in new[] { new[] { "--model", run, "--adapter", run }, ["--model", merged] })
        {
            var output = Run(["eval", .. serve, "--data", train, "--task", "cls", "--tokenizer", vocab]);
            Assert.That(output, Does.Contain(accuracyText), "eval through the deployed model = the training session's eval");
            output = Run(["classify", .. serve, "--tokenizer", vocab, "--text", "win free cash now"]);
            Assert.That(output, Does.Contain("spam"), output);
        }
        var tokenizer = TextTokenizer.Load(vocab);
        Assert.That(tokenizer.Encode("Win free"), Is.EqualTo(new[] { 101, 107, 106, 102 }), "lower-cased WordPiece between [CLS] and [SEP]");
    }

    static string Run(params string[] args)
    {
        var (code, output, error) = CliRunner.Run(args);
        Assert.That(code, Is.EqualTo(0), $"onnxlora {string.Join(' ', args)}\n{output}\n{error}");
        return output;
    }
}
