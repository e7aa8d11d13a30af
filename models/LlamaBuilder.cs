using System.Text.Json;
using Google.Protobuf;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Models;

/// <summary>
/// Writes a Llama-family decoder (LlamaForCausalLM, Qwen2ForCausalLM) as ONNX the way torch.onnx.export writes
/// transformers' model with Optimum's decoder signature (opset 17, IR 8): inputs <c>input_ids</c>,
/// <c>attention_mask</c>, <c>position_ids</c> int64 [batch_size, sequence_length]; output <c>logits</c> float
/// [batch_size, sequence_length, vocab]. Standard ops only: RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul, rotary
/// embeddings as Cos/Sin of position_ids·inv_freq with rotate_half as Slice/Neg/Concat, grouped-query attention's
/// repeat_kv as Unsqueeze/Expand/Reshape, SiLU as x·Sigmoid(x). Every linear is <c>MatMul(x, Transpose(W))</c> on the
/// weight initializer with its Hugging Face name and nn.Linear layout ([out, in]; torch writes this without constant
/// folding), in a node scope that carries the module path (<c>/model/layers.0/self_attn/q_proj/MatMul</c>), so LoRA
/// discovery and PEFT see <c>model.layers.0.self_attn.q_proj</c>. The mask is transformers' 4-D one added to the scores
/// once: finfo.min above the diagonal, (1 − attention_mask)·finfo.min elsewhere.
/// </summary>
public static class LlamaBuilder
{
    /// <summary>The ONNX opset the model imports.</summary>
    public const int Opset = 17;

    /// <summary>The model's IR version.</summary>
    public const int IrVersion = 8;

    public const string InputIds = "input_ids", AttentionMask = "attention_mask", PositionIds = "position_ids", Logits = "logits";

    /// <summary>Metadata key holding the config as Hugging Face config.json.</summary>
    public const string ConfigMetadataKey = "onnxlora.llama_config";

    /// <summary>RoPE's inverse frequencies [head_dim / 2] (transformers' rotary_emb.inv_freq buffer).</summary>
    public const string InverseFrequencies = "model.rotary_emb.inv_freq";

    /// <summary>
    /// Builds the model. The weight initializers share the arrays of <paramref name="weights"/> (no copy): do not change
    /// those arrays while the model is in use.
    /// </summary>
    /// <param name="withPast">also take <c>past_key_values.{i}.key|value</c> and return <c>present.{i}.key|value</c>
    /// (<see cref="KvCache"/>), the mask then covering past + sequence</param>
    public static ModelProto Build(LlamaWeights weights, bool withPast = false)
    {
        ArgumentNullException.ThrowIfNull(weights);
        var config = weights.Config;
        config.Validate();
        var model = new ModelProto
        {
            IrVersion = IrVersion, ProducerName = "onnxlora", Graph = new GraphProto { Name = "main_graph" },
            DocString = $"{config.ModelType} {config}",
        };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = Opset });
        model.MetadataProps.Add(new StringStringEntryProto { Key = ConfigMetadataKey, Value = config.ToHfConfig().ToJsonString() });
        var g = new TorchStyleGraph(new GraphEditor(model));
        foreach (var input in new[] { InputIds, AttentionMask, PositionIds })
            g.Editor.AddInput(ValueInfos.Tensor(input, DataType.Int64, "batch_size", withPast && input == AttentionMask ? "total_sequence_length" : "sequence_length"));
        if (withPast) KvCache.Declare(g.Editor, config.Layers, config.KvHeads, config.HeadDim, "batch_size");
        foreach (var (name, shape) in LlamaLayout.Tensors(config))
        {
            var t = weights[name];
            if (!t.Shape.SequenceEqual(shape))
                throw new ArgumentException($"weight '{name}' has shape {GptWeights.Show(t.Shape)}, {config} needs {GptWeights.Show(shape)}", nameof(weights));
            g.Editor.AddInitializer(GptBuilder.WeightInitializer(name, shape, t.Values));
        }
        var inv = config.InverseFrequencies();
        g.Editor.AddInitializer(Tensors.Float(InverseFrequencies, [inv.Length], inv));

        var hidden = g.Node("/model/embed_tokens", "Gather", [LlamaLayout.TokenEmbedding, InputIds]);   // [b, s, d]
        var (cos, sin) = Rotary(g);
        var bias = withPast ? KvCache.AttentionBias(g, "/model", InputIds, AttentionMask) : AttentionBias(g);
        for (int i = 0; i < config.Layers; i++) hidden = Layer(g, config, i, hidden, cos, sin, bias, withPast);
        hidden = RmsNorm(g, "/model/norm", LlamaLayout.FinalNorm, hidden, config);
        var head = config.TieWordEmbeddings ? LlamaLayout.TokenEmbedding : LlamaLayout.LmHead;
        var headT = g.Node("/lm_head", "Transpose", [head], Attr.Ints("perm", 1, 0));              // [d, vocab]
        var logits = g.Node("/lm_head", "MatMul", [hidden, headT], outputName: Logits);             // [b, s, vocab]
        g.Editor.AddOutput(ValueInfos.Tensor(logits, DataType.Float, "batch_size", "sequence_length", config.VocabSize));
        if (withPast)
            for (int i = 0; i < config.Layers; i++) KvCache.DeclarePresent(g.Editor, i, config.KvHeads, config.HeadDim, "batch_size");
        return model;
    }

    /// <summary>Builds and saves in one step; external data is used automatically for models past protobuf's 2 GB.</summary>
    public static void Save(LlamaWeights weights, string path, bool withPast = false) => OnnxFile.Save(Build(weights, withPast), path);

    // cos, sin [b, 1, s, head_dim] of emb = cat(freqs, freqs), freqs = position_ids · inv_freq
    static (string Cos, string Sin) Rotary(TorchStyleGraph g)
    {
        const string s = "/model/rotary_emb";
        var positions = g.Node(s, "Cast", [PositionIds], Attr.Int("to", (int)DataType.Float));           // [b, s]
        positions = g.Node(s, "Unsqueeze", [positions, g.Constant(s, Tensors.Int64Vector("", -1))]);      // [b, s, 1]
        var freqs = g.Node(s, "Mul", [positions, InverseFrequencies]);                                   // [b, s, hd/2]
        var emb = g.Node(s, "Concat", [freqs, freqs], Attr.Int("axis", -1));                             // [b, s, hd]
        var heads = g.Constant(s, Tensors.Int64Vector("", 1));
        return (g.Node(s, "Unsqueeze", [g.Node(s, "Cos", [emb]), heads]), g.Node(s, "Unsqueeze", [g.Node(s, "Sin", [emb]), heads]));
    }

    // [b, 1, s, s]: finfo.min where the key is in the future, else (1 − mask[key])·finfo.min
    static string AttentionBias(TorchStyleGraph g)
    {
        const string s = "/model";
        var min = g.Constant(s, Tensors.Float("", [], [float.MinValue]));
        var seq = g.Node(s, "Gather", [g.Node(s, "Shape", [InputIds]), g.Constant(s, Tensors.Int64("", [], [1]))], Attr.Int("axis", 0));
        var range = g.Node(s, "Range", [g.Constant(s, Tensors.Int64("", [], [0])), seq, g.Constant(s, Tensors.Int64("", [], [1]))]);   // [s]
        var rows = g.Node(s, "Unsqueeze", [range, g.Constant(s, Tensors.Int64Vector("", 1))]);            // [s, 1] query
        var cols = g.Node(s, "Unsqueeze", [range, g.Constant(s, Tensors.Int64Vector("", 0))]);            // [1, s] key
        var causal = g.Node(s, "LessOrEqual", [cols, rows]);                                              // [s, s]
        var mask = g.Node(s, "Cast", [AttentionMask], Attr.Int("to", (int)DataType.Float));
        mask = g.Node(s, "Unsqueeze", [mask, g.Constant(s, Tensors.Int64Vector("", 1, 2))]);              // [b, 1, 1, s]
        var padding = g.Node(s, "Mul", [g.Node(s, "Sub", [g.Constant(s, Tensors.Float("", [], [1f])), mask]), min]);
        return g.Node(s, "Where", [causal, padding, min]);                                                // [b, 1, s, s]
    }

    static string Layer(TorchStyleGraph g, LlamaConfig config, int layer, string x, string cos, string sin, string bias, bool withPast)
    {
        var s = $"/model/layers.{layer}";
        var normed = RmsNorm(g, $"{s}/input_layernorm", LlamaLayout.Layer(layer, "input_layernorm.weight"), x, config);
        x = g.Node(s, "Add", [x, Attention(g, config, layer, normed, cos, sin, bias, withPast)]);
        normed = RmsNorm(g, $"{s}/post_attention_layernorm", LlamaLayout.Layer(layer, "post_attention_layernorm.weight"), x, config);
        return g.Node(s, "Add", [x, Mlp(g, config, layer, normed)]);
    }

    static string Attention(TorchStyleGraph g, LlamaConfig config, int layer, string x, string cos, string sin, string bias, bool withPast)
    {
        var s = $"/model/layers.{layer}/self_attn";
        string Proj(string name, string input, bool hasBias) => Linear(g, $"{s}/{name}", LlamaLayout.Layer(layer, "self_attn." + name), input, hasBias);
        string I64(params long[] v) => g.Constant(s, Tensors.Int64Vector("", v));
        var q = Proj("q_proj", x, config.QkvBias);
        var k = Proj("k_proj", x, config.QkvBias);
        var v = Proj("v_proj", x, config.QkvBias);

        var shape = g.Node(s, "Shape", [q]);
        var batch1 = g.Node(s, "Unsqueeze", [g.Node(s, "Gather", [shape, g.Constant(s, Tensors.Int64("", [], [0]))], Attr.Int("axis", 0)), I64(0)]);   // [1]
        var seq1 = g.Node(s, "Unsqueeze", [g.Node(s, "Gather", [shape, g.Constant(s, Tensors.Int64("", [], [1]))], Attr.Int("axis", 0)), I64(0)]);     // [1]
        string Heads(string t, int count) =>   // [b, s, count·hd] → [b, count, s, hd]
            g.Node(s, "Transpose", [g.Node(s, "Reshape", [t, g.Node(s, "Concat", [batch1, seq1, I64(count), I64(config.HeadDim)], Attr.Int("axis", 0))])], Attr.Ints("perm", 0, 2, 1, 3));
        q = Rope(g, s, config, Heads(q, config.Heads), cos, sin);
        k = Rope(g, s, config, Heads(k, config.KvHeads), cos, sin);
        v = Heads(v, config.KvHeads);
        var keys1 = seq1;   // key count: the new tokens, or past + new with a cache
        if (withPast)
        {
            (k, v) = KvCache.Append(g, s, layer, k, v);
            keys1 = g.Node(s, "Unsqueeze", [g.Node(s, "Gather", [g.Node(s, "Shape", [k]), g.Constant(s, Tensors.Int64("", [], [2]))], Attr.Int("axis", 0)), I64(0)]);   // [1]
        }
        if (config.KvGroups > 1)
        {
            // repeat_kv: [b, kv, s, hd] → [b, kv, groups, s, hd] → [b, kv·groups, s, hd]
            string Repeat(string t) => g.Node(s, "Reshape", [
                g.Node(s, "Expand", [g.Node(s, "Unsqueeze", [t, I64(2)]), g.Node(s, "Concat", [batch1, I64(config.KvHeads, config.KvGroups), keys1, I64(config.HeadDim)], Attr.Int("axis", 0))]),
                g.Node(s, "Concat", [batch1, I64(config.Heads), keys1, I64(config.HeadDim)], Attr.Int("axis", 0))]);
            k = Repeat(k);
            v = Repeat(v);
        }
        var scores = g.Node(s, "MatMul", [q, g.Node(s, "Transpose", [k], Attr.Ints("perm", 0, 1, 3, 2))]);   // [b, h, s, s]
        scores = g.Node(s, "Div", [scores, g.Constant(s, Tensors.Float("", [], [MathF.Sqrt(config.HeadDim)]))]);
        scores = g.Node(s, "Add", [scores, bias]);
        var context = g.Node(s, "MatMul", [g.Node(s, "Softmax", [scores], Attr.Int("axis", -1)), v]);        // [b, h, s, hd]
        context = g.Node(s, "Transpose", [context], Attr.Ints("perm", 0, 2, 1, 3));
        context = g.Node(s, "Reshape", [context, g.Node(s, "Concat", [batch1, seq1, I64((long)config.Heads * config.HeadDim)], Attr.Int("axis", 0))]);
        return Proj("o_proj", context, config.OutputBias);
    }

    // x·cos + rotate_half(x)·sin, rotate_half(x) = cat(−x[..., hd/2:], x[..., :hd/2])
    static string Rope(TorchStyleGraph g, string s, LlamaConfig config, string x, string cos, string sin)
    {
        string I64(params long[] v) => g.Constant(s, Tensors.Int64Vector("", v));
        long half = config.HeadDim / 2;
        var x1 = g.Node(s, "Slice", [x, I64(0), I64(half), I64(-1), I64(1)]);
        var x2 = g.Node(s, "Slice", [x, I64(half), I64(long.MaxValue), I64(-1), I64(1)]);
        var rotated = g.Node(s, "Concat", [g.Node(s, "Neg", [x2]), x1], Attr.Int("axis", -1));
        return g.Node(s, "Add", [g.Node(s, "Mul", [x, cos]), g.Node(s, "Mul", [rotated, sin])]);
    }

    // down(silu(gate(x)) · up(x)), silu(z) = z·sigmoid(z)
    static string Mlp(TorchStyleGraph g, LlamaConfig config, int layer, string x)
    {
        var s = $"/model/layers.{layer}/mlp";
        string Proj(string name, string input) => Linear(g, $"{s}/{name}", LlamaLayout.Layer(layer, "mlp." + name), input, config.MlpBias);
        var gate = Proj("gate_proj", x);
        var act = g.Node($"{s}/act_fn", "Mul", [gate, g.Node($"{s}/act_fn", "Sigmoid", [gate])]);
        return Proj("down_proj", g.Node(s, "Mul", [act, Proj("up_proj", x)]));
    }

    static string Linear(TorchStyleGraph g, string scope, string module, string x, bool bias)
    {
        var wT = g.Node(scope, "Transpose", [module + ".weight"], Attr.Ints("perm", 1, 0));   // [in, out]
        var y = g.Node(scope, "MatMul", [x, wT]);
        return bias ? g.Node(scope, "Add", [y, module + ".bias"]) : y;
    }

    // weight · x / sqrt(mean(x²) + eps), as transformers' LlamaRMSNorm exports (rsqrt → Sqrt + Div)
    static string RmsNorm(TorchStyleGraph g, string s, string weight, string x, LlamaConfig config)
    {
        var variance = g.Node(s, "ReduceMean", [g.Node(s, "Pow", [x, g.Constant(s, Tensors.Float("", [], [2f]))])], Attr.Ints("axes", -1), Attr.Int("keepdims", 1));
        var root = g.Node(s, "Sqrt", [g.Node(s, "Add", [variance, g.Constant(s, Tensors.Float("", [], [(float)config.RmsNormEps]))])]);
        var inverse = g.Node(s, "Div", [g.Constant(s, Tensors.Float("", [], [1f])), root]);
        return g.Node(s, "Mul", [weight, g.Node(s, "Mul", [x, inverse])]);
    }
}
