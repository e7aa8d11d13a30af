using Onnx;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Graphs;

/// <summary>
/// The checks a model from a stranger passes before rewrite, merge or train reads it, so that a broken model fails
/// at once with a one-line error naming the node or tensor, instead of later inside ONNX Runtime or as a wrong output:
/// opset present and runnable, at least one input, every tensor's data matching its dims, unique initializer and
/// output names, every node input defined, every op known, and linear layers multiplying operands of one type.
/// </summary>
public static class ModelValidator
{
    /// <summary>
    /// The newest ai.onnx opset the ONNX Runtime we ship (1.32) runs: it refuses 29 at load ("official support for
    /// domain ai.onnx is till opset 28"); a test pins this against the real session. <see cref="OnnxOps"/> lists the
    /// ops of opsets 1–26, so an op new in 27 or 28 is refused as unknown until it is added there.
    /// </summary>
    public const long MaxOpset = 28;

    /// <summary>Throws <see cref="OnnxFormatException"/> naming <paramref name="source"/> and the first fault found.</summary>
    public static void Check(ModelProto model, string source)
    {
        ArgumentNullException.ThrowIfNull(model);
        OnnxFormatException Bad(string what) => new($"{source}: {what}");
        var g = model.Graph ?? throw Bad("has no graph");

        var opsets = new Dictionary<string, long>(StringComparer.Ordinal);
        foreach (var o in model.OpsetImport)
            if (!opsets.TryAdd(o.Domain == "ai.onnx" ? "" : o.Domain, o.Version)) throw Bad($"imports domain '{o.Domain}' twice in opset_import");
        if (!opsets.TryGetValue("", out var opset))
            throw Bad("imports no ai.onnx opset (opset_import has no default domain); re-export the model with an opset");
        if (opset < 1 || opset > MaxOpset)
            throw Bad($"ai.onnx opset {opset} is not one ONNX Runtime runs (1..{MaxOpset}); re-export with opset ≤ {MaxOpset}");

        var initializers = new HashSet<string>(StringComparer.Ordinal);
        foreach (var t in g.Initializer)
            if (!initializers.Add(t.Name)) throw Bad($"initializer '{t.Name}' is defined twice");
        foreach (var t in OnnxFile.AllTensors(g)) CheckTensorData(t, Bad);
        if (!g.Input.Any(i => !initializers.Contains(i.Name)))
            throw Bad("the graph has no inputs (a model to adapt takes at least input_ids)");
        var outputs = new HashSet<string>(StringComparer.Ordinal);
        foreach (var o in g.Output)
            if (!outputs.Add(o.Name)) throw Bad($"graph output '{o.Name}' is listed twice");

        var functions = model.Functions.Select(f => (f.Domain, f.Name)).ToHashSet();
        CheckNodes(g, new HashSet<string>(StringComparer.Ordinal), opsets, functions, Bad);
        foreach (var o in g.Output)
            if (!Defined(g, o.Name)) throw Bad($"graph output '{o.Name}' is produced by no node, input or initializer");
        CheckLinearTypes(model, Bad);
    }

    static bool Defined(GraphProto g, string name) =>
        g.Input.Any(i => i.Name == name) || g.Initializer.Any(t => t.Name == name) || g.Node.Any(n => n.Output.Contains(name));

    /// <summary>Every node's op is known and its inputs are defined (in this graph or, for subgraphs, an outer one).</summary>
    static void CheckNodes(GraphProto g, HashSet<string> outer, Dictionary<string, long> opsets, HashSet<(string, string)> functions, Func<string, OnnxFormatException> bad)
    {
        var defined = new HashSet<string>(outer, StringComparer.Ordinal);
        defined.UnionWith(g.Input.Select(i => i.Name));
        defined.UnionWith(g.Initializer.Select(t => t.Name));
        defined.UnionWith(g.SparseInitializer.Select(s => s.Values.Name));
        foreach (var n in g.Node)
            foreach (var o in n.Output.Where(o => o.Length > 0))
                if (!defined.Add(o) && !outer.Contains(o)) throw bad($"value '{o}' is produced twice (again by {Describe(n)})");
        foreach (var n in g.Node)
        {
            var domain = n.Domain == "ai.onnx" ? "" : n.Domain;
            if (!functions.Contains((n.Domain, n.OpType)))
            {
                if (!opsets.ContainsKey(domain)) throw bad($"{Describe(n)} uses domain '{n.Domain}', which opset_import does not import");
                bool known = domain switch
                {
                    "" => OnnxOps.Contains(n.OpType),
                    "com.microsoft" => MicrosoftOps.Contains(n.OpType),
                    _ => false,
                };
                if (!known) throw bad($"{Describe(n)}: unknown op '{(domain == "" ? "" : domain + ".")}{n.OpType}' (not an ONNX op, nor a com.microsoft op OnnxLora knows)");
            }
            foreach (var i in n.Input)
                if (i.Length > 0 && !defined.Contains(i)) throw bad($"{Describe(n)} reads '{i}', which no node, input or initializer defines");
            foreach (var a in n.Attribute)
            {
                if (a.G is not null) CheckNodes(a.G, defined, opsets, functions, bad);
                foreach (var sub in a.Graphs) CheckNodes(sub, defined, opsets, functions, bad);
            }
        }
    }

    static string Describe(NodeProto n) => $"node '{(n.Name.Length > 0 ? n.Name : n.Output.FirstOrDefault() ?? "?")}' ({n.OpType})";

    /// <summary>raw_data, or the typed field, holds exactly dims' worth of elements.</summary>
    static void CheckTensorData(TensorProto t, Func<string, OnnxFormatException> bad)
    {
        var type = (DataType)t.DataType;
        if (type == DataType.Undefined) throw bad($"tensor '{t.Name}' has no data_type");
        long count = Tensors.ElementCount(t.Dims)
            ?? throw bad($"tensor '{t.Name}' has dims [{string.Join(", ", t.Dims)}], negative or with a product past int64");
        if (type == DataType.String)
        {
            if (t.StringData.Count != count) throw bad($"tensor '{t.Name}' has {t.StringData.Count} strings, dims [{string.Join(", ", t.Dims)}] need {count}");
            return;
        }
        int size;
        try { size = Tensors.ElementSize(type); }
        catch (NotSupportedException) { return; }                    // 4-bit and newer float8 types: ORT checks their packing
        if (t.RawData.Length > 0 || count == 0)
        {
            long need = Tensors.ByteCount(t.Dims, size) ?? throw bad($"tensor '{t.Name}': dims [{string.Join(", ", t.Dims)}] of {type} overflow int64 bytes");
            if (t.RawData.Length != need && !(count == 0 && t.RawData.Length == 0))
                throw bad($"tensor '{t.Name}' has {t.RawData.Length} bytes of raw_data, dims [{string.Join(", ", t.Dims)}] of {type} need {need}");
            return;
        }
        long held = type switch
        {
            DataType.Float => t.FloatData.Count,
            DataType.Complex64 => t.FloatData.Count / 2,
            DataType.Double => t.DoubleData.Count,
            DataType.Complex128 => t.DoubleData.Count / 2,
            DataType.Int64 => t.Int64Data.Count,
            DataType.Uint32 or DataType.Uint64 => t.Uint64Data.Count,
            _ => t.Int32Data.Count,
        };
        if (held != count) throw bad($"tensor '{t.Name}' holds {held} values, dims [{string.Join(", ", t.Dims)}] need {count}");
    }

    /// <summary>MatMul/Gemm operands of one element type: an integer weight under a float activation fails in ORT, not here.</summary>
    static void CheckLinearTypes(ModelProto model, Func<string, OnnxFormatException> bad)
    {
        var g = new GraphEditor(model);
        IReadOnlyDictionary<string, ValueShape> shapes;
        try { shapes = ShapeInference.Infer(model); }
        catch (InvalidOperationException e) { throw bad(e.Message); }   // a cycle: TopologicalOrder names the node
        foreach (var n in model.Graph.Node)
        {
            if (n.OpType is not ("MatMul" or "Gemm" or "FusedMatMul") || n.Input.Count < 2) continue;
            int a = shapes.TryGetValue(n.Input[0], out var sa) ? sa.ElemType : g.ElemTypeOf(n.Input[0]);
            int b = shapes.TryGetValue(n.Input[1], out var sb) ? sb.ElemType : g.ElemTypeOf(n.Input[1]);
            if (a != 0 && b != 0 && a != b)
                throw bad($"{Describe(n)} multiplies {(DataType)a} '{n.Input[0]}' by {(DataType)b} '{n.Input[1]}'; both operands must have one type");
        }
    }

    /// <summary>The ai.onnx operators of opsets 1–26 (functions included), from the ONNX operator list.</summary>
    static readonly HashSet<string> OnnxOps = new(StringComparer.Ordinal)
    {
        "Abs", "Acos", "Acosh", "Add", "AffineGrid", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
        "AveragePool", "BatchNormalization", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
        "BitCast", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "CenterCropPad", "Clip", "Col2Im", "Compress", "Concat",
        "ConcatFromSequence", "Constant", "ConstantOfShape", "Conv", "ConvInteger", "ConvTranspose", "Cos", "Cosh", "CumProd", "CumSum",
        "DFT", "DeformConv", "DepthToSpace", "DequantizeLinear", "Det", "Div", "Dropout", "DynamicQuantizeLinear", "Einsum",
        "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements", "GatherND",
        "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
        "GroupNormalization", "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If",
        "ImageDecoder", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu", "Less",
        "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul", "MatMulInteger", "Max", "MaxPool",
        "MaxRoiPool", "MaxUnpool", "Mean", "MeanVarianceNormalization", "MelWeightMatrix", "Min", "Mish", "Mod", "Mul",
        "Multinomial", "Neg", "NegativeLogLikelihoodLoss", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Optional",
        "OptionalGetElement", "OptionalHasElement", "Or", "PRelu", "Pad", "Pow", "QLinearConv", "QLinearMatMul",
        "QuantizeLinear", "RMSNormalization", "RNN", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
        "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "RegexFullMatch", "Relu", "Reshape", "Resize",
        "ReverseSequence", "RoiAlign", "RotaryEmbedding", "Round", "STFT", "Scan", "Scatter", "ScatterElements", "ScatterND",
        "Selu", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
        "SequenceMap", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax",
        "SoftmaxCrossEntropyLoss", "Softplus", "Softsign", "SpaceToDepth", "Split", "SplitToSequence", "Sqrt", "Squeeze",
        "StringConcat", "StringNormalizer", "StringSplit", "Sub", "Sum", "Swish", "Tan", "Tanh", "TensorScatter", "TfIdfVectorizer", "ThresholdedRelu",
        "Tile", "TopK", "Transpose", "Trilu", "Unique", "Unsqueeze", "Upsample", "Where", "Xor",
        // ONNX Runtime registers these contrib ops in the default domain; its transformer optimizer emits them
        "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
    };

    /// <summary>com.microsoft ops that OnnxLora writes (FusedMatMul, Gelu) or that ORT's transformer exports use.</summary>
    static readonly HashSet<string> MicrosoftOps = new(StringComparer.Ordinal)
    {
        "Attention", "BiasAdd", "BiasGelu", "BiasSoftmax", "DecoderMaskedMultiHeadAttention", "DequantizeLinear",
        "EmbedLayerNormalization", "FastGelu", "FusedMatMul", "Gelu", "GemmFastGelu", "GroupQueryAttention", "MatMulNBits",
        "MultiHeadAttention", "PackedMultiHeadAttention", "QuantizeLinear", "QuickGelu", "RotaryEmbedding",
        "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "Trilu",
    };
}
