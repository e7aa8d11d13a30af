using System.Text.Json;
using System.Text.Json.Serialization;
using OnnxLora.GraphRewrite.Onnx;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>How the LoRA branch's scale is derived from alpha and rank.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<LoraScaling>))]
public enum LoraScaling
{
    /// <summary>alpha / r, PEFT's default.</summary>
    Peft,
    /// <summary>alpha / √r (rsLoRA, PEFT's use_rslora).</summary>
    RsLora,
    /// <summary>plain alpha (the seed code's convention); never a silent default.</summary>
    Alpha,
}

/// <summary>One adapted module: the weight it adapts and the names and shapes of its A [in, r] and B [r, out].</summary>
public sealed record LoraTarget
{
    /// <summary>Module path as PyTorch / PEFT users see it, e.g. "transformer.h.0.attn.c_attn".</summary>
    public required string Module { get; init; }
    /// <summary>The MatMul/Gemm nodes that use the weight and got a branch (several for a shared weight).</summary>
    public required IReadOnlyList<string> Nodes { get; init; }
    /// <summary>The frozen weight's initializer name.</summary>
    public required string Weight { get; init; }
    /// <summary>True when the node multiplies by Wᵀ (Gemm transB=1, or a Transpose in front): the stored weight is [out, in].</summary>
    public bool WeightTransposed { get; init; }
    public required long In { get; init; }
    public required long Out { get; init; }
    public required int Rank { get; init; }
    public required double Alpha { get; init; }
    /// <summary>The factor the branch is multiplied by: from alpha, rank and the scaling rule.</summary>
    public required double Scale { get; init; }
    public required string LoraA { get; init; }
    public required string LoraB { get; init; }
    /// <summary>Element type of A and B (ONNX TensorProto numbering; the type the node multiplies in). 1 = float.</summary>
    public int DataType { get; init; } = 1;
}

/// <summary>
/// lora_config.json: what a rewrite did, so that training, export, merge and deployment agree on names, shapes
/// and scales. Written beside the rewritten models.
/// </summary>
public sealed record LoraManifest
{
    public const string CurrentFormat = "onnxlora.lora/1";
    public const string FileName = "lora_config.json";
    /// <summary>The training view in a rewrite output folder: A/B are graph inputs with their initial values as defaults.</summary>
    public const string TrainingModelFile = "model.onnx";
    /// <summary>The deployable model in a rewrite output folder: A/B are inputs with zero-rank defaults, no scale node.</summary>
    public const string DeployableModelFile = "deploy.onnx";

    public string Format { get; init; } = CurrentFormat;
    public required string ToolVersion { get; init; }
    /// <summary>Path of the base model as given to the rewrite.</summary>
    public required string BaseModel { get; init; }
    /// <summary>SHA-256 (hex) of the base model file.</summary>
    public required string BaseModelSha256 { get; init; }
    public required int Rank { get; init; }
    public required double Alpha { get; init; }
    public required LoraScaling Scaling { get; init; }
    public double Dropout { get; init; }
    /// <summary>"kaiming" or "gaussian".</summary>
    public string Init { get; init; } = "kaiming";
    public int Seed { get; init; }
    /// <summary>The target patterns as the user gave them (PEFT's target_modules).</summary>
    public IReadOnlyList<string> TargetModules { get; init; } = [];
    public IReadOnlyList<string> ExcludeModules { get; init; } = [];
    /// <summary>PEFT's layers_to_transform (block indices), null when every block was eligible.</summary>
    public IReadOnlyList<int>? LayersToTransform { get; init; }
    public IReadOnlyDictionary<string, int> RankPattern { get; init; } = new Dictionary<string, int>();
    public IReadOnlyDictionary<string, double> AlphaPattern { get; init; } = new Dictionary<string, double>();
    /// <summary>
    /// The bool scalar graph input of the training view that switches every LoRA Dropout on (default false, i.e. off);
    /// null when the rewrite added no Dropout.
    /// </summary>
    public string? DropoutTrainingModeInput { get; init; }
    public required IReadOnlyList<LoraTarget> Targets { get; init; }

    static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        Converters = { new JsonStringEnumConverter<LoraScaling>(JsonNamingPolicy.SnakeCaseLower) },
    };

    public static double ScaleFor(LoraScaling scaling, double alpha, int rank) => scaling switch
    {
        LoraScaling.Peft => alpha / rank,
        LoraScaling.RsLora => alpha / Math.Sqrt(rank),
        LoraScaling.Alpha => alpha,
        _ => throw new ArgumentOutOfRangeException(nameof(scaling)),
    };

    public string ToJson() => JsonSerializer.Serialize(this, Json);

    public void Save(string path) => AtomicFile.WriteAllText(path, ToJson());

    /// <summary>Reads a manifest, checking its format tag first.</summary>
    public static LoraManifest Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file (a rewrite writes {FileName} beside its models)", path);
        LoraManifest? m;
        try { m = JsonSerializer.Deserialize<LoraManifest>(File.ReadAllText(path), Json); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not a valid {FileName} ({e.Message})", e); }
        if (m is null || m.Format != CurrentFormat)
            throw new InvalidDataException($"{path}: format '{m?.Format}' is not '{CurrentFormat}'; re-run 'onnxlora rewrite'");
        return m;
    }
}
