namespace OnnxLora.Models;

/// <summary>
/// The one place that lists a GPT-2's tensors: Hugging Face names (<c>transformer.h.0.attn.c_attn.weight</c>),
/// shapes, and which weights are Conv1D. The builder, the importer, random init and the safetensors writer all
/// read this list, so they cannot disagree.
/// </summary>
public static class GptLayout
{
    /// <summary>The prefix GPT2LMHeadModel puts before every transformer tensor (GPT2Model checkpoints have none).</summary>
    public const string Prefix = "transformer.";

    /// <summary>Token embedding [vocab, d]; also the tied LM head (used transposed).</summary>
    public const string TokenEmbedding = "transformer.wte.weight";

    /// <summary>Learned position embedding [context, d].</summary>
    public const string PositionEmbedding = "transformer.wpe.weight";

    /// <summary>
    /// GPT-2's Conv1D modules, relative to a block (the one list: import and PEFT's fan_in_fan_out read it). Conv1D stores <c>[in, out]</c> (PEFT's <c>fan_in_fan_out=True</c>),
    /// which is also the layout of the builder's <c>MatMul(x, W)</c>, so they are copied as they are; a checkpoint
    /// from an <c>nn.Linear</c> port would hold them <c>[out, in]</c> and is rejected with a hint.
    /// </summary>
    public static IReadOnlyList<string> Conv1DModules { get; } = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

    /// <summary>True for a module path that ends in one of GPT-2's <see cref="Conv1DModules"/> (<c>transformer.h.0.attn.c_attn</c>).</summary>
    public static bool IsConv1DModule(string module) =>
        Conv1DModules.Any(c => module == c || module.EndsWith("." + c, StringComparison.Ordinal));

    /// <summary>The separate projections of a <see cref="GptConfig.SplitQkv"/> model, relative to a block, in c_attn's column order.</summary>
    public static IReadOnlyList<string> SplitQkvModules { get; } = ["attn.q_proj", "attn.k_proj", "attn.v_proj"];

    /// <summary>Output projections whose init GPT-2 scales by 1/sqrt(2·layers) (residual-path weights).</summary>
    public static IReadOnlyList<string> ResidualProjections { get; } = ["attn.c_proj.weight", "mlp.c_proj.weight"];

    /// <summary>Non-parameter tensors a Hugging Face checkpoint may hold that import skips: the causal-mask buffers.</summary>
    public static IReadOnlyList<string> IgnoredBlockBuffers { get; } = ["attn.bias", "attn.masked_bias"];

    /// <summary>The tied LM head a GPT2LMHeadModel checkpoint may repeat; import accepts it only when equal to wte.</summary>
    public const string LmHead = "lm_head.weight";

    /// <summary>Full name of a block tensor: <c>transformer.h.{layer}.{suffix}</c>.</summary>
    public static string Block(int layer, string suffix) => $"{Prefix}h.{layer}.{suffix}";

    /// <summary>Every tensor of <paramref name="config"/>, in Hugging Face state-dict order, with its shape.</summary>
    public static IReadOnlyList<(string Name, long[] Shape)> Tensors(GptConfig config)
    {
        long d = config.EmbedDim;
        var list = new List<(string, long[])>
        {
            (TokenEmbedding, [config.VocabSize, d]),
            (PositionEmbedding, [config.ContextLength, d]),
        };
        for (int i = 0; i < config.Layers; i++)
        {
            list.Add((Block(i, "ln_1.weight"), [d]));
            list.Add((Block(i, "ln_1.bias"), [d]));
            if (config.SplitQkv)
                foreach (var m in SplitQkvModules)
                {
                    list.Add((Block(i, m + ".weight"), [d, d]));          // [in, out]
                    if (config.QkvBias) list.Add((Block(i, m + ".bias"), [d]));
                }
            else
            {
                list.Add((Block(i, "attn.c_attn.weight"), [d, 3 * d]));   // [in, out], q|k|v side by side
                if (config.QkvBias) list.Add((Block(i, "attn.c_attn.bias"), [3 * d]));
            }
            list.Add((Block(i, "attn.c_proj.weight"), [d, d]));
            list.Add((Block(i, "attn.c_proj.bias"), [d]));
            list.Add((Block(i, "ln_2.weight"), [d]));
            list.Add((Block(i, "ln_2.bias"), [d]));
            list.Add((Block(i, "mlp.c_fc.weight"), [d, 4 * d]));
            list.Add((Block(i, "mlp.c_fc.bias"), [4 * d]));
            list.Add((Block(i, "mlp.c_proj.weight"), [4 * d, d]));
            list.Add((Block(i, "mlp.c_proj.bias"), [d]));
        }
        list.Add(("transformer.ln_f.weight", [d]));
        list.Add(("transformer.ln_f.bias", [d]));
        return list;
    }

    /// <summary>True for a Conv1D weight name (any block).</summary>
    public static bool IsConv1DWeight(string name) =>
        name.EndsWith(".weight", StringComparison.Ordinal) && (IsConv1DModule(name[..^".weight".Length]) || SplitQkvModules.Any(m => name.EndsWith($".{m}.weight", StringComparison.Ordinal)));
}
