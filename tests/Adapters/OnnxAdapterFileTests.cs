using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Tests.Deployment;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Adapters;

public class OnnxAdapterFileTests
{
    [Test]
    public void Written_file_has_identifier_version_and_A_with_scaled_B()
    {
        using var dir = new TempDir();
        var manifest = TinyDeployable.Manifest();
        var adapter = LoraAdapter.CreateRandom(manifest, seed: 3);
        var path = dir.File("a.onnx_adapter");
        OnnxAdapterFile.Write(path, adapter, new OnnxAdapterWriteOptions { AdapterVersion = 7, ModelVersion = 2 });

        var bytes = File.ReadAllBytes(path);
        Assert.That(System.Text.Encoding.ASCII.GetString(bytes, 4, 4), Is.EqualTo("TORT"));
        var contents = OnnxAdapterFile.Read(path);
        Assert.That((contents.FormatVersion, contents.AdapterVersion, contents.ModelVersion), Is.EqualTo((1, 7, 2)));
        Assert.That(contents.Parameters, Has.Count.EqualTo(4));
        foreach (var t in manifest.Targets)
        {
            var a = contents.Parameters.Single(p => p.Name == t.LoraA);
            var b = contents.Parameters.Single(p => p.Name == t.LoraB);
            Assert.That(a.Dims, Is.EqualTo(new[] { t.In, t.Rank }));
            Assert.That(b.Dims, Is.EqualTo(new[] { (long)t.Rank, t.Out }));
            Assert.That(a.DataType, Is.EqualTo(DataType.Float));
            Assert.That(a.ToFloats(), Is.EqualTo(adapter.A(t).Data));
            Assert.That(b.ToFloats(), Is.EqualTo(adapter.B(t).Data.Select(v => (float)(v * t.Scale))).Within(1e-7));
            Assert.That(b.RawData.Length == 0 || (bytes.AsSpan().IndexOf(b.RawData.Span) % 8 == 0), "raw_data is 8-byte aligned");
        }
    }

    [Test]
    public void Load_unfolds_the_scale_and_round_trips()
    {
        using var dir = new TempDir();
        var manifest = TinyDeployable.Manifest(OnnxLora.GraphRewrite.Lora.LoraScaling.RsLora);
        var adapter = LoraAdapter.CreateRandom(manifest, seed: 4);
        var path = dir.File("a.onnx_adapter");
        OnnxAdapterFile.Write(path, adapter);
        var back = OnnxAdapterFile.Load(path, manifest);
        foreach (var t in manifest.Targets)
        {
            Assert.That(back.A(t).Data, Is.EqualTo(adapter.A(t).Data));
            Assert.That(back.B(t).Data, Is.EqualTo(adapter.B(t).Data).Within(1e-6));
        }
    }

    [Test]
    public void Half_precision_needs_a_model_whose_inputs_have_that_type()
    {
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        var adapter = LoraAdapter.CreateRandom(files.Manifest, seed: 5);
        var noModel = Assert.Throws<ArgumentException>(() => OnnxAdapterFile.Write(dir.File("h.onnx_adapter"), adapter, new() { ElementType = DataType.Float16 }))!;
        Assert.That(noModel.Message, Does.Contain("deployable model"));
        var wrongType = Assert.Throws<InvalidDataException>(() => OnnxAdapterFile.Write(dir.File("h.onnx_adapter"), adapter,
            new() { ElementType = DataType.Float16, DeployableModel = OnnxFile.Load(files.Deploy) }))!;
        Assert.That(wrongType.Message, Does.Contain("Float16").And.Contain("lora_A"));
        Assert.That(File.Exists(dir.File("h.onnx_adapter")), Is.False);
        // the fp16 encoding itself round-trips through the reader
        var bytes = OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(adapter, DataType.Float16));
        var p = OnnxAdapterFile.Parse(bytes).Parameters[0];
        Assert.That(p.DataType, Is.EqualTo(DataType.Float16));
        Assert.That(p.ToFloats(), Is.EqualTo(adapter.A(files.Manifest.Targets[0]).Data).Within(1e-3));
    }

    static readonly (string Case, Func<byte[], byte[]> Corrupt, string Expect)[] Corruptions =
    [
        ("empty", _ => [], "too short"),
        ("wrong identifier", b => { var c = (byte[])b.Clone(); c[4] = (byte)'X'; return c; }, "identifier"),
        ("truncated", b => b[..(b.Length / 2)], "past the end"),
        ("not a flatbuffer", b => { var c = new byte[b.Length]; new Random(1).NextBytes(c); "TORT"u8.CopyTo(c.AsSpan(4)); return c; }, ""),
    ];

    [TestCaseSource(nameof(CorruptionCases))]
    public void Corrupt_files_fail_with_a_clear_error(string name)
    {
        var (_, corrupt, expect) = Corruptions.Single(c => c.Case == name);
        var good = OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(LoraAdapter.CreateRandom(TinyDeployable.Manifest(), 1)));
        var e = Assert.Throws<InvalidDataException>(() => OnnxAdapterFile.Parse(corrupt(good), "bad.onnx_adapter"))!;
        Assert.That(e.Message, Does.StartWith("bad.onnx_adapter: ").And.Contain(expect));
    }

    static IEnumerable<string> CorruptionCases() => Corruptions.Select(c => c.Case);

    [Test]
    public void Unsupported_format_version_is_reported_before_the_payload()
    {
        // format_version is the first field of the root table; find it by writing a file with a marker value
        var bytes = OnnxAdapterFile.Serialize([AdapterParameter.FromFloats("p", [1], [1f])]);
        int root = BitConverter.ToInt32(bytes, 0);
        int vtable = root - BitConverter.ToInt32(bytes, root);
        int field = root + BitConverter.ToUInt16(bytes, vtable + 4);
        Assert.That(BitConverter.ToInt32(bytes, field), Is.EqualTo(1));
        BitConverter.TryWriteBytes(bytes.AsSpan(field), 2);
        var e = Assert.Throws<InvalidDataException>(() => OnnxAdapterFile.Parse(bytes, "v2.onnx_adapter"))!;
        Assert.That(e.Message, Does.Contain("format version 2"));
    }

    [Test]
    public void Adapter_for_another_manifest_is_rejected_with_names()
    {
        using var dir = new TempDir();
        var manifest = TinyDeployable.Manifest();
        var path = dir.File("a.onnx_adapter");
        OnnxAdapterFile.Write(path, LoraAdapter.CreateRandom(manifest, 1));
        var other = manifest with { Targets = [manifest.Targets[0] with { Rank = 2 }, manifest.Targets[1]] };
        var e = Assert.Throws<InvalidDataException>(() => OnnxAdapterFile.Load(path, other))!;
        Assert.That(e.Message, Does.Contain("lora_A.transformer.h.0.mlp.c_fc").And.Contain("[6, 2]"));
        var fewer = manifest with { Targets = [manifest.Targets[0]] };
        e = Assert.Throws<InvalidDataException>(() => OnnxAdapterFile.Load(path, fewer))!;
        Assert.That(e.Message, Does.Contain("c_proj").And.Contain("not in the manifest"));
    }
}
