using System.Globalization;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.Pipeline.Training;
using OnnxLora.Tests.Signature;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// A classifier trained with `train --task cls` deploys: every adapter form (run folder, .onnx_adapter, PEFT, merged)
/// gives, through `eval` and `classify`, the predictions of the training session's own eval forward.
/// </summary>
[NonParallelizable]
public class ClassifierDeployTests
{
    /// <summary>The class is whether the row starts low: only attention over the row carries it to the pooled token.</summary>
    static (string Path, List<(int[] Ids, int Label)> Rows) WriteData(TempDir dir, string name, int count, int seed)
    {
        var rng = new Random(seed);
        var rows = Enumerable.Range(0, count).Select(i =>
        {
            int label = i % 2, n = rng.Next(3, 10);
            return (Enumerable.Range(0, n).Select(j => j == 0 ? (label == 0 ? rng.Next(1, 50) : rng.Next(200, 299)) : rng.Next(100, 150)).ToArray(), label);
        }).ToList();
        var path = dir.File(name);
        File.WriteAllLines(path, rows.Select(r => new JsonObject { ["input_ids"] = new JsonArray(r.Item1.Select(x => (JsonNode?)x).ToArray()), ["label"] = r.label }.ToJsonString()));
        return (path, rows);
    }

    static (int Code, string Out) Cli(params string[] args)
    {
        var (code, output, error) = CliRunner.Run(args);
        Assert.That(code, Is.EqualTo(0), $"onnxlora {string.Join(' ', args)}\n{output}\n{error}");
        return (code, output);
    }

    [TestCase("full", "last", 4)]
    [TestCase("lora", "first", 12)]   // B starts at zero under a frozen random head: slower to move
    [TestCase("full", "mean", 12)]
    public void EveryExportFormServesTheTrainedClassifier(string head, string pooling, int epochs)
    {
        using var dir = new TempDir();
        var (train, _) = WriteData(dir, "train.jsonl", 32, 4);
        var (test, testRows) = WriteData(dir, "test.jsonl", 12, 9);
        var rw = dir.File("rw");
        Cli("rewrite", OptimumGpt2Tests.Fixture("gpt2_opset17_with_past.onnx"), "--out", rw, "--rank", "4");
        var run = dir.File("run");
        Cli("train", "--model", rw, "--data", train, "--format", "tokens", "--task", "cls", "--labels", "low,high", "--head", head, "--pooling", pooling,
            "--out", run, "--epochs", epochs.ToString(CultureInfo.InvariantCulture), "--batch", "8", "--lr", "1e-2", "--threads", "1", "--eval-data", train);
        var lastEval = File.ReadAllLines(Path.Combine(run, RunLayout.Metrics)).Select(l => JsonNode.Parse(l)!).Last(m => (string?)m["kind"] == "eval");
        Assert.That(lastEval["accuracy"]!.GetValue<double>(), Is.GreaterThanOrEqualTo(0.9), "the first token decides the class: a trained classifier fits it");

        // the training session's eval forward with the trained state: the predictions every deployed form must give
        var adapterState = OnnxLora.Models.SafeTensorsFile.Read(Path.Combine(run, RunLayout.Adapter)).Tensors;
        using var session = TrainingSession.Create(Path.Combine(run, RunLayout.ArtifactsDir), ExecutionDevice.Cpu, 1);
        foreach (var (name, t) in adapterState) if (session.HasState(name)) session.SetState(name, t.ToFloats());
        var batch = Batcher.Pad(testRows.Select(r => new Example(r.Ids, r.Ids, r.Label)).ToList(), 0);
        var logits = session.EvalStep(batch).ClassLogits!;
        var expected = Enumerable.Range(0, testRows.Count).Select(i => logits[2 * i + 1] > logits[2 * i] ? 1 : 0).ToArray();
        double accuracy = expected.Zip(testRows).Count(x => x.First == x.Second.Label) / (double)testRows.Count;
        TestContext.Out.WriteLine($"{head}/{pooling}: training-session accuracy on held-out rows {accuracy:P2}");   // a random-weight model: no generalisation promised

        // the deployed classifier's logits through ONNX Runtime's LoRA API: the same numbers
        using (var host = AdapterHost.Create(Path.Combine(run, "deploy.onnx")))
        {
            host.AddAdapter("run", Path.Combine(run, RunLayout.OnnxAdapter));
            var classifier = new Classifier(host, options: new ClassifierOptions { PadTokenId = 0 });
            var results = classifier.ClassifyBatch(testRows.Select(r => (IReadOnlyList<int>)r.Ids).ToList(), "run");
            for (int i = 0; i < testRows.Count; i++)
            {
                double p1 = 1 / (1 + Math.Exp(logits[2 * i] - logits[2 * i + 1]));   // softmax of the session's logits
                Assert.That(results[i].Probabilities[1], Is.EqualTo(p1).Within(1e-4), $"row {i}: deployed vs training forward");
            }
        }

        var onnxAdapter = dir.File("cls.onnx_adapter");
        var peft = dir.File("peft");
        var merged = dir.File("merged.onnx");
        Cli("export", run, "--format", "onnx-adapter", "--out", onnxAdapter);
        Cli("export", run, "--format", "peft", "--out", peft);
        Cli("export", run, "--format", "merged", "--out", merged);
        var peftConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(peft, PeftAdapter.ConfigFile)))!;
        Assert.That(peftConfig["modules_to_save"]!.AsArray().Select(n => (string?)n), Is.EqualTo(new[] { "score" }));
        Assert.That(peftConfig["task_type"]!.GetValue<string>(), Is.EqualTo("SEQ_CLS"));

        // the rewrite's LM deploy.onnx cannot take a classifier: the error says which model can
        var (wrongCode, _, wrongError) = CliRunner.Run(["classify", "--model", rw, "--adapter", onnxAdapter, "--ids", "1,2,3"]);
        Assert.That(wrongCode, Is.Not.Zero);
        Assert.That(wrongError, Does.Contain("classifier").And.Contain("--model RUN_DIR"));

        string accuracyText = $"accuracy {accuracy.ToString("P2", CultureInfo.InvariantCulture)}";
        foreach (var serve in new[] { new[] { "--model", run, "--adapter", run }, ["--model", run, "--adapter", onnxAdapter], ["--model", run, "--adapter", peft], ["--model", merged] })
        {
            var (_, output) = Cli(["eval", .. serve, "--data", test, "--task", "cls", "--format", "tokens"]);
            Assert.That(output, Does.Contain(accuracyText), $"eval {string.Join(' ', serve)}");
            Assert.That(output, Does.Contain("low").And.Contain("high").And.Contain("confusion"));
            for (int i = 0; i < 3; i++)
            {
                (_, output) = Cli(["classify", .. serve, "--ids", string.Join(",", testRows[i].Ids)]);
                Assert.That(output, Does.Contain(expected[i] == 1 ? "high" : "low"), $"classify row {i} with {string.Join(' ', serve)}:\n{output}");
            }
        }
    }

    [Test]
    public void TheTrainersEvalLossIsTheLossEvalGivesThroughTheDeployedModel()
    {
        // rows of 3–12 tokens in batches of 4: a mean over rows and a mean over counted tokens differ; both must count tokens
        using var dir = new TempDir();
        var rng = new Random(6);
        var data = dir.File("lm.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 12).Select(_ =>
            new JsonObject { ["input_ids"] = new JsonArray(Enumerable.Range(0, rng.Next(3, 13)).Select(_ => (JsonNode?)rng.Next(1, 299)).ToArray()) }.ToJsonString()));
        var rw = dir.File("rw");
        Cli("rewrite", OptimumGpt2Tests.Fixture("gpt2_opset17.onnx"), "--out", rw, "--rank", "4");
        var run = dir.File("run");
        Cli("train", "--model", rw, "--data", data, "--format", "tokens", "--out", run, "--max-steps", "3", "--batch", "4", "--lr", "1e-2", "--threads", "1", "--eval-data", data);
        double trainerLoss = File.ReadAllLines(Path.Combine(run, RunLayout.Metrics)).Select(l => JsonNode.Parse(l)!).Last(m => (string?)m["kind"] == "eval")["loss"]!.GetValue<double>();
        var (_, output) = Cli("eval", "--model", rw, "--adapter", Path.Combine(run, RunLayout.OnnxAdapter), "--data", data, "--format", "tokens", "--batch", "5");
        var match = System.Text.RegularExpressions.Regex.Match(output, @"loss (\d+\.\d+)");
        Assert.That(match.Success, output);
        // eval prints 4 decimals; float32 sums of a few hundred terms agree far below that
        Assert.That(double.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture), Is.EqualTo(trainerLoss).Within(1e-4));
    }

    [Test]
    public void FreezeLoraTrainsTheHeadAloneAndItsAdapterStillDeploys()
    {
        using var dir = new TempDir();
        var (train, _) = WriteData(dir, "train.jsonl", 16, 5);
        var rw = dir.File("rw");
        Cli("rewrite", OptimumGpt2Tests.Fixture("gpt2_opset17.onnx"), "--out", rw, "--rank", "2");
        var run = dir.File("run");
        Cli("train", "--model", rw, "--data", train, "--format", "tokens", "--task", "cls", "--classes", "2", "--freeze-lora", "--out", run, "--max-steps", "3", "--lr", "1e-2", "--threads", "1");
        var spec = TrainingArtifacts.LoadSpec(Path.Combine(run, RunLayout.ArtifactsDir));
        Assert.That(spec.Params.Select(p => p.Name), Is.EqualTo(new[] { ClassHead.Weight }), "the head is the only trainable tensor");
        var adapter = AdapterFiles.ReadSource(run, null).Adapter;
        Assert.That(adapter.LoraTensors.Where(kv => kv.Key.Contains("lora_B", StringComparison.Ordinal)).SelectMany(kv => kv.Value.Data), Is.All.Zero, "B stays 0: the base is frozen");
        Assert.That(adapter.Head!.Data, Has.Some.Not.Zero);
        var (_, output) = Cli("eval", "--model", run, "--adapter", run, "--data", train, "--task", "cls", "--format", "tokens");
        Assert.That(output, Does.Contain("accuracy"));
    }

    [Test]
    public void TwoClassifiersWithTheirOwnLabelsShareOneDeployModel()
    {
        using var dir = new TempDir();
        var (train, rows) = WriteData(dir, "train.jsonl", 16, 5);
        var rw = dir.File("rw");
        Cli("rewrite", OptimumGpt2Tests.Fixture("gpt2_opset17.onnx"), "--out", rw, "--rank", "2");
        Cli("train", "--model", rw, "--data", train, "--format", "tokens", "--task", "cls", "--labels", "low,high", "--out", dir.File("a"), "--max-steps", "2", "--threads", "1");
        Cli("train", "--model", rw, "--data", train, "--format", "tokens", "--task", "cls", "--labels", "cold,hot", "--out", dir.File("b"), "--max-steps", "2", "--threads", "1", "--seed", "7");
        // one deploy model per class count: run a's serves run b's adapter too; each prints its own label names
        var (_, output) = Cli("classify", "--model", dir.File("a"), "--adapter", "a=" + dir.File("a"), "--adapter", "b=" + dir.File("b"), "--ids", string.Join(",", rows[0].Ids));
        Assert.That(output, Does.Match("(low|high)[^\n]*\n(.*\n)*.*(cold|hot)"));
    }
}
