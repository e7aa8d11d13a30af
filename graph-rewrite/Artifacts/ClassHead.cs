using System.Text.Json;
using System.Text.Json.Serialization;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Artifacts;

/// <summary>What a classifier model records in its metadata (<see cref="ClassHead.MetadataKey"/>).</summary>
public sealed record ClassifierInfo
{
    public required int Classes { get; init; }
    public required Pooling Pooling { get; init; }
    /// <summary>Class names in output order, when the training data named them.</summary>
    public IReadOnlyList<string>? Labels { get; init; }

    internal static readonly JsonSerializerOptions Json = new() { PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull };
}

/// <summary>
/// The sequence-classification head, one implementation for the training artifacts and the deployable and merged
/// classifiers: the hidden state under the language-model head, pooled over the non-padding tokens of a float mask
/// [batch, seq], times the head weight <see cref="Weight"/> [d, classes] → <see cref="Output"/> [batch, classes].
/// </summary>
public static class ClassHead
{
    public const string Weight = "cls_head.weight", LoraA = "cls_head.lora_A", LoraB = "cls_head.lora_B", Output = "class_logits";
    /// <summary>The head's module name in Hugging Face's *ForSequenceClassification decoders (PEFT's modules_to_save entry).</summary>
    public const string PeftModule = "score";
    public const string MetadataKey = "onnxlora.classifier";

    /// <summary>True for an encoder's feature-extraction output (Optimum/sentence-transformers' last_hidden_state): the hidden state itself, no head.</summary>
    public static bool IsHiddenOutput(string name) => name is "last_hidden_state" or "token_embeddings";

    /// <summary>
    /// The value entering the output head (the hidden state) and the head's weight, found from the logits output; an
    /// encoder's hidden-state output is its own hidden state (weight null).
    /// </summary>
    public static (string Hidden, string? Weight) FindHidden(GraphEditor g, string logits)
    {
        if (IsHiddenOutput(logits)) return (logits, null);
        var v = logits;
        for (int guard = 0; guard < 64; guard++)
        {
            var p = g.Producer(v) ?? throw new ArgumentException($"'{logits}' is not computed by a MatMul/Gemm head");
            switch (p.OpType)
            {
                case "Reshape" or "Identity" or "Cast": v = p.Input[0]; continue;
                case "MatMul" or "Gemm" or "FusedMatMul": return (p.Input[0], p.Input[1]);
                case "Add":
                    v = p.Input.FirstOrDefault(i => g.Producer(i) is { OpType: "MatMul" or "Gemm" or "FusedMatMul" } mm && g.IsInitializer(mm.Input[1]))
                        ?? p.Input.First(i => g.Producer(i) is not null);
                    continue;
                default: throw new ArgumentException($"cannot find the output head behind '{logits}': stopped at {p.Describe()}");
            }
        }
        throw new ArgumentException($"cannot find the output head behind '{logits}'");
    }

    /// <summary>The width d of the hidden state under the head.</summary>
    public static long HiddenWidth(ModelProto model, string hidden) => ShapeInference.Infer(model)[hidden].Dims?[^1].Value
        ?? throw new ArgumentException($"the width of the hidden state '{hidden}' under the output head is unknown; declare its shape");

    /// <summary>
    /// The pooled hidden state [batch, d] from <paramref name="hidden"/> ([batch, seq, d], or [batch·seq, d] under a
    /// Gemm head) and <paramref name="mask"/> (float [batch, seq], 1 = real token). Positions are picked by a one-hot
    /// product rather than a Gather, so the gradient is a Mul and a ReduceSum.
    /// </summary>
    public static string Pool(ModelProto model, GraphEditor g, string hidden, string inputIds, string mask, Pooling pooling)
    {
        var h = hidden;
        if (ShapeInference.Infer(model)[hidden].Rank == 2)
            h = g.Op("Reshape", [hidden, g.Op("Concat", [g.Op("Shape", [inputIds], "head/shape"), g.AddConstant("head/minus1", Tensors.Int64Vector("", -1))], "head/shape3", attributes: Attr.Int("axis", 0))], "head/hidden3");
        var axis1 = g.AddConstant("head/axis1", Tensors.Int64Vector("", 1));
        string weights;   // [batch, seq] float: the share of each position in the pooled state
        if (pooling == Pooling.Mean)
        {
            var count = g.Op("ReduceSum", [mask, axis1], "head/count", attributes: Attr.Int("keepdims", 1));   // [batch, 1]
            weights = g.Op("Mul", [mask, g.Op("Reciprocal", [g.Op("Max", [count, g.AddConstant("head/one_f", Tensors.Scalar("", DataType.Float, 1))], "head/count1")], "head/inv_count")], "head/mean_weights");
        }
        else
        {
            // ArgMax returns the first (or with select_last_index the last) position where the mask is 1
            var at = g.Op("ArgMax", [mask], "head/at", attributes: [Attr.Int("axis", 1), Attr.Int("keepdims", 1), Attr.Int("select_last_index", pooling == Pooling.Last ? 1 : 0)]);
            weights = g.Op("Cast", [g.Op("Equal", [Positions(g, inputIds), at], "head/is_at")], "head/select", attributes: Attr.Int("to", (int)DataType.Float));
        }
        var w3 = g.Op("Unsqueeze", [weights, g.AddConstant("head/axism1", Tensors.Int64Vector("", -1))], "head/weights3");   // [batch, seq, 1]
        return g.Op("ReduceSum", [g.Op("Mul", [h, w3], "head/weighted"), axis1], "head/pooled", attributes: Attr.Int("keepdims", 0));   // [batch, d]
    }

    /// <summary>The positions 0..seq−1 of <paramref name="inputIds"/> as a row [1, seq].</summary>
    static string Positions(GraphEditor g, string inputIds)
    {
        var seqLen = g.Op("Gather", [g.Op("Shape", [inputIds], "head/ids_shape"), g.AddConstant("head/one", Tensors.Int64("", [], [1]))], "head/seq");
        var positions = g.Op("Range", [g.AddConstant("head/zero", Tensors.Int64("", [], [0])), seqLen, g.AddConstant("head/step", Tensors.Int64("", [], [1]))], "head/positions");
        return g.Op("Unsqueeze", [positions, g.AddConstant("head/axis0", Tensors.Int64Vector("", 0))], "head/pos2");
    }

    /// <summary>A LoRA-adapted training head: the frozen seeded weight <see cref="Weight"/> and the branch's scale (A, B are inputs).</summary>
    public sealed record LoraBranch(TensorProto FrozenWeight, double Scale);

    /// <summary>
    /// The head of a classifier's train and eval models, in place: <see cref="Output"/> [batch, classes] from the
    /// hidden state under <paramref name="logits"/>, pooled over the first <paramref name="lengths"/> positions of each
    /// row (right padding), times <see cref="Weight"/> (an input), or with <paramref name="lora"/> times the frozen
    /// weight plus scale·(pooled·A)·B.
    /// </summary>
    public static void AddTrainingHead(ModelProto m, GraphEditor g, string logits, string inputIds, string lengths, Dim batch, int classes, Pooling pooling, LoraBranch? lora)
    {
        var (hidden, _) = FindHidden(g, logits);
        var row = Positions(g, inputIds);                                                                                 // [1, seq]
        var lengths2 = g.Op("Unsqueeze", [lengths, g.AddConstant("head/axis1", Tensors.Int64Vector("", 1))], "head/lengths2");   // [batch, 1]
        var mask = g.Op("Cast", [g.Op("Less", [row, lengths2], "head/is_real")], "head/mask", attributes: Attr.Int("to", (int)DataType.Float));
        var pooled = Pool(m, g, hidden, inputIds, mask, pooling);
        string classLogits;
        if (lora is null) classLogits = g.Op("MatMul", [pooled, Weight], "head/logits");
        else
        {
            g.AddInitializer(lora.FrozenWeight.Clone());
            var branch = g.Op("MatMul", [g.Op("MatMul", [pooled, LoraA], "head/lora_h"), LoraB], "head/lora");
            if (lora.Scale != 1) branch = g.Op("Mul", [branch, g.AddConstant("head/lora_scale", Tensors.Scalar("", DataType.Float, lora.Scale))], "head/lora_scaled");
            classLogits = g.Op("Add", [g.Op("MatMul", [pooled, Weight], "head/base"), branch], "head/logits");
        }
        g.AddNode("Identity", [classLogits], [Output], Output);
        m.Graph.ValueInfo.Add(ValueInfos.Tensor(Output, DataType.Float, batch, new Dim(classes)));
    }

    /// <summary>
    /// A classifier from a deployable (or merged) language model: outputs only <see cref="Output"/> [batch, classes],
    /// pooled by the model's attention_mask (an attention_mask input is added where the model has none). With
    /// <paramref name="headAsInput"/> the head is an input with a same-named default initializer, so that an adapter
    /// (ONNX Runtime's LoRA API) overrides it per request like A and B; otherwise it is baked in.
    /// </summary>
    public static ModelProto BuildClassifier(ModelProto model, float[] head, ClassifierInfo info, bool headAsInput, string source)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(head);
        var m = model.Clone();
        var g = new GraphEditor(m);
        ModelRoles roles;
        try { roles = SignatureRoles.Decide(m, null, source); }
        catch (ArgumentException e) { throw new InvalidDataException(e.Message, e); }
        var logits = roles.Logits;
        var (hidden, _) = FindHidden(g, logits);
        long d = HiddenWidth(m, hidden);
        if (head.Length != d * info.Classes) throw new ArgumentException($"{source}: the head has {head.Length} values, the model needs [{d}, {info.Classes}]");
        var idsInfo = m.Graph.Input.First(i => i.Name == roles.InputIds);
        var idsDims = ValueInfos.Dims(idsInfo) ?? [new Dim(null, "batch"), new Dim(null, "sequence")];
        var mask = roles.Input(IoRole.AttentionMask);
        if (mask is null)
        {
            mask = "attention_mask";
            if (g.IsGraphInput(mask) || g.Producer(mask) is not null) throw new InvalidDataException($"{source}: '{mask}' is a value of the model but not its attention mask; cannot add one for pooling");
            g.AddInput(ValueInfos.Tensor(mask, DataType.Int64, idsDims));
        }
        var maskF = g.Op("Cast", [mask], "head/mask", attributes: Attr.Int("to", (int)DataType.Float));
        var pooled = Pool(m, g, hidden, roles.InputIds, maskF, info.Pooling);
        g.AddInitializer(Tensors.Float(Weight, [d, info.Classes], head));
        if (headAsInput) g.AddInput(ValueInfos.Tensor(Weight, DataType.Float, new Dim(d), new Dim(info.Classes)));
        g.AddNode("Identity", [g.Op("MatMul", [pooled, Weight], "head/logits")], [Output], Output);
        m.Graph.Output.Clear();
        g.AddOutput(ValueInfos.Tensor(Output, DataType.Float, idsDims[0], new Dim(info.Classes)));
        g.RemoveDeadNodes();
        // inputs only the language-model outputs used (a KV cache) go too: nothing would feed them
        var used = m.Graph.Node.SelectMany(n => n.Input).ToHashSet(StringComparer.Ordinal);
        foreach (var input in m.Graph.Input.Where(i => !used.Contains(i.Name) && i.Name != mask).ToList()) m.Graph.Input.Remove(input);
        g.SortTopologically();
        SetInfo(m, info);
        return m;
    }

    /// <summary>Records <paramref name="info"/> in the model's metadata.</summary>
    public static void SetInfo(ModelProto model, ClassifierInfo info)
    {
        foreach (var p in model.MetadataProps.Where(p => p.Key == MetadataKey).ToList()) model.MetadataProps.Remove(p);
        model.MetadataProps.Add(new StringStringEntryProto { Key = MetadataKey, Value = ToJson(info) });
    }

    /// <summary>The JSON <see cref="SetInfo"/> and adapter metadata hold.</summary>
    public static string ToJson(ClassifierInfo info) => JsonSerializer.Serialize(info, ClassifierInfo.Json);

    /// <summary>The classifier metadata of a model (ONNX Runtime's custom metadata map or the proto's), or null.</summary>
    public static ClassifierInfo? ReadInfo(IReadOnlyDictionary<string, string> metadata, string source)
    {
        if (!metadata.TryGetValue(MetadataKey, out var json)) return null;
        try
        {
            var info = JsonSerializer.Deserialize<ClassifierInfo>(json, ClassifierInfo.Json) ?? throw new JsonException("null");
            if (!Enum.IsDefined(info.Pooling)) throw new JsonException($"pooling {(int)info.Pooling} is not one of last, first, mean");
            return info.Classes >= 2 ? info : throw new JsonException($"classes is {info.Classes}");
        }
        catch (JsonException e) { throw new InvalidDataException($"{source}: metadata '{MetadataKey}' is not valid ({e.Message})", e); }
    }

    /// <summary>A LoRA-adapted head folded into one weight: W + scale·A·B ([d, classes]), as every deployed form takes it.</summary>
    public static float[] Fold(float[] w, float[] a, float[] b, long d, long rank, long classes, double scale)
    {
        if (w.Length != d * classes || a.Length != d * rank || b.Length != rank * classes)
            throw new ArgumentException($"head LoRA shapes do not fit: W {w.Length}, A {a.Length}, B {b.Length} values for d={d}, r={rank}, classes={classes}");
        var folded = (float[])w.Clone();
        for (long i = 0; i < d; i++)
            for (long c = 0; c < classes; c++)
            {
                double s = 0;
                for (long k = 0; k < rank; k++) s += a[i * rank + k] * (double)b[k * classes + c];
                folded[i * classes + c] = (float)(w[i * classes + c] + scale * s);
            }
        return folded;
    }
}
