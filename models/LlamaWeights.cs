using OnnxLora.GraphRewrite.Numerics;

namespace OnnxLora.Models;

/// <summary>
/// The weights of a Llama-family model under Hugging Face's names and layout (<see cref="LlamaLayout"/>: linears
/// [out, in]). Make one with <see cref="Random"/> or <see cref="FromCheckpoint"/>; both check every name and shape.
/// </summary>
public sealed class LlamaWeights
{
    static readonly string[] FloatDTypes = ["F32", "F16", "BF16", "F64"];
    readonly Dictionary<string, WeightTensor> _tensors;

    LlamaWeights(LlamaConfig config, Dictionary<string, WeightTensor> tensors)
    {
        Config = config;
        _tensors = tensors;
    }

    /// <summary>The shape these weights have.</summary>
    public LlamaConfig Config { get; }

    /// <summary>The tensor called <paramref name="name"/>.</summary>
    public WeightTensor this[string name] =>
        _tensors.TryGetValue(name, out var t) ? t : throw new KeyNotFoundException($"llama weights have no tensor '{name}' ({Config})");

    /// <summary>Total number of weights.</summary>
    public long ParameterCount => _tensors.Values.Sum(t => (long)t.Values.Length);

    /// <summary>
    /// transformers' initialisation from <paramref name="seed"/>: N(0, 0.02) for embeddings and linears, biases 0,
    /// RMSNorm scales 1; the same bits on every machine and thread count (see <see cref="SeededNormal.FillAll"/>).
    /// </summary>
    public static LlamaWeights Random(LlamaConfig config, long seed = 0)
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        var tensors = new Dictionary<string, WeightTensor>(StringComparer.Ordinal);
        var random = new List<(string, float[], double)>();
        foreach (var (name, shape) in LlamaLayout.Tensors(config))
        {
            var values = new float[checked((int)shape.Aggregate(1L, (a, b) => a * b))];
            tensors[name] = new WeightTensor(shape, values);
            if (LlamaLayout.IsNorm(name)) values.AsSpan().Fill(1f);
            else if (!name.EndsWith(".bias", StringComparison.Ordinal)) random.Add((name, values, 0.02));
        }
        SeededNormal.FillAll(random, seed);
        return new LlamaWeights(config, tensors);
    }

    /// <summary>
    /// The weights of a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folder: the config from config.json, then every
    /// expected tensor's name, dtype (F32, F16, BF16 or F64, converted to float32) and shape checked before anything is
    /// converted; errors name the file and the tensor. RoPE's <c>inv_freq</c> buffers are skipped; a tied model's
    /// <c>lm_head.weight</c> is accepted only as a copy of the embedding.
    /// </summary>
    /// <remarks>Consumes <paramref name="checkpoint"/>: each tensor is removed from it once converted.</remarks>
    /// <exception cref="InvalidDataException">The config or a tensor does not fit.</exception>
    public static LlamaWeights FromCheckpoint(HfCheckpoint checkpoint)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        var config = LlamaConfig.FromHfConfig(checkpoint.Config, checkpoint.ConfigPath);
        var available = checkpoint.Tensors.Where(kv => !kv.Key.EndsWith(LlamaLayout.IgnoredBufferSuffix, StringComparison.Ordinal))
                                          .ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);
        (string File, SafeTensor Tensor)? tiedHead = null;
        if (config.TieWordEmbeddings && available.Remove(LlamaLayout.LmHead, out var head)) tiedHead = head;

        var layout = LlamaLayout.Tensors(config);
        foreach (var (name, shape) in layout)
        {
            if (!available.TryGetValue(name, out var entry))
                throw new InvalidDataException($"{checkpoint.Directory}: missing tensor '{name}' {GptWeights.Show(shape)} for {config} " +
                    $"(the weights hold {available.Count} tensors, {layout.Count} expected{(name == LlamaLayout.LmHead ? "; config.json says tie_word_embeddings is false" : "")})");
            Check(entry.File, name, entry.Tensor, shape, config);
        }
        var expected = layout.Select(t => t.Name).ToHashSet(StringComparer.Ordinal);
        var unexpected = available.Keys.Where(k => !expected.Contains(k)).ToList();
        if (unexpected.Count > 0)
            throw new InvalidDataException($"{available[unexpected[0]].File}: unexpected tensor '{unexpected[0]}'{(unexpected.Count > 1 ? $" and {unexpected.Count - 1} more" : "")} for {config}");
        if (tiedHead is var (headFile, headTensor))
            Check(headFile, LlamaLayout.LmHead, headTensor, [config.VocabSize, config.HiddenSize], config);

        var tensors = new Dictionary<string, WeightTensor>(layout.Count, StringComparer.Ordinal);
        foreach (var (name, shape) in layout)
        {
            tensors[name] = new WeightTensor(shape, available[name].Tensor.ToFloats());
            checkpoint.Tensors.Remove(name);   // drop each file buffer once converted, so a large checkpoint is not held twice
            available.Remove(name);
        }
        if (tiedHead is var (file, tensor) && !tensor.ToFloats().AsSpan().SequenceEqual(tensors[LlamaLayout.TokenEmbedding].Values))
            throw new InvalidDataException($"{file}: tensor '{LlamaLayout.LmHead}' differs from '{LlamaLayout.TokenEmbedding}', but config.json says tie_word_embeddings is true");
        return new LlamaWeights(config, tensors);
    }

    static void Check(string file, string name, SafeTensor tensor, long[] shape, LlamaConfig config)
    {
        if (!FloatDTypes.Contains(tensor.DType))
            throw new InvalidDataException($"{file}: tensor '{name}' has dtype {tensor.DType}; expected one of {string.Join(", ", FloatDTypes)} (quantized checkpoints are not read)");
        if (!tensor.Shape.SequenceEqual(shape))
            throw new InvalidDataException($"{file}: tensor '{name}' has shape {GptWeights.Show(tensor.Shape)}, {config} needs {GptWeights.Show(shape)} (nn.Linear's [out, in])");
    }
}
