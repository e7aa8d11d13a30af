using System.Text;
using Google.Protobuf;
using System.Text.Json.Nodes;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Runner;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Fuzz;

/// <summary>
/// Writes the seed corpus (tests/fixtures/fuzz/READER/*) with the project's own writers, small so afl mutates fast:
/// <c>OnnxLora.Fuzz --write-seeds tests/fixtures/fuzz</c>. Crashers found later are added beside them by hand.
/// </summary>
static class Seeds
{
    public static int Write(string root)
    {
        Save(root, "onnx", "mlp.onnx", Mlp(external: false).ToByteArray());
        Save(root, "onnx", "mlp-external.onnx", Mlp(external: true).ToByteArray());

        var tmp = Directory.CreateTempSubdirectory("onnxlora-seeds-").FullName;
        try
        {
            var gpt = GptWeights.Random(new GptConfig(VocabSize: 16, ContextLength: 8, EmbedDim: 8, Heads: 2, Layers: 1), seed: 1);
            gpt.SaveSafeTensors(Path.Combine(tmp, "gpt.safetensors"));
            Save(root, "safetensors", "gpt-1-layer.safetensors", File.ReadAllBytes(Path.Combine(tmp, "gpt.safetensors")));
            SafeTensorsFile.Write(Path.Combine(tmp, "two.safetensors"), new Dictionary<string, SafeTensor>
            {
                ["a"] = SafeTensor.FromFloats([2, 2], [1, 2, 3, 4]),
                ["b"] = new SafeTensor("I64", [2], new byte[16]),
            }, new Dictionary<string, string> { ["format"] = "pt" });
            Save(root, "safetensors", "two.safetensors", File.ReadAllBytes(Path.Combine(tmp, "two.safetensors")));

            var adapter = LoraAdapter.CreateRandom(FuzzTargets.Manifest, 2);
            Save(root, "onnx_adapter", "tiny.onnx_adapter", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(adapter)));
            Save(root, "onnx_adapter", "tiny-f16.onnx_adapter", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(adapter, DataType.Float16)));

            PeftAdapter.Write(Path.Combine(tmp, "peft"), adapter);
            var config = File.ReadAllText(Path.Combine(tmp, "peft", PeftAdapter.ConfigFile));
            Save(root, "peft", "adapter_config.json", Encoding.UTF8.GetBytes(config));
            var patterned = JsonNode.Parse(config)!.AsObject();
            patterned["use_rslora"] = true;
            patterned["rank_pattern"] = new JsonObject { ["c_fc"] = 3, ["h\\.0\\..*proj"] = 3 };
            patterned["alpha_pattern"] = new JsonObject { ["c_fc|c_proj"] = 12.5 };
            Save(root, "peft", "patterns.json", Encoding.UTF8.GetBytes(patterned.ToJsonString()));
        }
        finally { Directory.Delete(tmp, recursive: true); }

        Save(root, "jsonl", "mixed.jsonl", Encoding.UTF8.GetBytes(
            "{\"prompt\":\"Q: 2+2?\\nA:\",\"completion\":\" 4\"}\n{\"text\":\"café ☕ naïve\"}\n\n{\"prompt\":\"x\",\"completion\":\"\"}\n"));
        Save(root, "tokens", "cls.jsonl", Encoding.UTF8.GetBytes(
            "{\"input_ids\":[1,2,3],\"label\":1}\n{\"input_ids\":[50256,0],\"labels\":[-100,5],\"label\":0}\n"));
        Save(root, "tsv", "labels.tsv", Encoding.UTF8.GetBytes("pos\tThe food was great.\nneg\tThe service was cold.\r\npos\tnaïve café\n"));
        Save(root, "yaml", "default.yaml", Encoding.UTF8.GetBytes(DemoData.DefaultConfig));
        Save(root, "yaml", "anchors.yaml", Encoding.UTF8.GetBytes(
            "run_dir: &d runs/x\nlora:\n  targets: [c_attn, c_proj]\n  rank: 4\ntrain: {lr: 1e-4, epochs: 2, seed: *d}\n"));
        return 0;
    }

    static void Save(string root, string reader, string name, byte[] bytes)
    {
        var dir = Path.Combine(root, reader);
        Directory.CreateDirectory(dir);
        File.WriteAllBytes(Path.Combine(dir, name), bytes);
        Console.WriteLine($"{reader}/{name}: {bytes.Length} bytes");
    }

    /// <summary>x [batch, 4] → MatMul fc1 [4, 6] → Relu → MatMul fc2 [6, 3] → y; fc1 optionally in weights.bin (the harness's 4 KiB file).</summary>
    static ModelProto Mlp(bool external)
    {
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "seed" }, ProducerName = "fuzz-seed" };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, "batch", 4));
        var fc1 = Tensors.Float("fc1.weight", [4, 6], Enumerable.Range(0, 24).Select(i => i / 24f).ToArray());
        if (external)
        {
            fc1.ClearRawData();
            fc1.DataLocation = TensorProto.Types.DataLocation.External;
            fc1.ExternalData.Add(new StringStringEntryProto { Key = "location", Value = "weights.bin" });
            fc1.ExternalData.Add(new StringStringEntryProto { Key = "offset", Value = "0" });
            fc1.ExternalData.Add(new StringStringEntryProto { Key = "length", Value = "96" });
        }
        g.AddInitializer(fc1);
        g.AddInitializer(Tensors.Float("fc2.weight", [6, 3], Enumerable.Range(0, 18).Select(i => -i / 18f).ToArray()));
        g.AddNode("MatMul", ["x", "fc1.weight"], ["h"], "/fc1/MatMul");
        g.AddNode("Relu", ["h"], ["r"], "/Relu");
        g.AddNode("MatMul", ["r", "fc2.weight"], ["y"], "/fc2/MatMul");
        g.AddOutput(ValueInfos.Tensor("y", DataType.Float, "batch", 3));
        return model;
    }
}
