using Onnx;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>
/// Pass: folds each target's <c>scale·A·B</c> into its frozen weight, giving a plain model with the base's inputs and
/// outputs and no LoRA inputs. Functional (returns a modified copy). Accepts the base model, the training view or the
/// deployable model (LoRA branches are stripped first). Cases: 1. ΔW = scale·A·B [in, out] is computed in float64 and
/// added in the weight's stored layout ([out, in] for transposed weights), then rounded to the weight's type;
/// 2. a weight used by several linear nodes is merged once; 3. a weight also read by other nodes (a tied embedding
/// Gather) is copied to "&lt;weight&gt;.merged" for the linear nodes, so the embedding keeps the base values; 4. rank-0
/// parameters change nothing.
/// </summary>
public static class MergeLora
{
    /// <param name="model">The base model or a rewrite of it.</param>
    /// <param name="manifest">The rewrite's lora_config.json.</param>
    /// <param name="parameters">A [in, r] and B [r, out] for every target, by the manifest's names (any float type).</param>
    /// <param name="bIncludesScale">True when B already carries the scale (deployable adapters, Olive's convention).</param>
    public static (ModelProto Model, bool Modified) Run(ModelProto model, LoraManifest manifest,
                                                        IReadOnlyDictionary<string, TensorProto> parameters, bool bIncludesScale = false) =>
        LoraFold.Add(model, manifest, parameters, bIncludesScale);

    /// <summary>The LoRA parameters a rewritten model carries as default initializers (the training view's initial or trained values).</summary>
    public static IReadOnlyDictionary<string, TensorProto> ParametersOf(ModelProto model, LoraManifest manifest)
    {
        var names = new HashSet<string>(manifest.Targets.SelectMany(t => new[] { t.LoraA, t.LoraB }));
        return model.Graph.Initializer.Where(i => names.Contains(i.Name)).ToDictionary(i => i.Name);
    }
}

/// <summary>
/// Pass: subtracts each target's <c>scale·A·B</c> from a merged model's weights (the inverse of <see cref="MergeLora"/>).
/// Functional. Sound only for float32/float64 weights: the result differs from the base by the rounding of the merge
/// (≈ 2^-24·|W + ΔW| per element for float32); float16/bfloat16 weights are refused.
/// </summary>
public static class UnmergeLora
{
    public static (ModelProto Model, bool Modified) Run(ModelProto mergedModel, LoraManifest manifest,
                                                        IReadOnlyDictionary<string, TensorProto> parameters, bool bIncludesScale = false) =>
        LoraFold.Subtract(mergedModel, manifest, parameters, bIncludesScale);
}
