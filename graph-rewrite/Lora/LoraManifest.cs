using System.Text.Json;
using System.Text.Json.Serialization;
using OnnxLora.GraphRewrite.Contracts;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>How the LoRA branch's scale is derived from alpha and rank.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<LoraScaling>))]
public enum LoraScaling
{
    /// <summary>alpha / r, PEFT's default.</summary>
    [JsonStringEnumMemberName("peft")] Peft,
    /// <summary>alpha / √r (rsLoRA, PEFT's use_rslora).</summary>
    [JsonStringEnumMemberName("rslora")] RsLora,
    /// <summary>plain alpha (the seed code's convention); never a silent default.</summary>
    [JsonStringEnumMemberName("alpha")] Alpha,
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
        Converters = { new ScalingConverter() },
    };

    /// <summary>
    /// Writes the wire name (peft, rslora, alpha); reads it and also "rs_lora", the spelling this format's manifests had
    /// when the enum was written in snake case, so run folders written before stay readable.
    /// </summary>
    sealed class ScalingConverter : JsonConverter<LoraScaling>
    {
        const string LegacyRsLora = "rs_lora";

        public override LoraScaling Read(ref Utf8JsonReader reader, Type type, JsonSerializerOptions options)
        {
            if (reader.TokenType != JsonTokenType.String) throw new JsonException($"'scaling' is {reader.TokenType}, expected a string");
            var text = reader.GetString()!;
            if (text == LegacyRsLora) return LoraScaling.RsLora;
            try { return WireNames.Parse<LoraScaling>(text, "'scaling'"); }
            catch (ArgumentException e) { throw new JsonException(e.Message, e); }
        }

        public override void Write(Utf8JsonWriter writer, LoraScaling value, JsonSerializerOptions options) => writer.WriteStringValue(value.WireName());
    }

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
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file (a rewrite writes {RunLayout.LoraConfig} beside its models)", path);
        LoraManifest? m;
        try { m = JsonSerializer.Deserialize<LoraManifest>(File.ReadAllText(path), Json); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not a valid {RunLayout.LoraConfig} ({e.Message})", e); }
        if (m is null || m.Format != CurrentFormat)
            throw new InvalidDataException($"{path}: format '{m?.Format}' is not '{CurrentFormat}'; re-run 'onnxlora rewrite'");
        m.Validate(path);
        return m;
    }

    /// <summary>
    /// The manifest is read from disk and may come from anyone: every target needs a name, positive dims, a rank of 1 up
    /// to 65,536, a finite positive alpha and the scale its scaling rule gives (a stray scale would train and export a
    /// different adapter than the one described), and no module or parameter name twice.
    /// </summary>
    void Validate(string path)
    {
        InvalidDataException Bad(string what) => new($"{path}: {what}; re-run 'onnxlora rewrite'");
        if (Targets is null || Targets.Count == 0) throw Bad("'targets' is empty");
        var names = new HashSet<string>(StringComparer.Ordinal);
        var modules = new HashSet<string>(StringComparer.Ordinal);
        for (int i = 0; i < Targets.Count; i++)
        {
            var t = Targets[i] ?? throw Bad($"targets[{i}] is null");
            string at = $"targets[{i}] ('{t.Module}')";
            if (string.IsNullOrWhiteSpace(t.Module) || string.IsNullOrWhiteSpace(t.LoraA) || string.IsNullOrWhiteSpace(t.LoraB) || string.IsNullOrWhiteSpace(t.Weight))
                throw Bad($"targets[{i}]: 'module', 'weight', 'lora_a' and 'lora_b' must be names");
            if (!modules.Add(t.Module)) throw Bad($"{at}: the module is listed twice");
            foreach (var n in new[] { t.LoraA, t.LoraB })
                if (!names.Add(n)) throw Bad($"{at}: parameter '{n}' is named twice");
            if (t.In < 1 || t.Out < 1 || t.In > int.MaxValue || t.Out > int.MaxValue) throw Bad($"{at}: 'in' {t.In} and 'out' {t.Out} must be between 1 and {int.MaxValue}");
            if (t.Rank is < 1 or > 65536) throw Bad($"{at}: 'rank' is {t.Rank}, expected 1 to 65,536");
            if (!double.IsFinite(t.Alpha) || t.Alpha <= 0) throw Bad($"{at}: 'alpha' is {t.Alpha}, expected a finite number > 0");
            double expected = ScaleFor(Scaling, t.Alpha, t.Rank);
            if (!double.IsFinite(t.Scale) || Math.Abs(t.Scale - expected) > 1e-9 * Math.Abs(expected))
                throw Bad($"{at}: 'scale' is {t.Scale}, but {Scaling} scaling of alpha {t.Alpha} at rank {t.Rank} gives {expected}");
        }
    }

    /// <summary>
    /// Checks that <paramref name="model"/> (a rewrite's training view) has every target's A [in, rank] and B [rank, out]
    /// as graph inputs of those shapes, so a manifest and a model from different rewrites fail here rather than after training.
    /// </summary>
    public void CheckAgainst(Onnx.ModelProto model, string modelPath)
    {
        var inputs = model.Graph.Input.ToDictionary(v => v.Name, StringComparer.Ordinal);
        foreach (var t in Targets)
            foreach (var (name, shape) in new[] { (t.LoraA, new[] { t.In, t.Rank }), (t.LoraB, new[] { (long)t.Rank, t.Out }) })
            {
                if (!inputs.TryGetValue(name, out var input))
                    throw new InvalidDataException($"{modelPath}: has no input '{name}' for module '{t.Module}' of {RunLayout.LoraConfig}; the model and {RunLayout.LoraConfig} come from different rewrites");
                var dims = input.Type?.TensorType?.Shape?.Dim.Select(d => d.ValueCase == Onnx.TensorShapeProto.Types.Dimension.ValueOneofCase.DimValue ? d.DimValue : -1).ToArray() ?? [];
                if (!dims.SequenceEqual(shape))
                    throw new InvalidDataException($"{modelPath}: input '{name}' has shape [{string.Join(", ", dims)}], but {RunLayout.LoraConfig} needs [{string.Join(", ", shape)}] for module '{t.Module}'; the model and {RunLayout.LoraConfig} come from different rewrites");
            }
    }
}
