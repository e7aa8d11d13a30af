namespace OnnxLora.Models;

/// <summary>
/// The shape of a GPT-2-style model: token vocabulary, context length, width, heads and blocks.
/// Construction validates the combination (<see cref="Validate"/>), so a config that exists is one the builder can build.
/// </summary>
/// <param name="VocabSize">Number of token ids (50,257 for the GPT-2 BPE).</param>
/// <param name="ContextLength">Maximum sequence length: rows of the learned position table.</param>
/// <param name="EmbedDim">Width of the residual stream (<c>n_embd</c>).</param>
/// <param name="Heads">Attention heads per block; must divide <paramref name="EmbedDim"/>.</param>
/// <param name="Layers">Transformer blocks.</param>
/// <param name="LayerNormEpsilon">Epsilon of every LayerNorm (GPT-2: 1e-5).</param>
/// <param name="QkvBias">Whether the q/k/v projection (<c>c_attn</c>, or q_proj/k_proj/v_proj when split) has a bias (GPT-2: true).</param>
/// <param name="SplitQkv">
/// Separate q/k/v projections (<c>attn.q_proj</c>, <c>attn.k_proj</c>, <c>attn.v_proj</c>, each [d, d]) instead of GPT-2's
/// fused <c>attn.c_attn</c> [d, 3d], as models written with one <c>nn.Linear</c> per projection have (and as the benchmark
/// peers do: LoRA then adapts q, k and v separately). The same function as the fused layout when c_attn's columns are
/// split q|k|v. Default false: the GPT-2 layout, which Hugging Face checkpoints use.
/// </param>
public sealed record GptConfig(int VocabSize, int ContextLength, int EmbedDim, int Heads, int Layers,
                               double LayerNormEpsilon = 1e-5, bool QkvBias = true, bool SplitQkv = false)
{
    // Presets in the order `--help` and error messages list them. tiny and small are test/demo sizes, the rest are
    // the published GPT-2 shapes (vocabulary 50,257, context 1,024).
    static readonly (string Name, GptConfig Config)[] Presets =
    [
        ("tiny", new(512, 64, 32, 2, 2)),
        ("small", new(50257, 256, 128, 4, 4)),
        ("gpt2", new(50257, 1024, 768, 12, 12)),
        ("gpt2-medium", new(50257, 1024, 1024, 16, 24)),
        ("gpt2-large", new(50257, 1024, 1280, 20, 36)),
        ("gpt2-xl", new(50257, 1024, 1600, 25, 48)),
    ];

    /// <summary>Names accepted by <see cref="Preset"/>, smallest first.</summary>
    public static IReadOnlyList<string> PresetNames { get; } = Presets.Select(p => p.Name).ToArray();

    /// <summary>The preset called <paramref name="name"/> (case-insensitive).</summary>
    /// <exception cref="ArgumentException">Unknown name; the message lists the valid ones.</exception>
    public static GptConfig Preset(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        foreach (var (n, c) in Presets)
            if (string.Equals(n, name, StringComparison.OrdinalIgnoreCase)) return c;
        throw new ArgumentException($"unknown GPT preset '{name}'; valid presets: {string.Join(", ", PresetNames)}");
    }

    /// <summary>The name of the preset equal to this config, or null.</summary>
    public string? PresetName => Presets.FirstOrDefault(p => p.Config == this).Name;

    /// <summary>The preset whose width is <paramref name="embedDim"/> (used to guess the head count of imported weights), or null.</summary>
    public static GptConfig? PresetWithWidth(int embedDim) => Presets.FirstOrDefault(p => p.Config.EmbedDim == embedDim).Config;

    /// <summary>Width of one attention head.</summary>
    public int HeadDim => EmbedDim / Heads;

    /// <summary>Width of the MLP's hidden layer (4 × <see cref="EmbedDim"/>, as in GPT-2).</summary>
    public int MlpDim => 4 * EmbedDim;

    /// <summary>Number of weights, counting the tied token embedding / LM head once.</summary>
    public long ParameterCount
    {
        get
        {
            long d = EmbedDim;
            long perBlock = 2 * 2 * d                       // ln_1, ln_2
                            + d * 3 * d + (QkvBias ? 3 * d : 0) // c_attn (or q/k/v_proj: the same count)
                            + d * d + d                     // attn.c_proj
                            + d * 4 * d + 4 * d             // mlp.c_fc
                            + 4 * d * d + d;                // mlp.c_proj
            return (long)VocabSize * d + (long)ContextLength * d + Layers * perBlock + 2 * d;
        }
    }

    // runs in the primary constructor, so `new GptConfig(...)` with bad fields throws at once
    readonly bool _validated = Check(VocabSize, ContextLength, EmbedDim, Heads, Layers, LayerNormEpsilon);

    /// <summary>
    /// Checks every field; messages name the field and the rule. Construction already checks, but a
    /// <c>with</c> expression does not, so consumers (the builder, the importer) call this again.
    /// </summary>
    public void Validate() => Check(VocabSize, ContextLength, EmbedDim, Heads, Layers, LayerNormEpsilon);

    static bool Check(int vocabSize, int contextLength, int embedDim, int heads, int layers, double layerNormEpsilon)
    {
        static void Positive(int value, string field)
        {
            if (value <= 0) throw new ArgumentException($"GptConfig.{field} must be positive, got {value}");
        }
        Positive(vocabSize, nameof(VocabSize));
        Positive(contextLength, nameof(ContextLength));
        Positive(embedDim, nameof(EmbedDim));
        Positive(heads, nameof(Heads));
        Positive(layers, nameof(Layers));
        if (embedDim % heads != 0)
            throw new ArgumentException($"GptConfig.EmbedDim ({embedDim}) must be divisible by Heads ({heads})");
        if (!(layerNormEpsilon > 0) || double.IsInfinity(layerNormEpsilon))
            throw new ArgumentException($"GptConfig.LayerNormEpsilon must be a positive finite number, got {layerNormEpsilon}");
        // every weight lives in one float[]; the largest are wte [vocab, d], wpe [ctx, d] and the MLP's [d, 4d]
        if ((long)vocabSize * embedDim > Array.MaxLength || (long)contextLength * embedDim > Array.MaxLength || 4L * embedDim * embedDim > Array.MaxLength)
            throw new ArgumentException($"GptConfig: vocabulary {vocabSize}, context {contextLength} and width {embedDim} make a weight too large for one array");
        return true;
    }

    public override string ToString() =>
        $"{PresetName ?? (this with { SplitQkv = false }).PresetName ?? "custom"}{(SplitQkv ? " split q/k/v" : "")} (vocab {VocabSize}, context {ContextLength}, width {EmbedDim}, {Heads} heads, {Layers} layers)";
}
