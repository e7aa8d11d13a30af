using System.Buffers;
using System.Runtime.InteropServices;
using System.Text.Json;
using Google.Protobuf;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Models;

/// <summary>
/// Writes a GPT-2 as ONNX the way a real PyTorch export of Hugging Face's GPT2LMHeadModel looks (opset 17, IR 8):
/// <c>input_ids</c> int64 [batch, seq] → <c>logits</c> float [batch, seq, vocab], both dims symbolic; shapes computed
/// at run time (Shape/Gather/Unsqueeze/Concat); pre-LN blocks with LayerNormalization; every linear a
/// <c>MatMul(x, W[in, out])</c> + <c>Add(bias)</c> on the weight initializer with its Hugging Face name; node names
/// that carry the module path (<c>/transformer/h.0/attn/c_attn/MatMul</c>); a causal mask sliced from a boolean
/// [context, context] table and applied with <c>Where(mask, scores, -inf)</c>; tanh-GELU spelled out in primitive ops;
/// the LM head tied to <c>transformer.wte.weight</c> through <c>/lm_head/Transpose</c> + <c>/lm_head/MatMul</c>.
/// </summary>
public static class GptBuilder
{
    /// <summary>The ONNX opset the model imports.</summary>
    public const int Opset = 17;

    /// <summary>The model's IR version.</summary>
    public const int IrVersion = 8;

    /// <summary>Name of the model's input: token ids, int64 [batch, seq].</summary>
    public const string InputIds = "input_ids";

    /// <summary>Name of the model's output: next-token logits, float [batch, seq, vocab].</summary>
    public const string Logits = "logits";

    /// <summary>Metadata key holding the config in Hugging Face config.json names.</summary>
    public const string ConfigMetadataKey = "onnxlora.gpt_config";

    /// <summary>
    /// Builds the model. The weight initializers share the arrays of <paramref name="weights"/> (no copy, so a
    /// gpt2-xl is not held twice): do not change those arrays while the model is in use.
    /// </summary>
    /// <param name="withPast">Optimum's with-past signature instead: inputs <c>input_ids</c>, <c>attention_mask</c>
    /// [batch, past + seq], <c>position_ids</c> and <c>past_key_values.{i}.key|value</c>, outputs <c>logits</c> and
    /// <c>present.{i}.key|value</c> (<see cref="KvCache"/>); positions and padding then come from the inputs</param>
    public static ModelProto Build(GptConfig config, GptWeights weights, bool withPast = false)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(weights);
        config.Validate();
        foreach (var (name, shape) in GptLayout.Tensors(config))
        {
            var t = weights[name];
            if (!t.Shape.SequenceEqual(shape))
                throw new ArgumentException($"weight '{name}' has shape {GptWeights.Show(t.Shape)}, {config} needs {GptWeights.Show(shape)}", nameof(weights));
        }

        var model = new ModelProto
        {
            IrVersion = IrVersion,
            ProducerName = "onnxlora",
            Graph = new GraphProto { Name = "main_graph" },
            DocString = $"GPT-2 {config}",
        };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = Opset });
        model.MetadataProps.Add(new StringStringEntryProto { Key = ConfigMetadataKey, Value = ConfigJson(config) });
        var g = new TorchStyleGraph(new GraphEditor(model));
        g.Editor.AddInput(ValueInfos.Tensor(InputIds, DataType.Int64, "batch", "seq"));
        if (withPast)
        {
            g.Editor.AddInput(ValueInfos.Tensor(AttentionMask, DataType.Int64, "batch", "total_seq"));
            g.Editor.AddInput(ValueInfos.Tensor(PositionIds, DataType.Int64, "batch", "seq"));
            KvCache.Declare(g.Editor, config.Layers, config.Heads, config.HeadDim, "batch");
        }
        foreach (var (name, shape) in GptLayout.Tensors(config))
            g.Editor.AddInitializer(WeightInitializer(name, shape, weights[name].Values));

        var hidden = Embeddings(g, config, withPast, out var causalMask);   // [batch, seq, d]
        for (int i = 0; i < config.Layers; i++) hidden = Block(g, config, i, hidden, causalMask, withPast);
        hidden = LayerNorm(g, "/transformer/ln_f", "transformer.ln_f", hidden, config);
        // tied head: logits = h · wteᵀ, the transpose of the one embedding initializer (as tied exports keep it)
        var wteT = g.Node("/lm_head", "Transpose", [GptLayout.TokenEmbedding], Attr.Ints("perm", 1, 0));   // [d, vocab]
        var logits = g.Node("/lm_head", "MatMul", [hidden, wteT], outputName: Logits);               // [batch, seq, vocab]
        g.Editor.AddOutput(ValueInfos.Tensor(logits, DataType.Float, "batch", "seq", config.VocabSize));
        if (withPast)
            for (int i = 0; i < config.Layers; i++) KvCache.DeclarePresent(g.Editor, i, config.Heads, config.HeadDim, "batch");
        return model;
    }

    /// <summary>Builds and saves in one step; external data is used automatically for models past protobuf's 2 GB.</summary>
    public static void Save(GptConfig config, GptWeights weights, string path, bool withPast = false) => OnnxFile.Save(Build(config, weights, withPast), path);

    /// <summary>The with-past form's mask [batch, past + seq] and positions [batch, seq] inputs.</summary>
    public const string AttentionMask = "attention_mask", PositionIds = "position_ids";

    // hidden = wte[input_ids] + wpe[arange(seq)]; also the [seq, seq] causal mask every block uses. With past:
    // wpe[position_ids], and the additive [batch, 1, seq, past + seq] bias of KvCache instead of the boolean table.
    static string Embeddings(TorchStyleGraph g, GptConfig config, bool withPast, out string causalMask)
    {
        const string s = "/transformer";
        if (withPast)
        {
            var hiddenWithPast = g.Node(s, "Add", [g.Node($"{s}/wte", "Gather", [GptLayout.TokenEmbedding, InputIds]),
                                                   g.Node($"{s}/wpe", "Gather", [GptLayout.PositionEmbedding, PositionIds])]);
            causalMask = KvCache.AttentionBias(g, s, InputIds, AttentionMask);
            return hiddenWithPast;
        }
        var inputShape = g.Node(s, "Shape", [InputIds]);                                   // [2]
        var seq = g.Node(s, "Gather", [inputShape, g.Constant(s, Tensors.Int64("", [], [1]))], Attr.Int("axis", 0));   // scalar
        var positions = g.Node(s, "Range", [g.Constant(s, Tensors.Int64("", [], [0])), seq, g.Constant(s, Tensors.Int64("", [], [1]))]);   // [seq]
        var positionIds = g.Node(s, "Unsqueeze", [positions, g.Constant(s, Tensors.Int64Vector("", 0))]);   // [1, seq]
        var tokens = g.Node($"{s}/wte", "Gather", [GptLayout.TokenEmbedding, InputIds]);     // [batch, seq, d]
        var places = g.Node($"{s}/wpe", "Gather", [GptLayout.PositionEmbedding, positionIds]);   // [1, seq, d]
        var hidden = g.Node(s, "Add", [tokens, places]);                                    // [batch, seq, d]

        // causal mask: the lower-triangular [context, context] table (HF's attn.bias buffer) sliced to [seq, seq]
        int n = config.ContextLength;
        var table = new bool[(long)n * n];
        for (int i = 0; i < n; i++) table.AsSpan(i * n, i + 1).Fill(true);
        g.Editor.AddInitializer(Tensors.Bool("transformer.causal_mask", [n, n], table));
        var seq1 = g.Node(s, "Unsqueeze", [seq, g.Constant(s, Tensors.Int64Vector("", 0))]);   // [1]
        var ends = g.Node(s, "Concat", [seq1, seq1], Attr.Int("axis", 0));                      // [2]
        causalMask = g.Node(s, "Slice", ["transformer.causal_mask", g.Constant(s, Tensors.Int64Vector("", 0, 0)), ends,
                                         g.Constant(s, Tensors.Int64Vector("", 0, 1))]);       // [seq, seq] bool
        return hidden;
    }

    static string Block(TorchStyleGraph g, GptConfig config, int layer, string x, string causalMask, bool withPast)
    {
        var s = $"/transformer/h.{layer}";
        var m = $"transformer.h.{layer}";
        var attn = Attention(g, config, layer, LayerNorm(g, $"{s}/ln_1", $"{m}.ln_1", x, config), causalMask, withPast);
        x = g.Node(s, "Add", [x, attn]);                                                    // residual
        var mlp = Mlp(g, layer, LayerNorm(g, $"{s}/ln_2", $"{m}.ln_2", x, config));
        return g.Node(s, "Add", [x, mlp]);                                                  // residual
    }

    static string Attention(TorchStyleGraph g, GptConfig config, int layer, string x, string causalMask, bool withPast)
    {
        var s = $"/transformer/h.{layer}/attn";
        int d = config.EmbedDim;
        string[] split;   // q, k, v: 3 × [batch, seq, d]
        if (config.SplitQkv)
            split = GptLayout.SplitQkvModules.Select(m => Linear(g, $"{s}/{m[(m.IndexOf('.') + 1)..]}", GptLayout.Block(layer, m), x, config.QkvBias)).ToArray();
        else
        {
            var qkv = Linear(g, $"{s}/c_attn", GptLayout.Block(layer, "attn.c_attn"), x, config.QkvBias);   // [batch, seq, 3d]
            split = g.Nodes(s, "Split", [qkv, g.Constant(s, Tensors.Int64Vector("", d, d, d))], 3, Attr.Int("axis", 2));
        }

        // [batch, seq, heads, head_dim] from the run-time batch and seq
        var shape = g.Node(s, "Shape", [split[0]]);                                         // [3]
        var batch1 = g.Node(s, "Unsqueeze", [g.Node(s, "Gather", [shape, g.Constant(s, Tensors.Int64("", [], [0]))], Attr.Int("axis", 0)),
                                             g.Constant(s, Tensors.Int64Vector("", 0))]);  // [1]
        var seq1 = g.Node(s, "Unsqueeze", [g.Node(s, "Gather", [shape, g.Constant(s, Tensors.Int64("", [], [1]))], Attr.Int("axis", 0)),
                                           g.Constant(s, Tensors.Int64Vector("", 0))]);    // [1]
        var headsShape = g.Node(s, "Concat", [batch1, seq1, g.Constant(s, Tensors.Int64Vector("", config.Heads)),
                                              g.Constant(s, Tensors.Int64Vector("", config.HeadDim))], Attr.Int("axis", 0));   // [4]
        var q = g.Node(s, "Transpose", [g.Node(s, "Reshape", [split[0], headsShape])], Attr.Ints("perm", 0, 2, 1, 3));   // [batch, heads, seq, hd]
        string kT, v;
        if (withPast)
        {
            // the new keys/values appended to the cache; attention runs over past + seq keys
            var (key, value) = KvCache.Append(g, s, layer,
                g.Node(s, "Transpose", [g.Node(s, "Reshape", [split[1], headsShape])], Attr.Ints("perm", 0, 2, 1, 3)),
                g.Node(s, "Transpose", [g.Node(s, "Reshape", [split[2], headsShape])], Attr.Ints("perm", 0, 2, 1, 3)));
            kT = g.Node(s, "Transpose", [key], Attr.Ints("perm", 0, 1, 3, 2));               // [batch, heads, hd, total]
            v = value;                                                                      // [batch, heads, total, hd]
        }
        else
        {
            kT = g.Node(s, "Transpose", [g.Node(s, "Reshape", [split[1], headsShape])], Attr.Ints("perm", 0, 2, 3, 1));  // [batch, heads, hd, seq]
            v = g.Node(s, "Transpose", [g.Node(s, "Reshape", [split[2], headsShape])], Attr.Ints("perm", 0, 2, 1, 3));   // [batch, heads, seq, hd]
        }

        var scores = g.Node(s, "MatMul", [q, kT]);                                          // [batch, heads, seq, seq]
        scores = g.Node(s, "Div", [scores, g.Constant(s, Tensors.Float("", [], [MathF.Sqrt(config.HeadDim)]))]);
        scores = withPast ? g.Node(s, "Add", [scores, causalMask])
                          : g.Node(s, "Where", [causalMask, scores, g.Constant(s, Tensors.Float("", [], [float.NegativeInfinity]))]);
        var probs = g.Node(s, "Softmax", [scores], Attr.Int("axis", -1));
        var context = g.Node(s, "MatMul", [probs, v]);                                      // [batch, heads, seq, hd]
        context = g.Node(s, "Transpose", [context], Attr.Ints("perm", 0, 2, 1, 3));         // [batch, seq, heads, hd]
        var mergedShape = g.Node(s, "Concat", [batch1, seq1, g.Constant(s, Tensors.Int64Vector("", d))], Attr.Int("axis", 0));   // [3]
        context = g.Node(s, "Reshape", [context, mergedShape]);                             // [batch, seq, d]
        return Linear(g, $"{s}/c_proj", GptLayout.Block(layer, "attn.c_proj"), context, bias: true);
    }

    static string Mlp(TorchStyleGraph g, int layer, string x)
    {
        var s = $"/transformer/h.{layer}/mlp";
        var h = Linear(g, $"{s}/c_fc", GptLayout.Block(layer, "mlp.c_fc"), x, bias: true);  // [batch, seq, 4d]
        return Linear(g, $"{s}/c_proj", GptLayout.Block(layer, "mlp.c_proj"), Gelu(g, $"{s}/act", h), bias: true);
    }

    // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), op for op as torch exports GELU(approximate='tanh')
    static string Gelu(TorchStyleGraph g, string s, string x)
    {
        string F(double v) => g.Constant(s, Tensors.Float("", [], [(float)v]));
        var half = g.Node(s, "Mul", [x, F(0.5)]);
        var cube = g.Node(s, "Pow", [x, F(3.0)]);
        var inner = g.Node(s, "Add", [x, g.Node(s, "Mul", [cube, F(0.044715)])]);
        var tanh = g.Node(s, "Tanh", [g.Node(s, "Mul", [inner, F(Math.Sqrt(2.0 / Math.PI))])]);
        return g.Node(s, "Mul", [half, g.Node(s, "Add", [tanh, F(1.0)])]);
    }

    static string Linear(TorchStyleGraph g, string scope, string module, string x, bool bias)
    {
        var y = g.Node(scope, "MatMul", [x, module + ".weight"]);                           // x · W[in, out]
        return bias ? g.Node(scope, "Add", [y, module + ".bias"]) : y;
    }

    static string LayerNorm(TorchStyleGraph g, string scope, string module, string x, GptConfig config) =>
        g.Node(scope, "LayerNormalization", [x, module + ".weight", module + ".bias"],
               Attr.Int("axis", -1), Attr.Float("epsilon", (float)config.LayerNormEpsilon));

    static string ConfigJson(GptConfig c)
    {
        var json = new Dictionary<string, object>
        {
            ["model_type"] = "gpt2", ["vocab_size"] = c.VocabSize, ["n_positions"] = c.ContextLength, ["n_embd"] = c.EmbedDim,
            ["n_head"] = c.Heads, ["n_layer"] = c.Layers, ["layer_norm_epsilon"] = c.LayerNormEpsilon, ["qkv_bias"] = c.QkvBias,
        };
        if (c.SplitQkv) json["split_qkv"] = true;   // only when set, so the default GPT-2 files stay as they were
        return JsonSerializer.Serialize(json);
    }

    // The initializer wraps the float array's bytes instead of copying them (Google.Protobuf's UnsafeWrap).
    internal static TensorProto WeightInitializer(string name, long[] shape, float[] values)
    {
        var t = new TensorProto { Name = name, DataType = (int)DataType.Float, RawData = UnsafeByteOperations.UnsafeWrap(new FloatBytes(values).Memory) };
        t.Dims.AddRange(shape);
        return t;
    }

    /// <summary>A float[] seen as bytes (little-endian hosts, as ONNX raw_data is).</summary>
    sealed class FloatBytes(float[] values) : MemoryManager<byte>
    {
        public override Span<byte> GetSpan() => MemoryMarshal.AsBytes(values.AsSpan());
        public override unsafe MemoryHandle Pin(int elementIndex = 0)
        {
            var handle = GCHandle.Alloc(values, GCHandleType.Pinned);
            return new MemoryHandle((byte*)handle.AddrOfPinnedObject() + elementIndex, handle, this);
        }
        public override void Unpin() { }
        protected override void Dispose(bool disposing) { }
    }
}

/// <summary>
/// Adds nodes named as torch.onnx.export names them: <c>{scope}/{Op}</c>, then <c>{scope}/{Op}_1</c>, … with outputs
/// <c>{node}_output_{i}</c>, and small constants as <c>Constant</c> nodes in the same scope.
/// </summary>
sealed class TorchStyleGraph(GraphEditor editor)
{
    readonly Dictionary<string, int> _counts = new(StringComparer.Ordinal);

    public GraphEditor Editor { get; } = editor;

    public string Node(string scope, string op, string[] inputs, params AttributeProto[] attributes) =>
        Nodes(scope, op, inputs, 1, attributes)[0];

    public string Node(string scope, string op, string[] inputs, string outputName, params AttributeProto[] attributes) =>
        AddNode(scope, op, inputs, [outputName], attributes);

    public string[] Nodes(string scope, string op, string[] inputs, int outputCount, params AttributeProto[] attributes)
    {
        var name = NextName(scope, op);
        var outputs = Enumerable.Range(0, outputCount).Select(i => $"{name}_output_{i}").ToArray();
        AddNode(scope, op, inputs, outputs, attributes, name);
        return outputs;
    }

    public string Constant(string scope, TensorProto value) => Node(scope, "Constant", [], Attr.Tensor("value", value));

    string AddNode(string scope, string op, string[] inputs, string[] outputs, AttributeProto[] attributes, string? name = null)
    {
        name ??= NextName(scope, op);
        var node = Editor.AddNode(op, inputs, outputs, name, "", attributes);
        if (node.Name != name) throw new InvalidOperationException($"node name '{name}' is taken");
        return outputs[0];
    }

    string NextName(string scope, string op)
    {
        var key = $"{scope}/{op}";
        int n = _counts.GetValueOrDefault(key);
        _counts[key] = n + 1;
        return n == 0 ? key : $"{key}_{n}";
    }
}
