using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Signature;

/// <summary>The Optimum-signature GPT-2 exports driven from the command line: inspect, rewrite, train, eval, generate.</summary>
[NonParallelizable]
public class OptimumCliTests
{
    /// <summary>Rows of 3–12 token ids below the fixtures' vocabulary (300), so batches are padded.</summary>
    static string WriteTokens(TempDir dir, string name, int count, int seed)
    {
        var rng = new Random(seed);
        var path = dir.File(name);
        File.WriteAllLines(path, Enumerable.Range(0, count).Select(_ =>
        {
            int n = rng.Next(3, 13), start = rng.Next(1, 200);
            return new JsonObject { ["input_ids"] = new JsonArray(Enumerable.Range(0, n).Select(j => (JsonNode?)(start + 7 * j % 90)).ToArray()) }.ToJsonString();
        }));
        return path;
    }

    [TestCaseSource(typeof(OptimumGpt2Tests), nameof(OptimumGpt2Tests.Files))]
    public void RewritesTrainsEvaluatesAndGenerates(string file)
    {
        using var dir = new TempDir();
        var data = WriteTokens(dir, "train.jsonl", 24, 1);
        var rw = dir.File("rw");
        var (code, output, error) = CliRunner.Run("rewrite", OptimumGpt2Tests.Fixture(file), "--out", rw, "--rank", "4", "--targets", "c_attn,c_fc");
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain("inputs: input_ids (input_ids), attention_mask (attention_mask), position_ids (position_ids)"));

        var run = dir.File("run");
        (code, output, error) = CliRunner.Run("train", "--model", rw, "--data", data, "--format", "tokens", "--out", run,
            "--max-steps", "6", "--batch", "4", "--lr", "1e-2", "--threads", "1", "--no-shuffle", "--eval-data", data);
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain("training finished"));
        var adapter = Path.Combine(run, RunLayout.OnnxAdapter);
        Assert.That(File.Exists(adapter), Is.True);

        (code, output, error) = CliRunner.Run("eval", "--model", rw, "--adapter", adapter, "--data", data, "--format", "tokens", "--batch", "5");
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain("perplexity"));

        (code, output, error) = CliRunner.Run("generate", "--model", rw, "--adapter", adapter, "--ids", "5,12,19", "-n", "4");
        Assert.That(code, Is.EqualTo(0), error);
        var generated = output.Trim().Split('\n')[^1].Split(',');
        Assert.That(generated, Has.Length.EqualTo(4));
        Assert.That(generated.Select(int.Parse), Has.All.InRange(0, 299));

        (code, output, error) = CliRunner.Run("classify", "--model", rw, "--adapter", adapter, "--ids", "5,12,19");
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Contain("5,12,19"));
    }

    [Test]
    public void ClassificationTrainsOnAWithPastExport()
    {
        using var dir = new TempDir();
        // the class is whether the row starts low: readable from the last token only through attention over the row
        var rng = new Random(4);
        var data = dir.File("cls.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 32).Select(i =>
        {
            int label = i % 2, n = rng.Next(3, 10);
            var ids = Enumerable.Range(0, n).Select(j => (JsonNode?)(j == 0 ? (label == 0 ? rng.Next(1, 50) : rng.Next(200, 299)) : rng.Next(100, 150))).ToArray();
            return new JsonObject { ["input_ids"] = new JsonArray(ids), ["label"] = label }.ToJsonString();
        }));
        var rw = dir.File("rw");
        var (code, _, error) = CliRunner.Run("rewrite", OptimumGpt2Tests.Fixture("gpt2_opset17_with_past.onnx"), "--out", rw, "--rank", "4");
        Assert.That(code, Is.EqualTo(0), error);
        (code, var output, error) = CliRunner.Run("train", "--model", rw, "--data", data, "--format", "tokens", "--task", "cls", "--classes", "2",
            "--out", dir.File("run"), "--epochs", "6", "--batch", "8", "--lr", "1e-2", "--threads", "1", "--eval-data", data);
        Assert.That(code, Is.EqualTo(0), error);
        var metrics = File.ReadAllLines(Path.Combine(dir.File("run"), RunLayout.Metrics)).Select(l => JsonNode.Parse(l)!).Where(m => (string?)m["kind"] == "eval").ToList();
        TestContext.Out.WriteLine(string.Join(" ", metrics.Select(m => m["accuracy"]?.ToJsonString())));
        Assert.That(metrics[^1]["accuracy"]!.GetValue<double>(), Is.GreaterThanOrEqualTo(0.9), "the first token decides the class: a trained head finds it");
    }

    [Test]
    public void InspectPrintsTheRoleTable()
    {
        var (code, output, error) = CliRunner.Run("inspect", OptimumGpt2Tests.Fixture("gpt2_opset17_with_past.onnx"));
        Assert.That(code, Is.EqualTo(0), error);
        TestContext.Out.WriteLine(output[..output.IndexOf("operators", StringComparison.Ordinal)]);
        Assert.That(output, Does.Match(@"input\s*│\s*attention_mask\s*│\s*attention_mask\s*│\s*int64"));
        Assert.That(output, Does.Match(@"input\s*│\s*past_key_values\.1\.value\s*│\s*past_value\[1\]\s*│\s*float\s*│\s*\[batch_size, 4, past_sequence_length, 8\]"));
        Assert.That(output, Does.Match(@"output\s*│\s*present\.0\.key\s*│\s*present_key\[0\]"));
    }

    [Test]
    public void AnInputWithoutARoleFailsTheRewriteUntilTheUserNamesIt()
    {
        using var dir = new TempDir();
        var model = SignatureRolesTests.RenamedMaskModel(dir);
        var (code, _, error) = CliRunner.Run("rewrite", model, "--out", dir.File("rw"), "--targets", "c_attn");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(error.Trim().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(error, Does.StartWith("error:").And.Contain("'segment_mask'").And.Contain("--input-role segment_mask=ROLE"));
        Assert.That(Directory.Exists(dir.File("rw")), Is.False, "nothing is written when the rewrite fails");

        (code, var output, error) = CliRunner.Run("inspect", model, "--input-role", "segment_mask=attention_mask");
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output, Does.Match(@"segment_mask\s*│\s*attention_mask"));

        (code, _, error) = CliRunner.Run("rewrite", model, "--out", dir.File("rw"), "--targets", "c_attn", "--input-role", "segment_mask=attention_mask");
        Assert.That(code, Is.EqualTo(0), error);
        (code, output, error) = CliRunner.Run("generate", "--model", dir.File("rw"), "--ids", "5,6", "-n", "2");
        Assert.That(code, Is.EqualTo(0), error);

        // a model served as it is (no rewrite metadata): the flag on the deployment verb itself
        (code, _, error) = CliRunner.Run("generate", "--model", model, "--ids", "5,6", "-n", "2");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(error, Does.StartWith("error:").And.Contain("'segment_mask'").And.Contain("--input-role"));
        (code, output, error) = CliRunner.Run("generate", "--model", model, "--ids", "5,6", "-n", "2", "--input-role", "segment_mask=attention_mask");
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(output.Trim().Split('\n')[^1].Split(','), Has.Length.EqualTo(2));
    }
}
