using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Onnx;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Autodiff.Rules;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Autodiff;

/// <summary>
/// <see cref="GeluFusion"/>: the exported tanh-GELU subgraph becomes one com.microsoft FastGelu in training graphs,
/// with the same loss and input gradient as the written-out ops (whose rules the finite-difference rows check; the
/// FastGelu rule has its own rows in <see cref="GradientRuleTests"/>), and is left alone where an intermediate is
/// used elsewhere.
/// </summary>
public class GeluFusionTests
{
    /// <summary>x [2,3,8] → tanh-GELU as torch exports it (or with every commutative operand swapped) → loss = Σ y·r.</summary>
    static (ModelProto Model, string Loss, string Tanh) Pattern(bool swapped, int seed = 3)
    {
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "gelu" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, 2, 3, 8));
        string F(double v) => g.AddConstant("c", Tensors.Float("", [], [(float)v]));
        string[] P(string a, string b) => swapped ? [b, a] : [a, b];
        var half = g.Op("Mul", P("x", F(0.5)));
        var cube = g.Op("Pow", ["x", F(3)]);
        var inner = g.Op("Add", P("x", g.Op("Mul", P(cube, F(0.044715)))));
        var tanh = g.Op("Tanh", [g.Op("Mul", P(inner, F(Math.Sqrt(2 / Math.PI))))]);
        var y = g.Op("Mul", P(half, g.Op("Add", P(tanh, F(1)))));
        var rng = new Random(seed);
        var r = g.AddConstant("r", Tensors.Float("", [2, 3, 8], Enumerable.Range(0, 48).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray()));
        var loss = g.Op("ReduceSum", [g.Op("Mul", [y, r])], "loss", attributes: Attr.Int("keepdims", 0));
        g.AddOutput(ValueInfos.Tensor(loss, DataType.Float));
        return (model, loss, tanh);
    }

    static (float Loss, float[] Dx) LossAndGradient(ModelProto model, string loss, bool fuse)
    {
        var g = new GraphEditor(model);
        var one = g.AddConstant("one", Tensors.Float("", [], [1f]));
        var dx = GradientBuilder.Build(model, new Dictionary<string, string> { [loss] = one }, ["x"], new GradientOptions { FuseGelu = fuse })["x"];
        g.AddOutput(ValueInfos.Tensor(dx, DataType.Float, 2, 3, 8));
        using var session = new InferenceSession(model.ToByteArray());
        var x = Enumerable.Range(0, 48).Select(i => (float)(-4 + 8.0 * i / 47)).ToArray();   // both tails and the middle
        using var input = OrtValue.CreateTensorValueFromMemory(x, [2, 3, 8]);
        using var run = new RunOptions();
        using var outputs = session.Run(run, ["x"], [input], [loss, dx]);
        return (outputs[0].GetTensorDataAsSpan<float>()[0], outputs[1].GetTensorDataAsSpan<float>().ToArray());
    }

    [TestCase(false)]
    [TestCase(true)]
    public void FusedGraphHasOneFastGeluAndTheUnfusedLossAndGradient(bool swapped)
    {
        var (fused, loss, _) = Pattern(swapped);
        var (plain, _, _) = Pattern(swapped);
        var (lossF, dxF) = LossAndGradient(fused, loss, fuse: true);
        var (lossP, dxP) = LossAndGradient(plain, loss, fuse: false);
        Assert.That(fused.Graph.Node.Count(n => n.OpType == "FastGelu" && n.Domain == "com.microsoft"), Is.EqualTo(1));
        Assert.That(fused.Graph.Node.Any(n => n.OpType == "Pow"), Is.False, "the forward's x³ is gone");
        Assert.That(fused.OpsetImport.Any(o => o.Domain == "com.microsoft"), Is.True);
        Assert.That(plain.Graph.Node.Any(n => n.OpType == "FastGelu"), Is.False);
        // float32 throughout: the two spellings differ by rounding in ~15 ops of values ≤ 4, a few units of 6e-8 each;
        // ORT's FastGelu evaluates tanh by its own approximation (≲ 1e-6 relative); a wrong rule is off by O(1)
        Assert.That(lossF, Is.EqualTo(lossP).Within(1e-5));
        for (int i = 0; i < dxF.Length; i++) Assert.That(dxF[i], Is.EqualTo(dxP[i]).Within(1e-5), $"dx[{i}]");
    }

    [Test]
    public void PatternWithAnIntermediateUsedElsewhereStaysAsItIs()
    {
        var (model, _, tanh) = Pattern(swapped: false);
        new GraphEditor(model).AddOutput(ValueInfos.Tensor(tanh, DataType.Float, 2, 3, 8));
        Assert.That(GeluFusion.Run(new GraphEditor(model), _ => (int)DataType.Float), Is.EqualTo(0));
        Assert.That(model.Graph.Node.Count(n => n.OpType == "Tanh"), Is.EqualTo(1));
    }

    [Test]
    public void GptTrainModelFusesEveryBlocksGelu()
    {
        var config = GptConfig.Preset("tiny");
        var model = GptBuilder.Build(config, GptWeights.Random(config, 1));
        var r = LoraRewrite.Rewrite(model, new LoraConfig { Rank = 4, Alpha = 8 }, "tiny", "0");
        var train = TrainingArtifacts.Build(r.TrainingModel, r.Manifest, new ArtifactOptions()).TrainModel;
        Assert.That(train.Graph.Node.Count(n => n.OpType == "FastGelu"), Is.EqualTo(config.Layers));
        Assert.That(train.Graph.Node.Any(n => n.OpType == "Pow"), Is.False);
    }
}
