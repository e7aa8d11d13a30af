using OnnxLora.GraphRewrite.Artifacts;
using System.Text;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Runner;

namespace OnnxLora.Fuzz;

/// <summary>
/// The readers that take files from strangers, one fuzz target each: the bytes become the file the reader opens
/// (inside <c>folder</c>, a scratch folder the caller owns), and the reader either succeeds or throws its documented
/// error type. Anything else (a NullReferenceException, IndexOutOfRange, OverflowException, …) is a crash. The
/// afl++ harness (<see cref="Program"/>) and the in-process smoke test run the same targets.
/// </summary>
public static class FuzzTargets
{
    /// <summary>
    /// A two-target manifest (6 → 5 → 4, rank 3) that the adapter targets load against. Built on first use: under afl,
    /// instrumented code must not run before SharpFuzz has attached its coverage map.
    /// </summary>
    public static LoraManifest Manifest => LazyManifest.Value;

    static readonly Lazy<LoraManifest> LazyManifest = new(() => new LoraManifest
    {
        ToolVersion = "fuzz", BaseModel = "base.onnx", BaseModelSha256 = "", Rank = 3, Alpha = 6, Scaling = LoraScaling.Peft,
        Targets = [Target("transformer.h.0.mlp.c_fc", 6, 5), Target("transformer.h.0.mlp.c_proj", 5, 4)],
    });

    /// <summary>Reader name → target. The name is the harness's argument and the corpus folder under tests/fixtures/fuzz.</summary>
    public static readonly IReadOnlyDictionary<string, Action<byte[], string>> Readers = new Dictionary<string, Action<byte[], string>>
    {
        // OnnxFile.Load with external data (a regular 4 KiB file 'weights.bin' sits beside it), then the checks rewrite runs
        ["onnx"] = (bytes, folder) =>
        {
            var path = Write(folder, "model.onnx", bytes);
            EnsureFile(Path.Combine(folder, "weights.bin"), () => Enumerable.Repeat((byte)0x3F, 4096).ToArray());
            var model = OnnxFile.Load(path);
            ModelValidator.Check(model, path);
            LinearLayers.Discover(model);
        },
        ["safetensors"] = (bytes, folder) =>
        {
            var path = Write(folder, "model.safetensors", bytes);
            // Hugging Face's config.json beside the weights gives the head count, so import goes past the shape checks
            EnsureFile(Path.Combine(folder, "config.json"), () => Encoding.UTF8.GetBytes("{\"n_head\": 2, \"layer_norm_epsilon\": 1e-5}"));
            var (tensors, _) = SafeTensorsFile.Read(path);
            foreach (var t in tensors.Values.Where(t => t.DType is "F32" or "F16" or "BF16" or "F64")) t.ToFloats();
            GptWeights.FromSafeTensors(path);
        },
        ["onnx_adapter"] = (bytes, folder) => OnnxAdapterFile.Load(Write(folder, "a.onnx_adapter", bytes), Manifest),
        // adapter_config.json is fuzzed; the weights beside it are a valid adapter of Manifest
        ["peft"] = (bytes, folder) =>
        {
            var dir = Path.Combine(folder, "peft");
            EnsureFile(Path.Combine(dir, PeftAdapter.WeightsFile), () =>
            {
                PeftAdapter.Write(dir, LoraAdapter.CreateRandom(Manifest, 1));
                return File.ReadAllBytes(Path.Combine(dir, PeftAdapter.WeightsFile));
            });
            Write(dir, PeftAdapter.ConfigFile, bytes);
            PeftAdapter.Read(dir, Manifest);
        },
        ["jsonl"] = (bytes, folder) => Dataset(Write(folder, "d.jsonl", bytes), DataFormat.Jsonl, TrainingTask.Lm),
        ["tokens"] = (bytes, folder) => Dataset(Write(folder, "t.jsonl", bytes), DataFormat.Tokens, TrainingTask.Cls),
        ["tsv"] = (bytes, folder) => Dataset(Write(folder, "d.tsv", bytes), DataFormat.Tsv, TrainingTask.Cls),
        ["yaml"] = (bytes, folder) => PipelineConfig.Load(Write(folder, "config.yaml", bytes)),
    };

    /// <summary>Whether <paramref name="e"/> is the error <paramref name="reader"/> documents for bad input.</summary>
    public static bool IsDocumented(string reader, Exception e) => reader == "onnx" ? e is OnnxFormatException : e is InvalidDataException;

    static void Dataset(string path, DataFormat format, TrainingTask task) =>
        DatasetLoader.Load(path, new DatasetOptions { Format = format, Task = task, SeqLength = 64, VocabSize = 50257, ClassCount = 4 });

    static string Write(string folder, string name, byte[] bytes)
    {
        Directory.CreateDirectory(folder);
        var path = Path.Combine(folder, name);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    static void EnsureFile(string path, Func<byte[]> contents)
    {
        if (File.Exists(path)) return;
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        var bytes = contents();
        if (!File.Exists(path)) File.WriteAllBytes(path, bytes);
    }

    static LoraTarget Target(string module, long inDim, long outDim) => new()
    {
        Module = module, Nodes = [module + "/MatMul"], Weight = module + ".weight", In = inDim, Out = outDim, Rank = 3, Alpha = 6,
        Scale = LoraManifest.ScaleFor(LoraScaling.Peft, 6, 3), LoraA = $"lora_A.{module}", LoraB = $"lora_B.{module}",
    };
}
