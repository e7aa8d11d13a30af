using System.Reflection;
using System.Text.Json;
using System.Text.Json.Serialization;
using OnnxLora.Models;

namespace OnnxLora.Tools.Bench;

/// <summary>
/// The benchmark workload, defined once in bench/peers/workload.json and read by every contestant: OnnxLora (this
/// tool embeds a copy; <c>--peers DIR</c> or <c>--workload FILE</c> reads the file itself), torch_peer.py and the
/// TorchSharp peer. Model shapes per preset, LoRA rank and alpha, AdamW hyperparameters, seed, default shapes.
/// </summary>
public sealed record Workload(
    IReadOnlyDictionary<string, Workload.PresetDims> Presets, Workload.ModelSpec Model, Workload.LoraSpec Lora,
    Workload.OptimizerSpec Optimizer, int Seed, IReadOnlyDictionary<string, Workload.Shape> Shapes)
{
    public const string FileName = "workload.json";

    public sealed record PresetDims(int Vocab, int Context, int Width, int Heads, int Layers);
    public sealed record ModelSpec(int MlpRatio, double LayerNormEpsilon, string Activation);
    public sealed record LoraSpec(int Rank, double Alpha);
    public sealed record OptimizerSpec(string Name, double Lr, double WeightDecay, double Beta1, double Beta2, double Eps);
    /// <summary>A default benchmark shape of a task; <see cref="Classes"/> only for cls.</summary>
    public sealed record Shape(string Preset, int Batch, int Seq, int? Classes = null);

    static readonly JsonSerializerOptions Options = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        RespectRequiredConstructorParameters = true,
        RespectNullableAnnotations = true,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Skip,
    };

    /// <summary>The copy built into this tool (bench/peers/workload.json at build time).</summary>
    public static Workload Embedded { get; } = LoadEmbedded();

    static Workload LoadEmbedded()
    {
        using var stream = typeof(Workload).Assembly.GetManifestResourceStream(FileName)
                           ?? throw new InvalidOperationException($"{FileName} is not embedded in {typeof(Workload).Assembly.GetName().Name}");
        using var reader = new StreamReader(stream);
        return Parse(reader.ReadToEnd(), $"(embedded) {FileName}");
    }

    /// <summary>Reads and checks a workload file; a bad file throws <see cref="InvalidDataException"/> naming it and the field.</summary>
    public static Workload Load(string path)
    {
        var info = new FileInfo(path);
        if (!info.Exists) throw new InvalidDataException($"{path}: no such file");
        if (info.Length > 1 << 20) throw new InvalidDataException($"{path}: {info.Length:N0} bytes, not a workload file (at most 1 MiB)");
        return Parse(File.ReadAllText(path), path);
    }

    internal static Workload Parse(string json, string source)
    {
        Workload w;
        try { w = JsonSerializer.Deserialize<Workload>(json, Options) ?? throw new InvalidDataException($"{source}: empty"); }
        catch (JsonException e) { throw new InvalidDataException($"{source}: {e.Message}", e); }
        // OnnxLora's GptBuilder builds exactly this block; anything else would be another workload
        if (w.Model.MlpRatio != 4) throw new InvalidDataException($"{source}: model.mlp_ratio must be 4 (GptBuilder's MLP), got {w.Model.MlpRatio}");
        if (w.Model.Activation != "gelu_tanh") throw new InvalidDataException($"{source}: model.activation must be gelu_tanh, got '{w.Model.Activation}'");
        if (w.Optimizer.Name != "adamw") throw new InvalidDataException($"{source}: optimizer.name must be adamw, got '{w.Optimizer.Name}'");
        if (w.Lora.Rank < 1) throw new InvalidDataException($"{source}: lora.rank must be ≥ 1, got {w.Lora.Rank}");
        foreach (var (name, p) in w.Presets)
            try { _ = new GptConfig(p.Vocab, p.Context, p.Width, p.Heads, p.Layers); }
            catch (ArgumentException e) { throw new InvalidDataException($"{source}: presets.{name}: {e.Message}", e); }
        foreach (var task in new[] { "cls", "lm" })
        {
            if (!w.Shapes.TryGetValue(task, out var shape)) throw new InvalidDataException($"{source}: shapes.{task} is missing");
            if (!w.Presets.ContainsKey(shape.Preset)) throw new InvalidDataException($"{source}: shapes.{task}.preset '{shape.Preset}' is not among the presets");
        }
        if (w.Shapes["cls"].Classes is not >= 2) throw new InvalidDataException($"{source}: shapes.cls.classes must be ≥ 2");
        return w;
    }

    /// <summary>The model of a preset as OnnxLora builds it: separate q/k/v linear layers with bias, as the peers' nn.Linear.</summary>
    public GptConfig ModelConfig(string preset)
    {
        var p = Presets[preset];
        return new GptConfig(p.Vocab, p.Context, p.Width, p.Heads, p.Layers, Model.LayerNormEpsilon, QkvBias: true, SplitQkv: true);
    }
}
