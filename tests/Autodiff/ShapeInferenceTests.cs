using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Autodiff;

/// <summary>Shape inference on the export fixtures and on small hand-made cases (symbols kept, attribute-form axes).</summary>
public class ShapeInferenceTests
{
    static string Fixture(params string[] parts) => Path.Combine([TestContext.CurrentContext.TestDirectory, "fixtures", .. parts]);

    [TestCase("torch/gpt_opset14_decomposed_ln_erf_gelu_qkvbias.onnx")]
    [TestCase("torch/gpt_opset17_fused_ln_tanh_gelu_noqkvbias.onnx")]
    [TestCase("torch/gpt_opset17_custom_ln_tanh_gelu.onnx")]
    [TestCase("torch/hf_gpt2_conv1d_opset14.onnx")]
    [TestCase("tiny.onnx")]
    public void EveryValueOfTheExportsHasARankAndLogitsKeepTheirSymbols(string file)
    {
        var model = OnnxFile.Load(Fixture(file));
        var shapes = ShapeInference.Infer(model);
        var noRank = model.Graph.Node.SelectMany(n => n.Output).Where(o => o.Length > 0 && shapes[o].Dims is null).ToList();
        Assert.That(noRank, Is.Empty, "values without a rank");
        Assert.That(model.Graph.Node.SelectMany(n => n.Output).Where(o => o.Length > 0).All(o => shapes[o].ElemType != 0), Is.True, "every value has an element type");
        var logits = shapes["logits"];
        var ids = ValueInfos.Dims(model.Graph.Input.First(i => i.Name == "input_ids"))!;
        Assert.That(logits.Dims![0], Is.EqualTo(ids[0]));
        Assert.That(logits.Dims[1], Is.EqualTo(ids[1]), "the sequence symbol survives Shape/Gather/Concat/Reshape chains");
        Assert.That(logits.Dims[2].IsKnown, Is.True);
    }

    [Test]
    public void AttributeAxesBeforeOpset13AndBroadcasting()
    {
        var model = new ModelProto { IrVersion = 7, Graph = new GraphProto { Name = "g" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Version = 11 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, "b", 1, 5));
        g.AddInput(ValueInfos.Tensor("y", DataType.Float, 4, 1));
        var sq = g.Op("Squeeze", ["x"], "sq", attributes: Attr.Ints("axes", 1));
        var un = g.Op("Unsqueeze", [sq], "un", attributes: Attr.Ints("axes", 0, -1));
        var sum = g.Op("Add", ["x", "y"], "sum");
        var red = g.Op("ReduceMean", [sum], "red", attributes: [Attr.Ints("axes", -1), Attr.Int("keepdims", 0)]);
        var s = ShapeInference.Infer(model);
        Assert.That(s[sq].ToString(), Is.EqualTo("Float[b, 5]"));
        Assert.That(s[un].ToString(), Is.EqualTo("Float[1, b, 5, 1]"));
        Assert.That(s[sum].ToString(), Is.EqualTo("Float[b, 4, 5]"));
        Assert.That(s[red].ToString(), Is.EqualTo("Float[b, 4]"));
    }

    /// <summary>Every committed model fixture (fuzz inputs aside) is inferred node by node: none is left unknown.</summary>
    [Test]
    public void EveryNodeOfEveryFixtureHasAnInferer()
    {
        var root = Fixture();
        var files = Directory.EnumerateFiles(root, "*.onnx", SearchOption.AllDirectories)
            .Where(f => !Path.GetRelativePath(root, f).StartsWith("fuzz" + Path.DirectorySeparatorChar)).ToList();
        Assert.That(files, Is.Not.Empty);
        var notInferred = files.SelectMany(f => ShapeInference.Run(OnnxFile.Load(f)).NotInferred.Select(x => $"{Path.GetRelativePath(root, f)}: {x}")).ToList();
        Assert.That(notInferred, Is.Empty);
    }

    [Test]
    public void AnOpWithNoInfererOrAMalformedNodeIsReportedNotHidden()
    {
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "g" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Version = 17 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, 2, 3));
        var det = g.Op("Det", ["x"], "det");
        var bad = g.Op("Transpose", ["x"], "bad", attributes: Attr.Ints("perm", 0, 5));
        var ok = g.Op("Relu", ["x"], "ok");
        var s = ShapeInference.Run(model);
        Assert.That(s.NotInferred.Select(x => x.Node.Name), Is.EqualTo(new[] { det, bad }.Select(o => model.Graph.Node.First(n => n.Output[0] == o).Name)));
        Assert.That(s.NotInferred[0].Reason, Does.Contain("no shape inferer"));
        Assert.That(s.ShapeOf(det)!.Dims, Is.Null);
        Assert.That(s.ShapeOf(ok)!.ToString(), Is.EqualTo("Float[2, 3]"));
    }
}
