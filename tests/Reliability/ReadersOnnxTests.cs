using System.Runtime.InteropServices;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Tests.Rewrite;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Reliability;

/// <summary>
/// Hostile ONNX models through the CLI as a user runs it: external data that points out of the model's folder (.., an
/// absolute path, a symlink, a FIFO) is refused before a byte is read, and every malformed graph gets a one-line error
/// naming the model and the tensor or node, with no output written.
/// </summary>
[NonParallelizable]
public partial class ReadersOnnxTests
{
    /// <summary>model/mlp.onnx with every tensor in model/mlp.onnx.data; fc1.weight's location set to <paramref name="location"/>.</summary>
    static string ModelWithExternal(TempDir dir, string location, Action<TensorProto>? edit = null)
    {
        var folder = Path.Combine(dir.Path, "model");
        Directory.CreateDirectory(folder);
        var path = Path.Combine(folder, "mlp.onnx");
        OnnxFile.Save(RewriteTestModels.Mlp(), path, new SaveOptions { ExternalData = ExternalDataMode.Always, ExternalThresholdBytes = 0 });
        var model = ModelProto.Parser.ParseFrom(File.ReadAllBytes(path));
        var t = model.Graph.Initializer.Single(i => i.Name == "fc1.weight");
        t.ExternalData.Single(e => e.Key == "location").Value = location;
        edit?.Invoke(t);
        File.WriteAllBytes(path, model.ToByteArray());
        return path;
    }

    /// <summary>inspect and rewrite both fail with one line naming the model, fc1.weight, the key and <paramref name="reason"/>; nothing is written.</summary>
    static void AssertRefused(TempDir dir, string model, string key, string reason)
    {
        var outDir = dir.File("out");
        foreach (var args in new[] { new[] { "inspect", model }, new[] { "rewrite", model, "--out", outDir, "--targets", "fc1", "--rank", "2" } })
        {
            var run = Task.Run(() => CliRunner.Run(args));
            Assert.That(run.Wait(TimeSpan.FromSeconds(120)), Is.True, $"{args[0]} must not block");
            var (code, _, err) = run.Result;
            Assert.That(code, Is.EqualTo(1), $"{args[0]}: {err}");
            Assert.That(err.TrimEnd().Split('\n'), Has.Length.EqualTo(1), err);
            Assert.That(err, Does.StartWith("error: ").And.Contain(model).And.Contain("'fc1.weight'").And.Contain(key).And.Contain(reason));
        }
        Assert.That(Directory.Exists(outDir), Is.False, "nothing written");
    }

    static byte[] DataFile(string model) => File.ReadAllBytes(model + ".data");

    [Test]
    public void Location_with_dot_dot_is_refused_though_the_file_exists_and_fits()
    {
        using var dir = new TempDir();
        var model = ModelWithExternal(dir, "../secret.bin");
        File.WriteAllBytes(dir.File("secret.bin"), DataFile(model));     // exactly the bytes the tensor wants
        AssertRefused(dir, model, "'location' '../secret.bin'", "climbs out of the model's folder");
    }

    [Test]
    public void Absolute_location_is_refused()
    {
        using var dir = new TempDir();
        AssertRefused(dir, ModelWithExternal(dir, "/etc/passwd"), "'location' '/etc/passwd'", "absolute path");
    }

    [Test]
    public void Symlink_out_of_the_folder_is_refused()
    {
        using var dir = new TempDir();
        var model = ModelWithExternal(dir, "link.bin");
        File.WriteAllBytes(dir.File("secret.bin"), DataFile(model));
        File.CreateSymbolicLink(Path.Combine(dir.Path, "model", "link.bin"), dir.File("secret.bin"));
        AssertRefused(dir, model, "'location' 'link.bin'", "outside the model's folder");
    }

    [Test]
    public void Symlinked_subfolder_pointing_out_is_refused()
    {
        using var dir = new TempDir();
        var model = ModelWithExternal(dir, "sub/secret.bin");
        Directory.CreateDirectory(dir.File("elsewhere"));
        File.WriteAllBytes(Path.Combine(dir.File("elsewhere"), "secret.bin"), DataFile(model));
        Directory.CreateSymbolicLink(Path.Combine(dir.Path, "model", "sub"), dir.File("elsewhere"));
        AssertRefused(dir, model, "'location' 'sub/secret.bin'", "outside the model's folder");
    }

    [Test]
    public void Fifo_location_is_refused_without_blocking()
    {
        using var dir = new TempDir();
        var model = ModelWithExternal(dir, "pipe.bin");
        Assert.That(MakeFifo(Path.Combine(dir.Path, "model", "pipe.bin"), 0x180), Is.Zero, "mkfifo");
        AssertRefused(dir, model, "'location' 'pipe.bin'", "not a regular file");
    }

    [Test]
    public void A_fifo_is_refused_from_its_type_before_any_open()
    {
        using var dir = new TempDir();
        var fifo = dir.File("pipe.bin");
        Assert.That(MakeFifo(fifo, 0x180), Is.Zero, "mkfifo");
        // "refusing to open it" comes from the statx type check; the fallback after a non-blocking open says "read it"
        var e = Assert.Throws<OnnxFormatException>(() => SafeFile.OpenRegular(fifo, why => new OnnxFormatException($"{fifo}: {why}")).Dispose())!;
        Assert.That(e.Message, Is.EqualTo($"{fifo}: is not a regular file (a FIFO, socket or device); refusing to open it"));
    }

    [Test]
    public void Symlink_inside_the_folder_is_followed_and_rewrite_reads_the_right_bytes()
    {
        using var dir = new TempDir();
        var model = ModelWithExternal(dir, "alias.bin");
        File.CreateSymbolicLink(Path.Combine(dir.Path, "model", "alias.bin"), "mlp.onnx.data");   // relative, stays inside
        var (code, _, err) = CliRunner.Run("rewrite", model, "--out", dir.File("out"), "--targets", "fc1", "--rank", "2");
        Assert.That(code, Is.EqualTo(0), err);
        var rewritten = OnnxFile.Load(Path.Combine(dir.File("out"), "model.onnx"));
        var expected = RewriteTestModels.Mlp().Graph.Initializer.Single(t => t.Name == "fc1.weight");
        Assert.That(Tensors.ToFloats(rewritten.Graph.Initializer.Single(t => t.Name == "fc1.weight")), Is.EqualTo(Tensors.ToFloats(expected)));
    }

    [TestCase("-5", "'offset' is '-5', not a non-negative integer")]
    [TestCase("abc", "'offset' is 'abc', not a non-negative integer")]
    [TestCase("1e3", "'offset' is '1e3', not a non-negative integer")]
    [TestCase("1000000", "wants bytes 1000000..1000096")]
    public void Bad_offsets_are_refused(string offset, string reason)
    {
        using var dir = new TempDir();
        var model = ModelWithExternal(dir, "mlp.onnx.data", t => t.ExternalData.Single(e => e.Key == "offset").Value = offset);
        AssertRefused(dir, model, "external_data", reason);
    }

    [Test]
    public void Length_that_disagrees_with_dims_is_refused()
    {
        using var dir = new TempDir();
        var model = ModelWithExternal(dir, "mlp.onnx.data", t => t.ExternalData.Single(e => e.Key == "length").Value = "8");
        AssertRefused(dir, model, "'length' is 8", "dims [4, 6] of Float are 96 bytes");
    }

    [Test]
    public void Dims_whose_byte_count_overflows_are_refused_not_wrapped_to_zero()
    {
        using var dir = new TempDir();
        // 2^62 · 4 elements · 4 bytes wraps to 0 in unchecked int64 arithmetic
        var model = ModelWithExternal(dir, "mlp.onnx.data", t =>
        {
            t.Dims.Clear();
            t.Dims.Add([1L << 62, 4]);
            t.ExternalData.Remove(t.ExternalData.Single(e => e.Key == "length"));
        });
        AssertRefused(dir, model, "external_data", "overflows int64");
    }

    // ---- the validation pass: malformed graphs fail at rewrite with the node or tensor named ----

    static (int Code, string Err, string Model, string Out) Rewrite(TempDir dir, Action<ModelProto> edit)
    {
        var model = RewriteTestModels.Mlp();
        edit(model);
        var path = dir.File("bad.onnx");
        File.WriteAllBytes(path, model.ToByteArray());
        var outDir = dir.File("out");
        var (code, _, err) = CliRunner.Run("rewrite", path, "--out", outDir, "--targets", "fc1", "--rank", "2");
        return (code, err, path, outDir);
    }

    static TensorProto Init(ModelProto m, string name) => m.Graph.Initializer.Single(t => t.Name == name);

    static readonly (string Case, Action<ModelProto> Edit, string[] Expected)[] Malformed =
    [
        ("raw_data shorter than dims", m => Init(m, "fc1.weight").RawData = ByteString.CopyFrom(new byte[12]),
            ["tensor 'fc1.weight' has 12 bytes of raw_data", "dims [4, 6] of Float need 96"]),
        ("dims overflow", m => { var t = Init(m, "fc1.bias"); t.Dims.Clear(); t.Dims.Add([1L << 62, 4]); },
            ["tensor 'fc1.bias'", "product past int64"]),
        ("dangling input", m => m.Graph.Node.Single(n => n.OpType == "Relu").Input[0] = "ghost",
            ["node '/Relu' (Relu) reads 'ghost'", "no node, input or initializer"]),
        ("duplicate output", m => m.Graph.Output.Add(m.Graph.Output[0].Clone()), ["graph output 'y' is listed twice"]),
        ("duplicate initializer", m => m.Graph.Initializer.Add(Tensors.Float("fc1.weight", [4, 6], new float[24])),
            ["initializer 'fc1.weight' is defined twice"]),
        ("integer weight", m => { m.Graph.Initializer.Remove(Init(m, "fc2.weight")); m.Graph.Initializer.Add(Tensors.Int32("fc2.weight", [6, 3], new int[18])); },
            ["node '/fc2/MatMul' (MatMul) multiplies Float", "by Int32 'fc2.weight'"]),
        ("no opset", m => m.OpsetImport.Clear(), ["imports no ai.onnx opset"]),
        ("opset 999", m => m.OpsetImport[0].Version = 999, ["ai.onnx opset 999 is not one ONNX Runtime runs (1..28)"]),
        ("no inputs", m => m.Graph.Input.Clear(), ["the graph has no inputs"]),
        ("unknown op", m => m.Graph.Node.Single(n => n.OpType == "Relu").OpType = "Frobnicate", ["node '/Relu' (Frobnicate): unknown op 'Frobnicate'"]),
        ("unknown domain", m => m.Graph.Node.Single(n => n.OpType == "Relu").Domain = "evil.ops", ["uses domain 'evil.ops'"]),
        ("typed data count", m => { var t = Init(m, "fc1.bias"); t.ClearRawData(); t.FloatData.Add(1f); }, ["tensor 'fc1.bias' holds 1 values, dims [6] need 6"]),
    ];

    static IEnumerable<TestCaseData> MalformedCases() => Malformed.Select(c => new TestCaseData(c.Case).SetName($"Rewrite_refuses_{c.Case.Replace(' ', '_')}"));

    [TestCaseSource(nameof(MalformedCases))]
    public void Rewrite_refuses_malformed_graphs_with_the_node_or_tensor_named(string name)
    {
        var c = Malformed.Single(x => x.Case == name);
        using var dir = new TempDir();
        var (code, err, model, outDir) = Rewrite(dir, c.Edit);
        Assert.That(code, Is.EqualTo(1), err);
        Assert.That(err.TrimEnd().Split('\n'), Has.Length.EqualTo(1), err);
        Assert.That(err, Does.StartWith($"error: {model}: "));
        foreach (var part in c.Expected) Assert.That(err, Does.Contain(part));
        Assert.That(Directory.Exists(outDir), Is.False, "nothing written");
    }

    [Test]
    public void Merge_refuses_a_rewrite_whose_model_has_a_duplicate_initializer_instead_of_dropping_the_adapter()
    {
        using var dir = new TempDir();
        var basePath = dir.File("mlp.onnx");
        OnnxFile.Save(RewriteTestModels.Mlp(), basePath);
        var rw = dir.File("rw");
        Assert.That(CliRunner.Run("rewrite", basePath, "--out", rw, "--targets", "fc1", "--rank", "2").Code, Is.EqualTo(0));
        var manifest = OnnxLora.GraphRewrite.Lora.LoraManifest.Load(Path.Combine(rw, "lora_config.json"));
        var adapterPath = dir.File("a.onnx_adapter");
        OnnxLora.Pipeline.Adapters.OnnxAdapterFile.Write(adapterPath, OnnxLora.Pipeline.Adapters.LoraAdapter.CreateRandom(manifest, 4));
        var view = Path.Combine(rw, "model.onnx");
        var model = ModelProto.Parser.ParseFrom(File.ReadAllBytes(view));
        model.Graph.Initializer.Add(Init(model, "fc1.weight").Clone());
        File.WriteAllBytes(view, model.ToByteArray());

        var (code, _, err) = CliRunner.Run("merge", "--model", rw, "--adapter", adapterPath, "--out", dir.File("merged.onnx"));
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err.Trim(), Is.EqualTo($"error: {view}: initializer 'fc1.weight' is defined twice"));
        Assert.That(File.Exists(dir.File("merged.onnx")), Is.False);
    }

    [Test]
    public void Max_opset_is_the_newest_that_onnx_runtime_loads()
    {
        byte[] At(long opset)
        {
            var m = RewriteTestModels.Mlp();
            m.IrVersion = 10;
            m.OpsetImport[0].Version = opset;
            return m.ToByteArray();
        }
        using (new InferenceSession(At(ModelValidator.MaxOpset))) { }
        Assert.Throws<OnnxRuntimeException>(() => new InferenceSession(At(ModelValidator.MaxOpset + 1)).Dispose());
    }

    [LibraryImport("libc", EntryPoint = "mkfifo", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int MakeFifo(string path, uint mode);
}
