using OnnxLora.GraphRewrite.Artifacts;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using Spectre.Console;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Tests.Deployment;

public class EvaluationTests
{
    static string Fixture(params string[] parts) => Path.Combine([TestContext.CurrentContext.TestDirectory, "fixtures", .. parts]);

    [Test]
    public void Classification_metrics_from_a_hand_counted_confusion_matrix()
    {
        // truth 0 0 1 1 1 2, predicted 0 1 1 1 2 2 → rows (true) [1 1 0] [0 2 1] [0 0 1]
        var e = ClassificationEvaluation.From([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2], ["a", "b", "c"]);
        Assert.That(e.Confusion, Is.EqualTo(new long[,] { { 1, 1, 0 }, { 0, 2, 1 }, { 0, 0, 1 } }));
        Assert.That(e.Accuracy, Is.EqualTo(4.0 / 6).Within(1e-12));
        Assert.That(new[] { e.Precision(0), e.Precision(1), e.Precision(2) }, Is.EqualTo(new[] { 1.0, 2.0 / 3, 0.5 }).Within(1e-12));
        Assert.That(new[] { e.Recall(0), e.Recall(1), e.Recall(2) }, Is.EqualTo(new[] { 0.5, 2.0 / 3, 1.0 }).Within(1e-12));
        Assert.That(e.F1(0), Is.EqualTo(2 * 1 * 0.5 / 1.5).Within(1e-12));
        Assert.That(e.MacroF1, Is.EqualTo((2.0 / 3 + 2.0 / 3 + 2 * 0.5 / 1.5) / 3).Within(1e-12));
        Assert.That(ClassificationEvaluation.From([1], [1], ["a", "b"]).Precision(0), Is.Zero, "a class never predicted has precision 0, not NaN");
    }

    /// <summary>
    /// PyTorch's first training loss on tiny (fixtures golden) is the base model's loss on batch 0, since LoRA starts with
    /// B = 0: the deployed evaluation with the initial adapter must reproduce it.
    /// </summary>
    [Test]
    public void Language_model_loss_matches_pytorch_on_tiny()
    {
        using var dir = new TempDir();
        var golden = JsonNode.Parse(File.ReadAllText(Fixture("train", "tiny_lm_golden.json")))!;
        var rows = golden["batches"]![0]!.AsArray().Select(r => r!.AsArray().Select(v => v!.GetValue<int>()).ToArray()).ToArray();
        File.WriteAllLines(dir.File("batch0.jsonl"), rows.Select(r => $"{{\"input_ids\": [{string.Join(",", r)}]}}"));
        var data = DatasetLoader.Load(dir.File("batch0.jsonl"), new DatasetOptions { Format = DataFormat.Tokens, VocabSize = 512, SeqLength = 64 });

        var lora = golden["lora"]!;
        var config = new LoraConfig
        {
            Rank = lora["rank"]!.GetValue<int>(), Alpha = lora["alpha"]!.GetValue<double>(),
            TargetModules = lora["targets"]!.AsArray().Select(t => t!.GetValue<string>()).ToList(),
        };
        var rw = dir.File("rw");
        var manifest = LoraRewrite.RewriteFile(Fixture("tiny.onnx"), config, rw).Manifest;
        var init = AdapterFiles.Read(Fixture("train", "tiny_lora_init.safetensors"), manifest);
        using var host = AdapterHost.Create(Path.Combine(rw, RunLayout.DeployableModel));
        host.AddAdapter("init", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(init)));

        double expected = golden["sgd"]!["losses_float64"]![0]!.GetValue<double>();
        var r = Evaluator.LanguageModel(host, "init", data, batchSize: 2);
        Assert.That(r.Tokens, Is.EqualTo(rows.Sum(x => x.Length - 1)));
        Assert.That(r.MeanLoss, Is.EqualTo(expected).Within(1e-5));
        Assert.That(r.Perplexity, Is.EqualTo(Math.Exp(expected)).Within(1e-3));
        Assert.That(Evaluator.LanguageModel(host, null, data, batchSize: 1).MeanLoss, Is.EqualTo(expected).Within(1e-5), "unbatched, base model");
    }

    [Test]
    public void Classification_evaluation_and_the_eval_verb()
    {
        using var dir = new TempDir();
        var model = BigramModel.Write(dir.File("cls.onnx"), vocab: 64, width: 3);
        using var host = AdapterHost.Create(model);
        var classifier = new Classifier(host, options: new ClassifierOptions { PadTokenId = 0 });
        var rng = new Random(3);
        var rows = Enumerable.Range(0, 20).Select(_ => Enumerable.Range(0, rng.Next(1, 6)).Select(_ => rng.Next(1, 64)).ToArray()).ToArray();
        var labels = rows.Select((r, i) => i % 3).ToArray();
        File.WriteAllLines(dir.File("cls.jsonl"), rows.Select((r, i) => $"{{\"input_ids\": [{string.Join(",", r)}], \"label\": {labels[i]}}}"));
        var data = DatasetLoader.Load(dir.File("cls.jsonl"), new DatasetOptions { Format = DataFormat.Tokens, Task = TrainingTask.Cls, VocabSize = 64, ClassNames = ["x", "y", "z"] });

        var e = Evaluator.Classification(classifier, null, data, batchSize: 6);
        var predicted = rows.Select(r => classifier.Classify(r).Label).ToArray();
        var expected = ClassificationEvaluation.From(labels, predicted, ["x", "y", "z"]);
        Assert.That(e.Confusion, Is.EqualTo(expected.Confusion));
        Assert.That(e.Classes, Is.EqualTo(new[] { "x", "y", "z" }));
        Assert.That(e.Count, Is.EqualTo(20));

        var stdout = new StringWriter();
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(stdout), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
        console.Profile.Width = 200;
        int code = OnnxLora.Tools.Cli.Run(["eval", "--model", model, "--data", dir.File("cls.jsonl"), "--task", "cls", "--format", "tokens", "--labels", "x,y,z"], console);
        Assert.That(code, Is.Zero, stdout.ToString());
        Assert.That(stdout.ToString(), Does.Contain($"accuracy {expected.Accuracy.ToString("P2", System.Globalization.CultureInfo.InvariantCulture)}").And.Contain("confusion"));
    }
}
