using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.GraphRewrite;

public class OnnxFileTests
{
    static ModelProto SmallModel()
    {
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "g" }, ProducerName = "test" };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, "batch", 4));
        var w = new float[4 * 300];
        for (int i = 0; i < w.Length; i++) w[i] = (i % 17) * 0.01f;
        g.AddInitializer(Tensors.Float("w", [4, 300], w));
        var y = g.Op("MatMul", ["x", "w"], "y");
        g.AddOutput(ValueInfos.Tensor(y, DataType.Float, "batch", 300));
        return model;
    }

    [Test]
    public void InlineRoundTripIsByteStable()
    {
        using var dir = new TempDir();
        var a = Path.Combine(dir.Path, "a.onnx");
        var b = Path.Combine(dir.Path, "b.onnx");
        OnnxFile.Save(SmallModel(), a);
        OnnxFile.Save(OnnxFile.Load(a), b);
        Assert.That(File.ReadAllBytes(b), Is.EqualTo(File.ReadAllBytes(a)));
    }

    [Test]
    public void ExternalDataRoundTripsAndRunsInOrt()
    {
        using var dir = new TempDir();
        var path = Path.Combine(dir.Path, "ext.onnx");
        var model = SmallModel();
        OnnxFile.Save(model, path, new SaveOptions { ExternalData = ExternalDataMode.Always });
        Assert.That(File.Exists(path + ".data"), Is.True);
        Assert.That(new FileInfo(path).Length, Is.LessThan(1000), "weights should live in the data file");

        var loaded = OnnxFile.Load(path);
        Assert.That(loaded.Graph.Initializer[0].RawData, Is.EqualTo(model.Graph.Initializer[0].RawData));
        Assert.That(loaded.Equals(model), Is.True, "message-for-message equal after resolving external data");

        // ORT reads the external data itself
        using var session = new InferenceSession(path);
        using var x = OrtValue.CreateTensorValueFromMemory(new float[] { 1, 0, 0, 0 }, [1, 4]);
        using var outputs = session.Run(new RunOptions(), ["x"], [x], ["y"]);
        var y = outputs[0].GetTensorDataAsSpan<float>().ToArray();
        Assert.That(y[5], Is.EqualTo(Tensors.ToFloats(model.Graph.Initializer[0])[5]), "row 0 of w, column 5");
    }

    [Test]
    public void UnknownFieldsSurviveARoundTrip()
    {
        var bytes = SmallModel().ToByteArray();
        // append field 999 (varint) to the ModelProto: a field this schema does not know
        var extra = new byte[] { 0xB8, 0x3E, 0x2A };
        var withUnknown = bytes.Concat(extra).ToArray();
        var parsed = OnnxFile.Parse(withUnknown);
        Assert.That(parsed.ToByteArray(), Is.EqualTo(withUnknown));
    }

    [Test]
    public void TruncatedFileGivesAClearError()
    {
        using var dir = new TempDir();
        var path = Path.Combine(dir.Path, "t.onnx");
        OnnxFile.Save(SmallModel(), path);
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length / 2)]);
        var e = Assert.Throws<OnnxFormatException>(() => OnnxFile.Load(path));
        Assert.That(e!.Message, Does.Contain("t.onnx"));
    }

    [Test]
    public void UniqueNamesNeverCollide()
    {
        var g = new GraphEditor(SmallModel());
        var names = Enumerable.Range(0, 5).Select(_ => g.UniqueName("w")).ToList();
        Assert.That(names, Is.Unique);
        Assert.That(names, Does.Not.Contain("w"));
    }
}
