using System.Text.Json;
using System.Text.Json.Serialization;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Artifacts;

/// <summary>What the model is trained for.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<TrainingTask>))]
public enum TrainingTask
{
    /// <summary>Causal language modelling on the model's own logits.</summary>
    [JsonStringEnumMemberName("lm")] Lm,
    /// <summary>Sequence classification by a new head on the last non-padding position.</summary>
    [JsonStringEnumMemberName("cls")] Cls,
}

/// <summary>How a classification head is trained.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<HeadMode>))]
public enum HeadMode
{
    /// <summary>The head weight [d, classes] is trained fully (PEFT's modules_to_save).</summary>
    [JsonStringEnumMemberName("full")] Full,
    /// <summary>The head weight is frozen at its seeded init and gets a LoRA branch (A [d, r], B [r, classes]).</summary>
    [JsonStringEnumMemberName("lora")] Lora,
}

/// <summary>Which hidden state of a sequence the classification head reads.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<Pooling>))]
public enum Pooling
{
    /// <summary>The last non-padding token (decoders: the only one that has seen the whole row).</summary>
    [JsonStringEnumMemberName("last")] Last,
    /// <summary>The first non-padding token (an encoder's [CLS]).</summary>
    [JsonStringEnumMemberName("first")] First,
    /// <summary>The mean over the non-padding tokens.</summary>
    [JsonStringEnumMemberName("mean")] Mean,
}

/// <summary>
/// artifacts.json: the contract between the artifact builder and the training session. Every input and output of
/// the three models is listed with its role; see graph-rewrite/Artifacts/README.md for the roles.
/// </summary>
public sealed record ArtifactsSpec
{
    public const string CurrentFormat = "onnxlora.artifacts/1";
    public string Format { get; init; } = CurrentFormat;
    public required TrainingTask Task { get; init; }
    public int? Classes { get; init; }
    /// <summary>cls only.</summary>
    public HeadMode? HeadMode { get; init; }
    /// <summary>cls only: which hidden state the head reads.</summary>
    public Pooling? Pooling { get; init; }
    public required OptimizerKind Optimizer { get; init; }
    public double Beta1 { get; init; }
    public double Beta2 { get; init; }
    public double Epsilon { get; init; }
    public bool AccumulateGradients { get; init; }
    public Dictionary<string, string> Files { get; init; } = new()
    {
        ["train"] = RunLayout.TrainModel, ["eval"] = RunLayout.EvalModel,
        ["optimizer"] = RunLayout.OptimizerModel, ["initial_params"] = RunLayout.InitialParams,
    };
    /// <summary>Trainable tensors, in the order the models list them.</summary>
    public required IReadOnlyList<ParamSpec> Params { get; init; }
    /// <summary>Frozen tensors that belong to the adapter (a LoRA-adapted head's seeded weight), values in initial_params.onnx.</summary>
    public IReadOnlyList<string> FrozenExtras { get; init; } = [];
    public required ModelSpec Train { get; init; }
    public required ModelSpec Eval { get; init; }
    [JsonPropertyName("optimizer_model")]
    public required ModelSpec OptimizerModel { get; init; }

    internal static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    };
}

/// <summary>One trainable tensor: kind is lora_a, lora_b, head, head_lora_a or head_lora_b.</summary>
public sealed record ParamSpec
{
    public required string Name { get; init; }
    public required string Kind { get; init; }
    public required string Module { get; init; }
    public required long[] Shape { get; init; }
    /// <summary>Optimizer state tensor names (exp_avg, exp_avg_sq for AdamW).</summary>
    public required IReadOnlyList<string> Moments { get; init; }
}

/// <summary>Inputs and outputs of one model.</summary>
public sealed record ModelSpec
{
    public required IReadOnlyList<IoSpec> Inputs { get; init; }
    public required IReadOnlyList<IoSpec> Outputs { get; init; }
}

/// <summary>One input or output: its name, role, the parameter it belongs to (or a cache input's layer), element type and dims (numbers or symbols).</summary>
public sealed record IoSpec
{
    public required string Name { get; init; }
    public required IoRole Role { get; init; }
    public string? Param { get; init; }
    /// <summary>The layer of a past (KV-cache) input.</summary>
    public int? Layer { get; init; }
    public required string ElemType { get; init; }
    public IReadOnlyList<string>? Shape { get; init; }

    /// <summary>This entry as the signature readers take it (element type and dims parsed back).</summary>
    public SignatureEntry ToEntry() => new(Name, Role, Layer, Enum.Parse<DataType>(ElemType, ignoreCase: true),
        Shape?.Select(d => long.TryParse(d, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var v) ? new Dim(v) : new Dim(null, d)).ToList());
}
