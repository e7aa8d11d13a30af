using System.Text.Json.Nodes;

namespace OnnxLora.Tests.Training;

/// <summary>`train --bucket-by-length` as a user drives it: the run trains, and the option is kept in train_config.json for --resume.</summary>
[NonParallelizable]   // the CLI's failure gate writes to Console.Error
public class BucketingCliTests
{
    [Test]
    public void TrainWithBucketingRunsAndRecordsTheOption()
    {
        using var dir = new TempDir();
        CliRunner.TinyRewrite(dir);
        var rng = new Random(3);
        File.WriteAllLines(dir.File("train.jsonl"), Enumerable.Range(0, 24).Select(i =>
            new JsonObject { ["input_ids"] = new JsonArray(Enumerable.Range(0, rng.Next(2, 40)).Select(_ => (JsonNode?)rng.Next(1, 500)).ToArray()), ["label"] = i % 2 }.ToJsonString()));
        var (code, _, error) = CliRunner.Run("train", "--model", dir.File("rw"), "--data", dir.File("train.jsonl"), "--format", "tokens", "--task", "cls", "--classes", "2",
                                         "--seq", "48", "--batch", "4", "--epochs", "1", "--threads", "1", "--bucket-by-length", "--out", dir.File("run"));
        Assert.That(code, Is.EqualTo(0), error);
        var config = JsonNode.Parse(File.ReadAllText(dir.File("run/train_config.json")))!.AsObject();
        Assert.That(config.Single(p => p.Key.Replace("_", "").Equals("bucketbylength", StringComparison.OrdinalIgnoreCase)).Value!.GetValue<bool>(), Is.True);
        Assert.That(File.Exists(dir.File("run/adapter.safetensors")), Is.True);
    }
}
