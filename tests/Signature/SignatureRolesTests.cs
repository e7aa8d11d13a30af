using System.Text.Json;
using Onnx;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Pipeline.Deployment;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Signature;

/// <summary>Input and output roles decided from names, types and shapes; overrides; and where the roles are kept.</summary>
public class SignatureRolesTests
{
    [TestCaseSource(typeof(OptimumGpt2Tests), nameof(OptimumGpt2Tests.Files))]
    public void OptimumExportsGetTheirRoles(string file)
    {
        var roles = SignatureRoles.Decide(OnnxFile.Load(OptimumGpt2Tests.Fixture(file)));
        var expectedInputs = new List<string> { "input_ids=input_ids", "attention_mask=attention_mask", "position_ids=position_ids" };
        bool past = file.Contains("with_past", StringComparison.Ordinal);
        for (int i = 0; past && i < 2; i++) expectedInputs.AddRange([$"past_key_values.{i}.key=past_key[{i}]", $"past_key_values.{i}.value=past_value[{i}]"]);
        Assert.That(roles.Inputs.Select(e => $"{e.Name}={e}"), Is.EqualTo(expectedInputs));
        Assert.That(roles.Outputs.Select(e => $"{e.Name}={e}"),
            Is.EqualTo(new[] { "logits=logits", "present.0.key=present_key[0]", "present.0.value=present_value[0]", "present.1.key=present_key[1]", "present.1.value=present_value[1]" }));
        if (past)
            Assert.That(SignatureRoles.EmptyPastShape(roles.Inputs.First(e => e.Role == IoRole.PastValue), batch: 3), Is.EqualTo(new long[] { 3, 4, 0, 8 }));
    }

    static IoDescription D(string name, DataType type, params Dim[] dims) => new(name, type, dims);

    [Test]
    public void OlderCacheFormsCachePositionAndRenamedIdsAreDecided()
    {
        var roles = SignatureRoles.Decide(
            [D("tokens", DataType.Int32, "batch", "seq"), D("token_type_ids", DataType.Int64, "batch", "seq"), D("cache_position", DataType.Int64, "seq"),
             D("past.0", DataType.Float16, 2, "batch", 12, "past", 64), D("past_key_values.1", DataType.Float16, 2, "batch", 12, "past", 64)],
            [D("scores", DataType.Float, "batch", "seq", 50257), D("present.0", DataType.Float16, 2, "batch", 12, "total", 64), D("hidden", DataType.Float, "batch", "seq", 768)],
            null, "m.onnx");
        Assert.That(roles.Inputs.Select(e => $"{e.Name}={e}"), Is.EquivalentTo(new[]
            { "tokens=input_ids", "token_type_ids=token_type_ids", "cache_position=cache_position", "past.0=past_key_value[0]", "past_key_values.1=past_key_value[1]" }));
        Assert.That(roles.Outputs.Select(e => $"{e.Name}={e}"), Is.EqualTo(new[] { "scores=logits", "present.0=present_key_value[0]", "hidden=other" }));
        Assert.That(SignatureRoles.EmptyPastShape(roles.Inputs.First(e => e.Name == "past.0"), batch: 2), Is.EqualTo(new long[] { 2, 2, 12, 0, 64 }));
    }

    [Test]
    public void AnUndecidableInputIsAnErrorThatNamesItAndTheFlag()
    {
        var inputs = new[] { D("input_ids", DataType.Int64, "batch", "seq"), D("segment_mask", DataType.Int64, "batch", "seq") };
        var outputs = new[] { D("logits", DataType.Float, "batch", "seq", 10) };
        var e = Assert.Throws<ArgumentException>(() => SignatureRoles.Decide(inputs, outputs, null, "m.onnx"))!;
        Assert.That(e.Message, Does.StartWith("m.onnx: ").And.Contain("'segment_mask'").And.Contain("--input-role segment_mask=ROLE").And.Contain("attention_mask"));

        var overrides = RoleOverride.ParseAll(["segment_mask=attention_mask"]);
        Assert.That(SignatureRoles.Decide(inputs, outputs, overrides, "m.onnx").Input(IoRole.AttentionMask), Is.EqualTo("segment_mask"));
    }

    [TestCase("input_ids", DataType.Float, "is float")]
    [TestCase("past_key_values.0.key", DataType.Int64, "is int64")]
    public void ANameWithTheWrongTypeIsAnError(string name, DataType type, string says)
    {
        var inputs = new[] { D("ids", DataType.Int64, "b", "s"), D(name, type, "b", 4, "p", 8) };
        if (name == "input_ids") inputs = [D(name, type, "b", "s")];
        var e = Assert.Throws<ArgumentException>(() => SignatureRoles.Decide(inputs, [D("logits", DataType.Float, "b", "s", 10)], null, "m.onnx"))!;
        Assert.That(e.Message, Does.Contain($"'{name}'").And.Contain(says));
    }

    [TestCase("x", "--input-role 'x': expected NAME=ROLE")]
    [TestCase("x=mask", "'mask' is not an input role")]
    [TestCase("x=past_key", "past_key needs its layer")]
    [TestCase("x=attention_mask:1", "only past roles take a layer")]
    [TestCase("x=past_value:one", "must be a non-negative integer")]
    public void BadOverridesAreErrors(string flag, string says) =>
        Assert.That(() => RoleOverride.Parse(flag), Throws.ArgumentException.With.Message.Contains(says));

    /// <summary>gpt2_opset14.onnx with attention_mask renamed: nothing tells its role but the user.</summary>
    internal static string RenamedMaskModel(TempDir dir)
    {
        var model = OnnxFile.Load(OptimumGpt2Tests.Fixture("gpt2_opset14.onnx"));
        foreach (var input in model.Graph.Input.Where(i => i.Name == "attention_mask")) input.Name = "segment_mask";
        foreach (var node in model.Graph.Node)
            for (int i = 0; i < node.Input.Count; i++)
                if (node.Input[i] == "attention_mask") node.Input[i] = "segment_mask";
        var path = dir.File("renamed.onnx");
        OnnxFile.Save(model, path);
        return path;
    }

    [Test]
    public void AnOverrideGivenAtRewriteTravelsInBothModelsToTrainingAndDeployment()
    {
        using var dir = new TempDir();
        var path = RenamedMaskModel(dir);
        var config = new LoraConfig { Rank = 2, TargetModules = ["c_attn"] };
        var e = Assert.Throws<ArgumentException>(() => LoraRewrite.RewriteFile(path, config, dir.File("rw")))!;
        Assert.That(e.Message, Does.Contain("'segment_mask'").And.Contain("--input-role"));

        var result = LoraRewrite.RewriteFile(path, config, dir.File("rw"), inputRoles: RoleOverride.ParseAll(["segment_mask=attention_mask"]));
        var artifacts = TrainingArtifacts.Build(result.TrainingModel, result.Manifest);
        Assert.That(artifacts.Spec.Train.Inputs.Single(i => i.Name == "segment_mask").Role, Is.EqualTo(IoRole.AttentionMask));
        using var host = AdapterHost.Create(Path.Combine(dir.File("rw"), RunLayout.DeployableModel));
        Assert.That(ModelSignature.Of(host).AttentionMask, Is.EqualTo("segment_mask"));
    }

    [Test]
    public void ArtifactsJsonWritesRolesAsSnakeCaseNamesAndReadsThemBack()
    {
        var r = LoraRewrite.Rewrite(OnnxFile.Load(OptimumGpt2Tests.Fixture("gpt2_opset17_with_past.onnx")), new LoraConfig { Rank = 2, TargetModules = ["c_attn"] }, "m", "");
        var art = TrainingArtifacts.Build(r.TrainingModel, r.Manifest);
        using var dir = new TempDir();
        art.Save(dir.Path);
        var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir.Path, RunLayout.ArtifactsSpec)));
        var inputs = json.RootElement.GetProperty("train").GetProperty("inputs").EnumerateArray().ToDictionary(i => i.GetProperty("name").GetString()!);
        Assert.That(inputs["past_key_values.1.value"].GetProperty("role").GetString(), Is.EqualTo("past_value"));
        Assert.That(inputs["past_key_values.1.value"].GetProperty("layer").GetInt32(), Is.EqualTo(1));
        Assert.That(inputs["labels"].GetProperty("role").GetString(), Is.EqualTo("labels"));
        Assert.That(inputs["reset_grad"].GetProperty("role").GetString(), Is.EqualTo("reset_grad"));
        var back = TrainingArtifacts.LoadSpec(dir.Path);
        Assert.That(back.Train.Inputs.Select(i => (i.Name, i.Role, i.Layer)), Is.EqualTo(art.Spec.Train.Inputs.Select(i => (i.Name, i.Role, i.Layer))));

        File.WriteAllText(Path.Combine(dir.Path, RunLayout.ArtifactsSpec), File.ReadAllText(Path.Combine(dir.Path, RunLayout.ArtifactsSpec)).Replace("\"past_value\"", "\"past_values\"", StringComparison.Ordinal));
        Assert.That(() => TrainingArtifacts.LoadSpec(dir.Path), Throws.TypeOf<InvalidDataException>().With.Message.Contains(RunLayout.ArtifactsSpec));
    }
}
