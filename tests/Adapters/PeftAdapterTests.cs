using System.Text;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Tests.Deployment;

namespace OnnxLora.Tests.Adapters;

public class PeftAdapterTests
{
    static JsonObject Config(string dir) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, PeftAdapter.ConfigFile)))!.AsObject();

    [Test]
    public void Written_adapter_reads_back_with_the_same_tensors()
    {
        using var dir = new TempDir();
        var manifest = TinyDeployable.Manifest();
        var head = new Dictionary<string, AdapterTensor> { ["cls_head.weight"] = new([TinyDeployable.Out, 2], [1, 2, 3, 4, 5, 6, 7, 8]) };
        var adapter = LoraAdapter.Create(manifest, LoraAdapter.CreateRandom(manifest, 7).LoraTensors, head);
        PeftAdapter.Write(dir.Path, adapter, new PeftExportOptions { BaseModelNameOrPath = "gpt2" });

        var back = PeftAdapter.Read(dir.Path, manifest);
        foreach (var t in manifest.Targets)
        {
            Assert.That(back.A(t).Data, Is.EqualTo(adapter.A(t).Data));
            Assert.That(back.B(t).Data, Is.EqualTo(adapter.B(t).Data).Within(1e-6));
        }
        Assert.That(back.Extras.Keys, Is.EqualTo(new[] { "cls_head.weight" }));
        Assert.That(back.Extras["cls_head.weight"].Data, Is.EqualTo(head["cls_head.weight"].Data));
        // PEFT's name and layout for a sequence-classification head: score.weight [classes, d], listed in modules_to_save
        var (raw, _) = OnnxLora.Models.SafeTensorsFile.Read(Path.Combine(dir.Path, PeftAdapter.WeightsFile));
        Assert.That(raw["base_model.model.score.weight"].Shape, Is.EqualTo(new long[] { 2, TinyDeployable.Out }));
        Assert.That(raw["base_model.model.score.weight"].ToFloats(), Is.EqualTo(head["cls_head.weight"].Transpose2D().Data));

        var config = Config(dir.Path);
        Assert.That(config["peft_type"]!.GetValue<string>(), Is.EqualTo("LORA"));
        Assert.That(config["task_type"]!.GetValue<string>(), Is.EqualTo("SEQ_CLS"));
        Assert.That(config["r"]!.GetValue<int>(), Is.EqualTo(TinyDeployable.Rank));
        Assert.That(config["lora_alpha"]!.GetValue<double>(), Is.EqualTo(TinyDeployable.Alpha));
        Assert.That(config["use_rslora"]!.GetValue<bool>(), Is.False);
        Assert.That(config["fan_in_fan_out"]!.GetValue<bool>(), Is.True, "GPT-2 Conv1D modules");
        Assert.That(config["bias"]!.GetValue<string>(), Is.EqualTo("none"));
        Assert.That(config["base_model_name_or_path"]!.GetValue<string>(), Is.EqualTo("gpt2"));
        Assert.That(config["target_modules"]!.AsArray().Select(n => n!.GetValue<string>()), Is.EqualTo(new[] { "c_fc", "c_proj" }));
        Assert.That(config["modules_to_save"]!.AsArray().Select(n => n!.GetValue<string>()), Is.EqualTo(new[] { "score" }));
    }

    [Test]
    public void A_head_in_peft_models_to_save_state_dict_form_reads_as_the_classifier_head_with_its_labels()
    {
        using var dir = new TempDir();
        var manifest = TinyDeployable.Manifest();
        var adapter = LoraAdapter.Create(manifest, LoraAdapter.CreateRandom(manifest, 3).LoraTensors,
            new Dictionary<string, AdapterTensor> { ["cls_head.weight"] = new([TinyDeployable.Out, 2], [1, 2, 3, 4, 5, 6, 7, 8]) }, "test",
            new OnnxLora.GraphRewrite.Artifacts.ClassifierInfo { Classes = 2, Pooling = OnnxLora.GraphRewrite.Artifacts.Pooling.Mean, Labels = ["ham", "spam"] });
        PeftAdapter.Write(dir.Path, adapter);
        // what a PEFT model's state_dict holds before save strips the adapter name: score.modules_to_save.default.weight
        var path = Path.Combine(dir.Path, PeftAdapter.WeightsFile);
        var (tensors, metadata) = OnnxLora.Models.SafeTensorsFile.Read(path);
        var renamed = tensors.Select(kv => KeyValuePair.Create(kv.Key == "base_model.model.score.weight" ? "base_model.model.score.modules_to_save.default.weight" : kv.Key, kv.Value)).ToList();
        Assert.That(renamed.Select(kv => kv.Key), Does.Contain("base_model.model.score.modules_to_save.default.weight"));
        OnnxLora.Models.SafeTensorsFile.Write(path, renamed, metadata);

        var back = PeftAdapter.Read(dir.Path, manifest);
        Assert.That(back.Head!.Shape, Is.EqualTo(new long[] { TinyDeployable.Out, 2 }));
        Assert.That(back.Head.Data, Is.EqualTo(new float[] { 1, 2, 3, 4, 5, 6, 7, 8 }));
        Assert.That(back.Classifier!.Labels, Is.EqualTo(new[] { "ham", "spam" }));
        Assert.That(back.Classifier.Pooling, Is.EqualTo(OnnxLora.GraphRewrite.Artifacts.Pooling.Mean));
    }

    [Test]
    public void Safetensors_header_is_valid_json_with_peft_names_transposed_shapes_and_contiguous_offsets()
    {
        using var dir = new TempDir();
        var manifest = TinyDeployable.Manifest();
        var adapter = LoraAdapter.CreateRandom(manifest, 8);
        PeftAdapter.Write(dir.Path, adapter);
        var bytes = File.ReadAllBytes(Path.Combine(dir.Path, PeftAdapter.WeightsFile));
        long n = BitConverter.ToInt64(bytes, 0);
        Assert.That((8 + n) % 8, Is.Zero, "data starts 8-byte aligned");
        var header = JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, (int)n))!.AsObject();
        long dataStart = 8 + n, expectedBegin = 0;
        foreach (var t in manifest.Targets)
        {
            foreach (var (suffix, shape, values) in new[]
            {
                ("lora_A.weight", new long[] { t.Rank, t.In }, adapter.A(t).Transpose2D().Data),
                ("lora_B.weight", new long[] { t.Out, t.Rank }, adapter.B(t).Transpose2D().Data),
            })
            {
                var entry = header[$"base_model.model.{t.Module}.{suffix}"]!.AsObject();
                Assert.That(entry["dtype"]!.GetValue<string>(), Is.EqualTo("F32"));
                Assert.That(entry["shape"]!.AsArray().Select(d => d!.GetValue<long>()), Is.EqualTo(shape));
                var offsets = entry["data_offsets"]!.AsArray().Select(d => d!.GetValue<long>()).ToArray();
                Assert.That(offsets[0], Is.EqualTo(expectedBegin));
                Assert.That(offsets[1] - offsets[0], Is.EqualTo(shape[0] * shape[1] * 4));
                var stored = new float[values.Length];
                Buffer.BlockCopy(bytes, (int)(dataStart + offsets[0]), stored, 0, values.Length * 4);
                Assert.That(stored, Is.EqualTo(values));
                expectedBegin = offsets[1];
            }
        }
        Assert.That(dataStart + expectedBegin, Is.EqualTo(bytes.LongLength));
        Assert.That(header["__metadata__"]!["format"]!.GetValue<string>(), Is.EqualTo("pt"));
    }

    /// <summary>
    /// A safetensors file built byte by byte from the format's spec, not by our writer: keys out of order, metadata last,
    /// no padding, one F16 tensor and PEFT's adapter-name infix. The reader must take it as PEFT would.
    /// </summary>
    [Test]
    public void Reads_a_file_from_an_independent_writer()
    {
        using var dir = new TempDir();
        var manifest = TinyDeployable.Manifest();
        var t0 = manifest.Targets[0];
        var t1 = manifest.Targets[1];
        var rng = new Random(9);
        float[] Values(long count) => Enumerable.Range(0, (int)count).Select(_ => (float)Math.Round(rng.NextDouble() - 0.5, 3)).ToArray();
        var a0 = Values(t0.Rank * t0.In); var b0 = Values(t0.Out * t0.Rank); var a1 = Values(t1.Rank * t1.In); var b1 = Values(t1.Out * t1.Rank);
        var data = new List<byte>();
        var entries = new List<string>();
        void Add(string key, long[] shape, float[] values, bool half)
        {
            var raw = half ? values.SelectMany(v => BitConverter.GetBytes((Half)v)).ToArray() : values.SelectMany(BitConverter.GetBytes).ToArray();
            entries.Add($"\"{key}\":{{\"dtype\":\"{(half ? "F16" : "F32")}\",\"shape\":[{string.Join(",", shape)}],\"data_offsets\":[{data.Count},{data.Count + raw.Length}]}}");
            data.AddRange(raw);
        }
        Add($"base_model.model.{t1.Module}.lora_B.weight", [t1.Out, t1.Rank], b1, half: false);
        Add($"base_model.model.{t0.Module}.lora_A.weight", [t0.Rank, t0.In], a0, half: true);
        Add($"base_model.model.{t1.Module}.lora_A.default.weight", [t1.Rank, t1.In], a1, half: false);
        Add($"base_model.model.{t0.Module}.lora_B.weight", [t0.Out, t0.Rank], b0, half: false);
        var header = Encoding.UTF8.GetBytes("{" + string.Join(",", entries) + ",\"__metadata__\":{\"format\":\"pt\"}}");
        using (var f = File.Create(Path.Combine(dir.Path, PeftAdapter.WeightsFile)))
        {
            f.Write(BitConverter.GetBytes((long)header.Length));
            f.Write(header);
            f.Write(data.ToArray());
        }
        // lora_alpha 12 with r 3 → scale 4, where the manifest's scale is 6/3 = 2: B must double
        File.WriteAllText(Path.Combine(dir.Path, PeftAdapter.ConfigFile), """{"peft_type": "LORA", "r": 3, "lora_alpha": 12, "target_modules": ["c_fc", "c_proj"]}""");

        var adapter = PeftAdapter.Read(dir.Path, manifest);
        Assert.That(adapter.A(t0).Data, Is.EqualTo(new AdapterTensor([t0.Rank, t0.In], a0).Transpose2D().Data).Within(1e-3));
        Assert.That(adapter.A(t1).Data, Is.EqualTo(new AdapterTensor([t1.Rank, t1.In], a1).Transpose2D().Data));
        Assert.That(adapter.B(t0).Data, Is.EqualTo(new AdapterTensor([t0.Out, t0.Rank], b0).Transpose2D().Data.Select(v => v * 2)).Within(1e-6));
        Assert.That(adapter.B(t1).Data, Is.EqualTo(new AdapterTensor([t1.Out, t1.Rank], b1).Transpose2D().Data.Select(v => v * 2)).Within(1e-6));
        // and our own SafeTensorsFile reads the same bytes
        var (tensors, metadata) = SafeTensorsFile.Read(Path.Combine(dir.Path, PeftAdapter.WeightsFile));
        Assert.That(tensors, Has.Count.EqualTo(4));
        Assert.That(metadata["format"], Is.EqualTo("pt"));
    }

    /// <summary>The fixtures helper's file, written by an independent Python writer from the spec (mixed dtypes, metadata, unaligned data).</summary>
    [Test]
    public void Reads_the_independent_fixture_file()
    {
        var dir = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "safetensors");
        var expected = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "independent.json")))!;
        var (tensors, metadata) = SafeTensorsFile.Read(Path.Combine(dir, "independent.safetensors"));
        foreach (var (k, v) in expected["metadata"]!.AsObject()) Assert.That(metadata[k], Is.EqualTo(v!.GetValue<string>()));
        var entries = expected["tensors"]!.AsArray();
        Assert.That(tensors.Keys, Is.EquivalentTo(entries.Select(e => e!["name"]!.GetValue<string>())));
        foreach (var e in entries)
        {
            var t = tensors[e!["name"]!.GetValue<string>()];
            Assert.That(t.DType, Is.EqualTo(e["dtype"]!.GetValue<string>()));
            Assert.That(t.Shape, Is.EqualTo(e["shape"]!.AsArray().Select(d => d!.GetValue<long>())));
            if (t.DType is "F32" or "F16" or "BF16" or "F64")
                Assert.That(t.ToFloats(), Is.EqualTo(e["values"]!.AsArray().Select(v => (float)v!.GetValue<double>())), t.DType);
        }
    }

    [TestCase(LoraScaling.Peft)]
    [TestCase(LoraScaling.RsLora)]
    [TestCase(LoraScaling.Alpha)]
    public void Every_scaling_round_trips_to_the_same_effective_delta(LoraScaling scaling)
    {
        using var dir = new TempDir();
        var manifest = TinyDeployable.Manifest(scaling);
        var adapter = LoraAdapter.CreateRandom(manifest, 10);
        PeftAdapter.Write(dir.Path, adapter);
        var config = Config(dir.Path);
        Assert.That(config["use_rslora"]!.GetValue<bool>(), Is.EqualTo(scaling == LoraScaling.RsLora));
        // PEFT's scale from the written config equals ours
        double r = config["r"]!.GetValue<double>(), alpha = config["lora_alpha"]!.GetValue<double>();
        double peftScale = scaling == LoraScaling.RsLora ? alpha / Math.Sqrt(r) : alpha / r;
        Assert.That(peftScale, Is.EqualTo(manifest.Targets[0].Scale).Within(1e-12));
        // imported into a manifest with another alpha, B is rescaled so that scale·A·B is unchanged
        var other = manifest with { Targets = manifest.Targets.Select(t => t with { Scale = t.Scale * 0.25 }).ToList() };
        var back = PeftAdapter.Read(dir.Path, other);
        Assert.That(back.B(other.Targets[1]).Data, Is.EqualTo(adapter.B(manifest.Targets[1]).Data.Select(v => v * 4)).Within(1e-5));
    }

    [Test]
    public void Modules_and_shapes_that_do_not_fit_the_manifest_are_named()
    {
        using var dir = new TempDir();
        var manifest = TinyDeployable.Manifest();
        PeftAdapter.Write(dir.Path, LoraAdapter.CreateRandom(manifest, 12));
        var fewer = manifest with { Targets = [manifest.Targets[0]] };
        var e = Assert.Throws<InvalidDataException>(() => PeftAdapter.Read(dir.Path, fewer))!;
        Assert.That(e.Message, Does.Contain("base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight").And.Contain("do not belong"));

        var otherRank = manifest with { Targets = manifest.Targets.Select(t => t with { Rank = 2 }).ToList() };
        e = Assert.Throws<InvalidDataException>(() => PeftAdapter.Read(dir.Path, otherRank))!;
        Assert.That(e.Message, Does.Contain("lora_").And.Contain("r = 2"));

        var more = manifest with { Targets = [.. manifest.Targets, manifest.Targets[0] with { Module = "transformer.h.1.mlp.c_fc", LoraA = "a2", LoraB = "b2" }] };
        e = Assert.Throws<InvalidDataException>(() => PeftAdapter.Read(dir.Path, more))!;
        Assert.That(e.Message, Does.Contain("missing tensor 'a2'").And.Contain("transformer.h.1.mlp.c_fc"));

        File.Delete(Path.Combine(dir.Path, PeftAdapter.ConfigFile));
        Assert.That(Assert.Throws<FileNotFoundException>(() => PeftAdapter.Read(dir.Path, manifest))!.Message, Does.Contain("lora_alpha"));
    }
}
