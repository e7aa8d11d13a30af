namespace OnnxLora.Models;

/// <summary>
/// The one place that lists a Llama-family model's tensors, with the names and layout of a Hugging Face
/// LlamaForCausalLM / Qwen2ForCausalLM state dict: <c>model.layers.{i}.self_attn.q_proj.weight</c> as nn.Linear keeps
/// it, [out, in]. The builder, the importer and random init all read this list.
/// </summary>
public static class LlamaLayout
{
    /// <summary>Token embedding [vocab, hidden]; also the head when tied.</summary>
    public const string TokenEmbedding = "model.embed_tokens.weight";

    /// <summary>Final RMSNorm scale [hidden].</summary>
    public const string FinalNorm = "model.norm.weight";

    /// <summary>The untied output head [vocab, hidden] (module <c>lm_head</c>).</summary>
    public const string LmHead = "lm_head.weight";

    /// <summary>Attention projections relative to a layer, in the order the block uses them.</summary>
    public static IReadOnlyList<string> AttentionModules { get; } = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"];

    /// <summary>MLP projections relative to a layer.</summary>
    public static IReadOnlyList<string> MlpModules { get; } = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

    /// <summary>Non-parameter tensors older checkpoints hold that import skips (RoPE's inverse frequencies, recomputed from rope_theta).</summary>
    public const string IgnoredBufferSuffix = ".rotary_emb.inv_freq";

    /// <summary>Module path of a layer's submodule: <c>model.layers.{layer}.{module}</c>.</summary>
    public static string Layer(int layer, string module) => $"model.layers.{layer}.{module}";

    /// <summary>Every tensor of <paramref name="config"/>, in state-dict order, with its shape ([out, in] for linears).</summary>
    public static IReadOnlyList<(string Name, long[] Shape)> Tensors(LlamaConfig config)
    {
        long d = config.HiddenSize, q = (long)config.Heads * config.HeadDim, kv = (long)config.KvHeads * config.HeadDim, mlp = config.IntermediateSize;
        var list = new List<(string, long[])> { (TokenEmbedding, [config.VocabSize, d]) };
        for (int i = 0; i < config.Layers; i++)
        {
            void Linear(string module, long @out, long @in, bool bias)
            {
                list.Add((Layer(i, module + ".weight"), [@out, @in]));
                if (bias) list.Add((Layer(i, module + ".bias"), [@out]));
            }
            Linear("self_attn.q_proj", q, d, config.QkvBias);
            Linear("self_attn.k_proj", kv, d, config.QkvBias);
            Linear("self_attn.v_proj", kv, d, config.QkvBias);
            Linear("self_attn.o_proj", d, q, config.OutputBias);
            Linear("mlp.gate_proj", mlp, d, config.MlpBias);
            Linear("mlp.up_proj", mlp, d, config.MlpBias);
            Linear("mlp.down_proj", d, mlp, config.MlpBias);
            list.Add((Layer(i, "input_layernorm.weight"), [d]));
            list.Add((Layer(i, "post_attention_layernorm.weight"), [d]));
        }
        list.Add((FinalNorm, [d]));
        if (!config.TieWordEmbeddings) list.Add((LmHead, [config.VocabSize, d]));
        return list;
    }

    /// <summary>True for an RMSNorm scale (initialised to 1).</summary>
    public static bool IsNorm(string name) => name.EndsWith("norm.weight", StringComparison.Ordinal);
}
