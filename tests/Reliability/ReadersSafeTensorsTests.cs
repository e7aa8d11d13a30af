using System.Text;
using OnnxLora.Models;

namespace OnnxLora.Tests.Reliability;

/// <summary>
/// Hostile safetensors files: every header fault gets an <see cref="InvalidDataException"/> naming the file and the
/// key, before any tensor is allocated; GPT-2 import bounds block indices by what the file holds.
/// </summary>
[NonParallelizable]
public class ReadersSafeTensorsTests
{
    /// <summary>A safetensors file with this header text and <paramref name="dataBytes"/> bytes of data (1.0f values).</summary>
    static string Write(TempDir dir, string header, int dataBytes = 16, long? headerLength = null)
    {
        var path = dir.File("w.safetensors");
        var h = Encoding.UTF8.GetBytes(header);
        using var f = File.Create(path);
        f.Write(BitConverter.GetBytes(headerLength ?? h.Length));
        f.Write(h);
        for (int i = 0; i < dataBytes / 4; i++) f.Write(BitConverter.GetBytes(1f));
        return path;
    }

    static readonly (string Case, string Header, long? HeaderLength, string[] Expected)[] Bad =
    [
        ("header is an array", "[1,2]", null, ["safetensors header is an array, expected a JSON object"]),
        ("header is null", "null", null, ["safetensors header is null, expected a JSON object"]),
        ("not json", "{\"w\":", null, ["safetensors header is not valid JSON"]),
        ("missing shape", """{"w":{"dtype":"F32","data_offsets":[0,16]}}""", null, ["tensor 'w' field 'shape' is missing or not an array"]),
        ("missing dtype", """{"w":{"shape":[4],"data_offsets":[0,16]}}""", null, ["tensor 'w' field 'dtype' is missing or not a string"]),
        ("missing offsets", """{"w":{"dtype":"F32","shape":[4]}}""", null, ["tensor 'w' field 'data_offsets' is missing"]),
        ("entry not an object", """{"w":[1]}""", null, ["tensor 'w' is an array, expected an object"]),
        ("duplicate key", """{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}""", null, ["key 'w' twice"]),
        ("dims 2^40", """{"w":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,16]}}""", null, ["tensor 'w' (F32 [1099511627776])", "needs 4398046511104 bytes inside the 16-byte data section"]),
        ("dims overflow", """{"w":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,0]}}""", null, ["tensor 'w' has shape [1099511627776,1099511627776], whose F32 byte count overflows int64"]),
        ("negative dim", """{"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}""", null, ["tensor 'w' field 'shape' holds -4, expected a non-negative integer"]),
        ("string dim", """{"w":{"dtype":"F32","shape":["4"],"data_offsets":[0,16]}}""", null, ["tensor 'w' field 'shape' holds \"4\""]),
        ("fractional offset", """{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16.5]}}""", null, ["tensor 'w' field 'data_offsets' holds 16.5"]),
        ("three offsets", """{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16,32]}}""", null, ["tensor 'w' field 'data_offsets' has 3 entries, expected 2"]),
        ("offsets outside", """{"w":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}}""", null, ["tensor 'w' (F32 [250]) has data_offsets [0,1000]", "16-byte data section"]),
        ("overlap", """{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""", null, ["tensors 'a' [0,8) and 'b' [4,12) overlap"]),
        ("unknown dtype", """{"w":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}}""", null, ["tensor 'w' has unknown dtype 'Q4'"]),
        ("metadata not strings", """{"__metadata__":{"format":1}}""", null, ["'__metadata__.format' is a number, expected a string"]),
        ("header length beyond file", "{}", 1_000_000, ["not a safetensors file (header length 1000000"]),
        ("negative header length", "{}", -8, ["header length -8"]),
    ];

    static IEnumerable<TestCaseData> BadCases() => Bad.Select(c => new TestCaseData(c.Case).SetName($"Safetensors_refuses_{c.Case.Replace(' ', '_').Replace('^', '_')}"));

    [TestCaseSource(nameof(BadCases))]
    public void Header_faults_are_one_line_errors_naming_file_and_key(string name)
    {
        var c = Bad.Single(x => x.Case == name);
        using var dir = new TempDir();
        var path = Write(dir, c.Header, headerLength: c.HeaderLength);
        var e = Assert.Throws<InvalidDataException>(() => SafeTensorsFile.Read(path))!;
        Assert.That(e.Message, Does.StartWith(path + ": ").And.Not.Contain("\n"));
        foreach (var part in c.Expected) Assert.That(e.Message, Does.Contain(part));
    }

    [Test]
    public void A_valid_file_with_offsets_out_of_order_reads_its_values()
    {
        using var dir = new TempDir();
        var path = Write(dir, """{"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}""");
        var (tensors, metadata) = SafeTensorsFile.Read(path);
        Assert.That(tensors["a"].Shape, Is.EqualTo(new long[] { 1, 2 }));
        Assert.That(tensors["b"].ToFloats(), Is.EqualTo(new[] { 1f, 1f }));
        Assert.That(metadata["format"], Is.EqualTo("pt"));
    }

    [Test]
    public void Gpt2_import_refuses_a_block_index_beyond_the_file_before_sizing_a_model()
    {
        using var dir = new TempDir();
        var path = dir.File("model.safetensors");
        SafeTensorsFile.Write(path, new Dictionary<string, SafeTensor>
        {
            ["wte.weight"] = SafeTensor.FromFloats([8, 4], new float[32]),
            ["wpe.weight"] = SafeTensor.FromFloats([8, 4], new float[32]),
            ["h.2000000000.ln_1.weight"] = SafeTensor.FromFloats([4], new float[4]),
        });
        var (code, _, err) = CliRunner.Run("model", "build", "--weights", path, "--out", dir.File("m.onnx"));
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.StartWith($"error: {path}: tensor 'h.2000000000.ln_1.weight' names block 2000000000, but the file holds only 3 tensors"));
        Assert.That(File.Exists(dir.File("m.onnx")), Is.False);
    }

    [Test]
    public void Gpt2_import_refuses_a_gap_in_block_indices()
    {
        using var dir = new TempDir();
        var path = dir.File("model.safetensors");
        var tensors = new Dictionary<string, SafeTensor>
        {
            ["wte.weight"] = SafeTensor.FromFloats([8, 4], new float[32]),
            ["wpe.weight"] = SafeTensor.FromFloats([8, 4], new float[32]),
            ["h.0.ln_1.weight"] = SafeTensor.FromFloats([4], new float[4]),
            ["h.2.ln_1.weight"] = SafeTensor.FromFloats([4], new float[4]),
        };
        SafeTensorsFile.Write(path, tensors);
        var e = Assert.Throws<InvalidDataException>(() => GptWeights.FromSafeTensors(path))!;
        Assert.That(e.Message, Does.StartWith(path).And.Contain("block 1 is missing (the file has up to 'h.2')"));
    }

    [Test]
    public void A_weight_of_dims_2_26_by_96_in_a_200_KB_file_is_refused_before_allocation()
    {
        using var dir = new TempDir();
        // claims 25.8 GB; the file holds 200 KB: the header check fails before any buffer is sized from the claim
        var header = """{"wte.weight":{"dtype":"F32","shape":[67108864,96],"data_offsets":[0,25769803776]}}""";
        var path = Write(dir, header, dataBytes: 200_000);
        var before = GC.GetTotalAllocatedBytes(precise: true);
        var (code, _, err) = CliRunner.Run("model", "build", "--weights", path, "--out", dir.File("m.onnx"));
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.StartWith($"error: {path}: tensor 'wte.weight' (F32 [67108864,96]) has data_offsets [0,25769803776]; it needs 25769803776 bytes inside the 200000-byte data section"));
        Assert.That(allocated, Is.LessThan(100_000_000), "nothing near the claimed size was allocated");
    }
}
