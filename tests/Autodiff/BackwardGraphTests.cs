using Onnx;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Autodiff;

/// <summary>
/// Properties of the emitted backward graph, checked on the graph itself: frozen weights get no gradient and no
/// transposed copy (GPT-2-124M LoRA and the export fixtures); every op in the fixture exports has a registry entry;
/// a missing rule names the op, node and the path from the loss.
/// </summary>
public class BackwardGraphTests
{
    static string Fixture(params string[] parts) => Path.Combine([TestContext.CurrentContext.TestDirectory, "fixtures", .. parts]);

    static IEnumerable<string> ExportFixtures() =>
        Directory.GetFiles(Fixture("torch"), "*.onnx").Select(Path.GetFileName).Append("../tiny.onnx").Select(f => f!);

    /// <summary>GPT-2-124M shaped (zeros: values do not matter for the graph), LoRA r=8 on every linear.</summary>
    static ModelProto Gpt2()
    {
        var config = GptConfig.Preset("gpt2");
        var zeros = GptLayout.Tensors(config).ToDictionary(t => t.Name, t => new WeightTensor(t.Shape, new float[t.Shape.Aggregate(1L, (a, b) => a * b)]));
        return GptBuilder.Build(config, GptWeights.Create(config, zeros));
    }

    [Test]
    public void Gpt2TrainModelHasNoFrozenWeightGradientOrTranspose()
    {
        var r = LoraRewrite.Rewrite(Gpt2(), new LoraConfig { Rank = 8, Alpha = 16 }, "gpt2", "0");
        Assert.That(r.Manifest.Targets, Has.Count.EqualTo(48));
        var art = TrainingArtifacts.Build(r.TrainingModel, r.Manifest, new ArtifactOptions());
        CheckNoFrozenGradients(r.TrainingModel, art.TrainModel);
        var cls = TrainingArtifacts.Build(r.TrainingModel, r.Manifest, new ArtifactOptions { Task = TrainingTask.Cls, Classes = 2 });
        CheckNoFrozenGradients(r.TrainingModel, cls.TrainModel);
        Assert.That(cls.TrainModel.Graph.Initializer.Any(t => t.Name == "transformer.wte.weight"), Is.True, "the embedding stays");
        Assert.That(cls.TrainModel.Graph.Node.Any(n => n.Name.StartsWith("/lm_head")), Is.False, "the LM head is gone from the cls model");
    }

    [TestCaseSource(nameof(ExportFixtures))]
    public void ExportTrainModelHasNoFrozenWeightGradientOrTranspose(string file)
    {
        var r = LoraRewrite.Rewrite(OnnxFile.Load(Fixture("torch", file)), new LoraConfig { Rank = 4, Alpha = 8 }, file, "0");
        CheckNoFrozenGradients(r.TrainingModel, TrainingArtifacts.Build(r.TrainingModel, r.Manifest).TrainModel);
    }

    // Backward nodes are the ones the view does not have. None may transpose a frozen initializer, and none may
    // produce a float tensor whose static shape is a frozen weight's (that would be a weight-sized gradient).
    static void CheckNoFrozenGradients(ModelProto view, ModelProto train)
    {
        var forward = view.Graph.Node.Select(n => n.Name).ToHashSet();
        var frozen = train.Graph.Initializer.Where(t => Tensors.IsFloatType(t.DataType) && t.Dims.Count >= 2 && Tensors.ElementCount(t) > 1).ToList();
        var frozenNames = frozen.Select(t => t.Name).ToHashSet();
        var frozenShapes = frozen.Select(t => string.Join("x", t.Dims)).ToHashSet();
        var shapes = ShapeInference.Infer(train);
        var backward = train.Graph.Node.Where(n => !forward.Contains(n.Name)).ToList();
        Assert.That(backward, Is.Not.Empty);
        foreach (var n in backward)
        {
            if (n.OpType == "Transpose")
                Assert.That(frozenNames.Contains(n.Input[0]), Is.False, $"{n.Describe()} transposes the frozen weight '{n.Input[0]}'");
            foreach (var o in n.Output)
            {
                if (!shapes.TryGetValue(o, out var s) || !s.IsStatic || !Tensors.IsFloatType(s.ElemType) || s.Rank < 2) continue;
                var key = string.Join("x", s.Dims!.Select(d => d.Value));
                Assert.That(frozenShapes.Contains(key), Is.False, $"{n.Describe()} makes '{o}' [{key}], the shape of a frozen weight");
            }
        }
        // the weight-gradient form (FusedMatMul transA) appears only for trainable tensors: one per LoRA matrix use
        Assert.That(train.Graph.Node.Where(n => n.OpType == "FusedMatMul").All(n => !frozenNames.Contains(n.Input[0]) || n.GetInt("transA", 0) == 0),
            Is.True, "no FusedMatMul takes a frozen weight as its transposed left operand");
    }

    [Test]
    public void EveryOpInTheFixtureExportsHasARegistryEntry()
    {
        var missing = ExportFixtures().SelectMany(f => OnnxFile.Load(Fixture("torch", f)).Graph.Node)
            .Where(n => !GradientRegistry.IsRegistered(n.Domain, n.OpType)).Select(n => n.OpType).Distinct().ToList();
        Assert.That(missing, Is.Empty);
    }

    // the attention-mask pattern: Where(constant [T, T] mask, scores [batch, heads, T, T], constant fill). The mask
    // and the fill get no gradient, and with static T the scores' gradient needs no unbroadcast at all (the run-time
    // form, Shape/NonZero/ReduceSum, is what GPT-2's sliced mask of unknown shape still costs: BENCHMARKS.md)
    [Test]
    public void WhereOnAStaticMaskEmitsOneMaskedGradientAndNoUnbroadcast()
    {
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "g" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Version = 17 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, "batch", 2, 4, 3));
        g.AddInput(ValueInfos.Tensor("lora_A", DataType.Float, 3, 4));
        var scores = g.Op("MatMul", ["x", "lora_A"], "scores");
        var mask = g.AddConstant("mask", Tensors.Bool("", [4, 4], Enumerable.Range(0, 16).Select(i => i % 4 <= i / 4).ToArray()));
        var fill = g.AddConstant("fill", Tensors.Scalar("", DataType.Float, float.NegativeInfinity));
        var probs = g.Op("Softmax", [g.Op("Where", [mask, scores, fill], "masked")], "probs", attributes: Attr.Int("axis", -1));
        var loss = g.Op("ReduceSum", [g.Op("Mul", [probs, probs], "sq")], "loss", attributes: Attr.Int("keepdims", 0));
        var forward = model.Graph.Node.Select(n => n.Name).ToHashSet();
        var one = g.AddConstant("one", Tensors.Scalar("", DataType.Float, 1));
        var grads = GradientBuilder.Build(model, new Dictionary<string, string> { [loss] = one }, ["lora_A"]);

        Assert.That(grads.Keys, Is.EquivalentTo(new[] { "lora_A" }));
        var backward = model.Graph.Node.Where(n => !forward.Contains(n.Name)).ToList();
        Assert.That(backward.Count(n => n.OpType == "Where"), Is.EqualTo(1), "one masked gradient, for the scores only");
        Assert.That(backward.Where(n => n.OpType == "NonZero"), Is.Empty, "no run-time unbroadcast");
        Assert.That(backward.Where(n => n.OpType == "ReduceSum").Select(n => n.Input[0]).Intersect(backward.Where(n => n.OpType == "Where").Select(n => n.Output[0])),
            Is.Empty, "the masked gradient is not summed: it already has the scores' shape");
    }

    [Test]
    public void MissingRuleNamesOpNodeAndPath()
    {
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "g" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Version = 17 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, 2, 3));
        g.AddInput(ValueInfos.Tensor("lora_A", DataType.Float, 3, 3));
        var h = g.Op("MatMul", ["x", "lora_A"], "h");
        var s = g.Op("Softplus", [h], "s");
        var loss = g.Op("ReduceSum", [s], "loss", attributes: Attr.Int("keepdims", 0));
        var one = g.AddConstant("one", Tensors.Scalar("", DataType.Float, 1));
        var e = Assert.Throws<GradientException>(() => GradientBuilder.Build(model, new Dictionary<string, string> { [loss] = one }, ["lora_A"]))!;
        Assert.That(e.Message, Does.Contain("Softplus").And.Contain("s/Softplus").And.Contain("lora_A").And.Contain("loss"));
    }
}
