using System.Text.Json.Nodes;

namespace OnnxLora.Tests.Training;

/// <summary>`train --pack` as a user drives it: an LM run trains on packed rows and records the option; cls is refused.</summary>
[NonParallelizable]   // the CLI's failure gate writes to Console.Error
public class PackingCliTests
{
    [Test]
    public void TrainWithPackingRunsAndRefusesClassification()
    {
        using var dir = new TempDir();
        CliRunner.TinyRewrite(dir);
        var rng = new Random(3);
        File.WriteAllLines(dir.File("train.jsonl"), Enumerable.Range(0, 24).Select(i =>
        {
            var ids = Enumerable.Range(0, rng.Next(2, 20)).Select(_ => rng.Next(1, 500)).ToArray();
            // a prompt whose labels are masked, as instruction data has
            return new JsonObject { ["input_ids"] = new JsonArray(ids.Select(t => (JsonNode?)t).ToArray()),
                                    ["labels"] = new JsonArray(ids.Select((t, j) => (JsonNode?)(j < ids.Length / 2 ? -100 : t)).ToArray()), ["label"] = i % 2 }.ToJsonString();
        }));
        var (code, _, error) = CliRunner.Run("train", "--model", dir.File("rw"), "--data", dir.File("train.jsonl"), "--format", "tokens",
                                         "--seq", "48", "--batch", "2", "--epochs", "1", "--threads", "1", "--pack", "--out", dir.File("run"));
        Assert.That(code, Is.EqualTo(0), error);
        var config = JsonNode.Parse(File.ReadAllText(dir.File("run/train_config.json")))!.AsObject();
        Assert.That(config["pack"]!.GetValue<bool>(), Is.True);
        Assert.That(File.Exists(dir.File("run/adapter.safetensors")), Is.True);
        var metrics = File.ReadAllLines(dir.File("run/metrics.jsonl")).Select(l => JsonNode.Parse(l)!).Where(n => (string)n["kind"]! == "train").ToList();
        // 24 examples of 2..19 tokens fit in far fewer than 24 / 2 = 12 batches of 2 once packed into rows of 48
        Assert.That(metrics, Has.Count.InRange(1, 6));

        (code, _, error) = CliRunner.Run("train", "--model", dir.File("rw"), "--data", dir.File("train.jsonl"), "--format", "tokens", "--task", "cls", "--classes", "2",
                                         "--seq", "48", "--pack", "--out", dir.File("run-cls"));
        Assert.That(code, Is.Not.EqualTo(0));
        Assert.That(error, Does.Contain("--pack"));

        // the help renders (markup in any description could break it) and states the caveat
        (code, var help, error) = CliRunner.Run("train", "--help");
        Assert.That(code, Is.EqualTo(0), error);
        Assert.That(help, Does.Contain("--pack").And.Contain("earlier examples"));
    }
}
