using System.Text.Json;
using System.Text.Json.Nodes;

namespace OnnxLora.Models;

/// <summary>
/// The shape of a Llama-family decoder (LlamaForCausalLM, Qwen2ForCausalLM), with Hugging Face config.json's meaning
/// for every field. Construction validates the combination, so a config that exists is one the builder can build.
/// </summary>
/// <param name="VocabSize"><c>vocab_size</c>.</param>
/// <param name="HiddenSize"><c>hidden_size</c>: width of the residual stream.</param>
/// <param name="IntermediateSize"><c>intermediate_size</c>: width of the SwiGLU MLP.</param>
/// <param name="Layers"><c>num_hidden_layers</c>.</param>
/// <param name="Heads"><c>num_attention_heads</c>: query heads.</param>
/// <param name="KvHeads"><c>num_key_value_heads</c>: key/value heads (grouped-query attention); must divide <paramref name="Heads"/>.</param>
/// <param name="HeadDim"><c>head_dim</c>: hidden_size / heads unless the config says otherwise.</param>
/// <param name="RopeTheta"><c>rope_theta</c>: base of the rotary frequencies.</param>
/// <param name="RmsNormEps"><c>rms_norm_eps</c>.</param>
/// <param name="MaxPositions"><c>max_position_embeddings</c> (RoPE has no table: recorded, not a limit of the graph).</param>
/// <param name="TieWordEmbeddings"><c>tie_word_embeddings</c>: the head is the token embedding, transposed.</param>
/// <param name="QkvBias">q/k/v projections have a bias (Qwen2 always; Llama with <c>attention_bias</c>).</param>
/// <param name="OutputBias">o_proj has a bias (Llama with <c>attention_bias</c>).</param>
/// <param name="MlpBias">gate/up/down projections have a bias (Llama's <c>mlp_bias</c>).</param>
/// <param name="ModelType"><c>model_type</c>: "llama", "qwen2" or "mistral" (names the architecture in files we write).</param>
/// <param name="RopeScaling">Llama 3's <c>rope_scaling</c> (<c>rope_type</c> "llama3" or "linear"), or null.</param>
public sealed record LlamaConfig(int VocabSize, int HiddenSize, int IntermediateSize, int Layers, int Heads, int KvHeads, int HeadDim,
                                 double RopeTheta, double RmsNormEps, int MaxPositions, bool TieWordEmbeddings,
                                 bool QkvBias = false, bool OutputBias = false, bool MlpBias = false, string ModelType = "llama",
                                 RopeScaling? RopeScaling = null)
{
    // Presets in the order --help lists them; the real ones are the published config.json values.
    static readonly (string Name, LlamaConfig Config)[] Presets =
    [
        ("tiny", new(512, 32, 64, 2, 4, 2, 8, 10000, 1e-5, 128, TieWordEmbeddings: false)),
        ("tiny-qwen2", new(512, 32, 64, 2, 4, 2, 8, 1e6, 1e-6, 128, TieWordEmbeddings: true, QkvBias: true, ModelType: "qwen2")),
        ("smollm2-135m", new(49152, 576, 1536, 30, 9, 3, 64, 100000, 1e-5, 8192, TieWordEmbeddings: true)),
        ("qwen2.5-0.5b", new(151936, 896, 4864, 24, 14, 2, 64, 1e6, 1e-6, 32768, TieWordEmbeddings: true, QkvBias: true, ModelType: "qwen2")),
        ("llama-3.2-1b", new(128256, 2048, 8192, 16, 32, 8, 64, 500000, 1e-5, 131072, TieWordEmbeddings: true,
                             RopeScaling: new RopeScaling("llama3", 32, 1, 4, 8192))),
    ];

    /// <summary>Names accepted by <see cref="Preset"/>, smallest first.</summary>
    public static IReadOnlyList<string> PresetNames { get; } = Presets.Select(p => p.Name).ToArray();

    /// <summary>The preset called <paramref name="name"/> (case-insensitive).</summary>
    /// <exception cref="ArgumentException">Unknown name; the message lists the valid ones.</exception>
    public static LlamaConfig Preset(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        foreach (var (n, c) in Presets)
            if (string.Equals(n, name, StringComparison.OrdinalIgnoreCase)) return c;
        throw new ArgumentException($"unknown llama preset '{name}'; valid presets: {string.Join(", ", PresetNames)}");
    }

    /// <summary>The name of the preset equal to this config, or null.</summary>
    public string? PresetName => Presets.FirstOrDefault(p => p.Config == this).Name;

    /// <summary>Queries per key/value head (repeat_kv's n_rep).</summary>
    public int KvGroups => Heads / KvHeads;

    /// <summary>Number of weights (a tied head counted once).</summary>
    public long ParameterCount => LlamaLayout.Tensors(this).Sum(t => t.Shape.Aggregate(1L, (a, b) => a * b));

    // runs in the primary constructor, so `new LlamaConfig(...)` with bad fields throws at once
    readonly bool _validated = Check(VocabSize, HiddenSize, IntermediateSize, Layers, Heads, KvHeads, HeadDim, RopeTheta, RmsNormEps, MaxPositions);

    /// <summary>Checks every field (a <c>with</c> expression skips the constructor's check); messages name the field.</summary>
    public void Validate() => Check(VocabSize, HiddenSize, IntermediateSize, Layers, Heads, KvHeads, HeadDim, RopeTheta, RmsNormEps, MaxPositions);

    static bool Check(int vocab, int hidden, int intermediate, int layers, int heads, int kvHeads, int headDim, double theta, double eps, int maxPositions)
    {
        static void Positive(long value, string field)
        {
            if (value <= 0) throw new ArgumentException($"{field} must be positive, got {value}");
        }
        Positive(vocab, "vocab_size");
        Positive(hidden, "hidden_size");
        Positive(intermediate, "intermediate_size");
        Positive(layers, "num_hidden_layers");
        Positive(heads, "num_attention_heads");
        Positive(kvHeads, "num_key_value_heads");
        Positive(headDim, "head_dim");
        Positive(maxPositions, "max_position_embeddings");
        if (heads % kvHeads != 0)
            throw new ArgumentException($"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kvHeads})");
        if (headDim % 2 != 0) throw new ArgumentException($"head_dim ({headDim}) must be even: rotary embeddings rotate pairs");
        if (!(theta > 0) || double.IsInfinity(theta)) throw new ArgumentException($"rope_theta must be a positive finite number, got {theta}");
        if (!(eps > 0) || double.IsInfinity(eps)) throw new ArgumentException($"rms_norm_eps must be a positive finite number, got {eps}");
        // every weight lives in one float[]
        foreach (var (rows, cols, what) in new[] { ((long)vocab, (long)hidden, "embed_tokens"), ((long)intermediate, (long)hidden, "gate_proj"), ((long)heads * headDim, (long)hidden, "q_proj") })
            if (rows * cols > Array.MaxLength) throw new ArgumentException($"{what} [{rows}, {cols}] is too large for one array");
        return true;
    }

    /// <summary>
    /// Reads a Hugging Face config.json of a LlamaForCausalLM or Qwen2ForCausalLM; errors name the file and the field.
    /// </summary>
    public static LlamaConfig FromHfConfig(JsonObject json, string path)
    {
        ArgumentNullException.ThrowIfNull(json);
        var type = Str("model_type") ?? "llama";
        if (type is not ("llama" or "qwen2" or "mistral"))
            throw new InvalidDataException($"{path}: model_type '{type}' is not a Llama-family model (llama, qwen2, mistral)");
        int hidden = Int("hidden_size"), heads = Int("num_attention_heads");
        int kvHeads = json["num_key_value_heads"] is null ? heads : Int("num_key_value_heads");
        int headDim = json["head_dim"] is null ? (hidden % heads == 0 ? hidden / heads : throw Field("head_dim", "is missing and hidden_size is not a multiple of num_attention_heads")) : Int("head_dim");
        bool attentionBias = Bool("attention_bias") ?? false;
        if (Str("hidden_act") is { } act && act != "silu") throw Field("hidden_act", $"is '{act}'; only silu (SwiGLU) is supported");
        if (type == "qwen2" && Bool("use_sliding_window") == true) throw Field("use_sliding_window", "is true; sliding-window attention is not supported");
        // Mistral is Llama's graph plus a sliding window; without one (v0.2+) or one as long as the context, it is Llama's
        if (type == "mistral" && json["sliding_window"] is JsonValue window && window.TryGetValue<int>(out var w)
            && json["max_position_embeddings"] is JsonValue mp && mp.TryGetValue<int>(out var maxPositions) && w < maxPositions)
            throw Field("sliding_window", $"is {w}, shorter than max_position_embeddings ({maxPositions}); sliding-window attention is not supported");
        RopeScaling? scaling = null;
        if (json["rope_scaling"] is JsonObject rs)
        {
            var kind = (rs["rope_type"] ?? rs["type"]) is { } k ? Try("rope_scaling.rope_type", k, () => k.Deserialize<string>()) ?? "default" : "default";
            double F(string key) => rs[key] is { } v ? Try($"rope_scaling.{key}", v, () => v.Deserialize<double>()) : throw Field($"rope_scaling.{key}", "is missing");
            scaling = kind switch
            {
                "default" => null,
                "linear" => new RopeScaling("linear", F("factor"), 0, 0, 0),
                "llama3" => new RopeScaling("llama3", F("factor"), F("low_freq_factor"), F("high_freq_factor"), (int)F("original_max_position_embeddings")),
                _ => throw Field("rope_scaling.rope_type", $"is '{kind}'; supported: default, linear, llama3"),
            };
        }
        try
        {
            return new LlamaConfig(Int("vocab_size"), hidden, Int("intermediate_size"), Int("num_hidden_layers"), heads, kvHeads, headDim,
                Num("rope_theta") ?? 10000, Num("rms_norm_eps") ?? 1e-6, json["max_position_embeddings"] is null ? 2048 : Int("max_position_embeddings"),
                Bool("tie_word_embeddings") ?? false,
                QkvBias: type == "qwen2" || attentionBias, OutputBias: type == "llama" && attentionBias, MlpBias: Bool("mlp_bias") ?? false,
                ModelType: type, RopeScaling: scaling);
        }
        catch (ArgumentException e) { throw new InvalidDataException($"{path}: {e.Message}", e); }

        InvalidDataException Field(string field, string problem) => new($"{path}: {field} {problem}");
        string? Str(string key) => json[key] is { } v ? Try(key, v, () => v.Deserialize<string>()) : null;
        bool? Bool(string key) => json[key] is { } v ? Try(key, v, () => v.Deserialize<bool>()) : null;
        double? Num(string key) => json[key] is { } v ? Try(key, v, () => v.Deserialize<double>()) : null;
        int Int(string key) => json[key] is { } v ? Try(key, v, () => v.Deserialize<int>()) : throw Field(key, "is missing");
        T Try<T>(string key, JsonNode value, Func<T> read)
        {
            try { return read(); }
            catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException) { throw Field(key, $"has the wrong type ({value.ToJsonString()})"); }
        }
    }

    /// <summary>This config in Hugging Face config.json names (what <see cref="FromHfConfig"/> reads back).</summary>
    public JsonObject ToHfConfig()
    {
        var json = new JsonObject
        {
            ["architectures"] = new JsonArray(ModelType switch { "qwen2" => "Qwen2ForCausalLM", "mistral" => "MistralForCausalLM", _ => "LlamaForCausalLM" }),
            ["model_type"] = ModelType, ["vocab_size"] = VocabSize, ["hidden_size"] = HiddenSize, ["intermediate_size"] = IntermediateSize,
            ["num_hidden_layers"] = Layers, ["num_attention_heads"] = Heads, ["num_key_value_heads"] = KvHeads, ["head_dim"] = HeadDim,
            ["rope_theta"] = RopeTheta, ["rms_norm_eps"] = RmsNormEps, ["max_position_embeddings"] = MaxPositions,
            ["tie_word_embeddings"] = TieWordEmbeddings, ["hidden_act"] = "silu",
        };
        if (ModelType == "llama") { json["attention_bias"] = QkvBias; json["mlp_bias"] = MlpBias; }
        if (RopeScaling is { } s)
            json["rope_scaling"] = s.Type == "linear" ? new JsonObject { ["rope_type"] = "linear", ["factor"] = s.Factor }
                : new JsonObject { ["rope_type"] = s.Type, ["factor"] = s.Factor, ["low_freq_factor"] = s.LowFreqFactor,
                                   ["high_freq_factor"] = s.HighFreqFactor, ["original_max_position_embeddings"] = s.OriginalMaxPositions };
        return json;
    }

    /// <summary>
    /// RoPE's inverse frequencies [head_dim / 2]: 1 / theta^(2i / head_dim), rescaled as <see cref="RopeScaling"/> says
    /// (transformers' rope_init functions "default", "linear" and "llama3"), in float64 then rounded once.
    /// </summary>
    public float[] InverseFrequencies()
    {
        var inv = new float[HeadDim / 2];
        for (int i = 0; i < inv.Length; i++)
        {
            // transformers computes the exponent in float32 (arange(0, dim, 2).float() / dim) and the power in float32
            float exponent = (float)(2 * i) / HeadDim;
            double f = 1.0 / Math.Pow(RopeTheta, exponent);
            inv[i] = (float)(RopeScaling?.Apply(f) ?? f);
        }
        return inv;
    }

    public override string ToString() =>
        $"{PresetName ?? "custom"} {ModelType} (vocab {VocabSize}, width {HiddenSize}, {Layers} layers, {Heads} heads / {KvHeads} kv of {HeadDim}, mlp {IntermediateSize}{(TieWordEmbeddings ? ", tied head" : "")})";
}

/// <summary>A <c>rope_scaling</c> entry: "linear" divides every frequency by Factor; "llama3" (Llama 3.1+) keeps high frequencies, divides low ones by Factor and blends between.</summary>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositions)
{
    /// <summary>The rescaled inverse frequency.</summary>
    public double Apply(double invFreq)
    {
        if (Type == "linear") return invFreq / Factor;
        double lowWavelen = OriginalMaxPositions / LowFreqFactor, highWavelen = OriginalMaxPositions / HighFreqFactor;
        double wavelen = 2 * Math.PI / invFreq;
        if (wavelen < highWavelen) return invFreq;            // high frequency: unchanged
        if (wavelen > lowWavelen) return invFreq / Factor;    // low frequency: scaled
        double smooth = (OriginalMaxPositions / wavelen - LowFreqFactor) / (HighFreqFactor - LowFreqFactor);
        return (1 - smooth) * invFreq / Factor + smooth * invFreq;
    }
}
