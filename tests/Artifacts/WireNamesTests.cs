using System.Text.Json;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Contracts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Artifacts;

/// <summary>
/// The contract enums have one spelling: what artifacts.json, train_config.json, lora_config.json and adapter metadata
/// hold (the same strings as before they were enums, so earlier files still read) is what flags and config keys parse.
/// </summary>
public class WireNamesTests
{
    static readonly object[] Spellings =
    [
        new object[] { TrainingTask.Lm, "lm" }, new object[] { TrainingTask.Cls, "cls" },
        new object[] { HeadMode.Full, "full" }, new object[] { HeadMode.Lora, "lora" },
        new object[] { Pooling.Last, "last" }, new object[] { Pooling.First, "first" }, new object[] { Pooling.Mean, "mean" },
        new object[] { OptimizerKind.AdamW, "adamw" }, new object[] { OptimizerKind.Sgd, "sgd" },
        new object[] { LoraScaling.Peft, "peft" }, new object[] { LoraScaling.RsLora, "rslora" }, new object[] { LoraScaling.Alpha, "alpha" },
        new object[] { LoraInit.Kaiming, "kaiming" }, new object[] { LoraInit.Gaussian, "gaussian" },
        new object[] { ScheduleKind.Constant, "constant" }, new object[] { ScheduleKind.Linear, "linear" }, new object[] { ScheduleKind.Cosine, "cosine" },
    ];

    [TestCaseSource(nameof(Spellings))]
    public void JsonTextAndParserAgree(Enum value, string wire)
    {
        Assert.That(JsonSerializer.Serialize(value, value.GetType()), Is.EqualTo($"\"{wire}\""), "JSON writes the wire name");
        Assert.That(JsonSerializer.Deserialize($"\"{wire}\"", value.GetType()), Is.EqualTo(value), "JSON reads it back");
        var parse = typeof(WireNames).GetMethod(nameof(WireNames.Parse))!.MakeGenericMethod(value.GetType());
        Assert.That(parse.Invoke(null, [$" {wire.ToUpperInvariant()} ", "x"]), Is.EqualTo(value), "the parser takes any case");
        var name = typeof(WireNames).GetMethod(nameof(WireNames.WireName))!.MakeGenericMethod(value.GetType());
        Assert.That(name.Invoke(null, [value]), Is.EqualTo(wire));
    }

    [Test]
    public void AnUnknownNameListsTheChoices()
    {
        Assert.That(() => WireNames.Parse<Pooling>("max", "pooling"), Throws.ArgumentException.With.Message.EqualTo("pooling must be last, first or mean (got 'max')"));
        Assert.That(() => WireNames.Parse<HeadMode>("half", "head"), Throws.ArgumentException.With.Message.EqualTo("head must be full or lora (got 'half')"));
        Assert.That(() => WireNames.Parse<ScheduleKind>("step", "schedule"), Throws.ArgumentException.With.Message.EqualTo("schedule must be constant, linear or cosine (got 'step')"));
        Assert.That(() => WireNames.Parse<LoraInit>("zeros", "init"), Throws.ArgumentException.With.Message.EqualTo("init must be kaiming or gaussian (got 'zeros')"));
    }

    [Test]
    public void ManifestWritesRsLoraAsTheFlagDoesAndStillReadsTheSnakeCaseSpelling()
    {
        // lora_config.json wrote "rs_lora" (snake case of the member) before the enum had one wire name
        using var dir = new TempDir();
        var path = dir.File(RunLayout.LoraConfig);
        Deployment.TinyDeployable.Manifest(LoraScaling.RsLora).Save(path);
        var json = File.ReadAllText(path);
        Assert.That(json, Does.Contain("\"scaling\": \"rslora\""));
        File.WriteAllText(path, json.Replace("\"rslora\"", "\"rs_lora\""));
        Assert.That(LoraManifest.Load(path).Scaling, Is.EqualTo(LoraScaling.RsLora));
        File.WriteAllText(path, json.Replace("\"rslora\"", "\"sqrt\""));
        Assert.That(() => LoraManifest.Load(path), Throws.TypeOf<InvalidDataException>().With.Message.Contains(path)
            .And.Message.Contains("'scaling' must be peft, rslora or alpha (got 'sqrt')"));
    }

    [Test]
    public void TrainConfigKeepsItsSpellingSoEarlierRunsResume()
    {
        // what train_config.json held when these were strings; resume compares NumericsHash of this JSON
        using var dir = new TempDir();
        var options = new TrainOptions { ModelDir = "m", DataPath = "d", OutDir = dir.Path, HeadMode = HeadMode.Lora, Pooling = Pooling.Mean, Optimizer = OptimizerKind.Sgd, Schedule = ScheduleKind.Cosine };
        var json = options.ToJson();
        Assert.That(json, Does.Contain("\"head_mode\": \"lora\"").And.Contain("\"pooling\": \"mean\"").And.Contain("\"optimizer\": \"sgd\"").And.Contain("\"schedule\": \"cosine\""));
        var earlier = JsonSerializer.Serialize(new { model_dir = "m", data_path = "d", out_dir = dir.Path, head_mode = "lora", pooling = "first", optimizer = "adamw", schedule = "constant" });
        File.WriteAllText(Path.Combine(dir.Path, RunLayout.TrainConfig), earlier);
        var back = TrainOptions.Load(dir.Path);
        Assert.That((back.HeadMode, back.Pooling, back.Optimizer, back.Schedule), Is.EqualTo((HeadMode.Lora, Pooling.First, OptimizerKind.AdamW, ScheduleKind.Constant)));
    }
}
