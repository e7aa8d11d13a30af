using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Rewrite;

/// <summary>Small graphs in the shapes real exporters write, built in the tests, plus an ORT runner with generic feeds.</summary>
static class RewriteTestModels
{
    public const int Vocab = 12, Channels = 8, Hidden = 16;

    static float[] Random(int n, int seed, double scale = 0.3)
    {
        var r = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => (float)((r.NextDouble() * 2 - 1) * scale)).ToArray();
    }

    static ModelProto NewModel()
    {
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "test" }, ProducerName = "rewrite-tests" };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        return model;
    }

    /// <summary>
    /// A one-and-a-half-block GPT-like graph covering the cases: a tied head (Gather + Transpose of one initializer),
    /// torch-style anonymous weights named by node scope, a meaningful weight behind a Transpose, attention-like
    /// activation×activation MatMuls, Conv1D-style Gemm on a 2-D view (transB 0 and 1, with bias), one weight used by two
    /// MatMuls (deduplicated initializer), a float16 weight behind a Cast, and a com.microsoft.FusedMatMul with transB.
    /// </summary>
    public static ModelProto KitchenSink()
    {
        var model = NewModel();
        var g = new GraphEditor(model);
        int C = Channels, H = Hidden, seed = 1;
        g.AddInput(ValueInfos.Tensor("input_ids", DataType.Int64, "batch", "seq"));
        g.AddInitializer(Tensors.Float("transformer.wte.weight", [Vocab, C], Random(Vocab * C, seed++)));
        var h0 = Node(g, "Gather", ["transformer.wte.weight", "input_ids"], "/transformer/wte/Gather");            // [b, s, C]

        g.AddInitializer(Tensors.Float("onnx::MatMul_101", [C, C], Random(C * C, seed++)));
        var q = Node(g, "MatMul", [h0, "onnx::MatMul_101"], "/blocks/blocks.0/att/W_query/MatMul");
        g.AddInitializer(Tensors.Float("blocks.0.att.W_key.weight", [C, C], Random(C * C, seed++)));           // [out, in] as nn.Linear
        var wkT = Node(g, "Transpose", ["blocks.0.att.W_key.weight"], "/blocks/blocks.0/att/W_key/Transpose");
        var k = Node(g, "MatMul", [h0, wkT], "/blocks/blocks.0/att/W_key/MatMul");
        g.AddInitializer(Tensors.Float("onnx::MatMul_103", [C, C], Random(C * C, seed++)));
        var v = Node(g, "MatMul", [h0, "onnx::MatMul_103"], "/blocks/blocks.0/att/W_value/MatMul");
        var kt = Node(g, "Transpose", [k], "/blocks/blocks.0/att/Transpose", Attr.Ints("perm", 0, 2, 1));
        var scores = Node(g, "MatMul", [q, kt], "/blocks/blocks.0/att/MatMul");                                  // activation × activation
        var probs = Node(g, "Softmax", [scores], "/blocks/blocks.0/att/Softmax", Attr.Int("axis", -1));
        var ctx = Node(g, "MatMul", [probs, v], "/blocks/blocks.0/att/MatMul_1");                               // activation × activation
        var x2 = Node(g, "Add", [h0, ctx], "/blocks/blocks.0/Add");

        var flat = g.AddConstant("flat_shape", Tensors.Int64Vector("", -1, C));
        var x2d = Node(g, "Reshape", [x2, flat], "/blocks/blocks.0/mlp/Reshape");                               // [b·s, C]
        g.AddInitializer(Tensors.Float("blocks.0.mlp.c_fc.weight", [C, H], Random(C * H, seed++)));
        g.AddInitializer(Tensors.Float("blocks.0.mlp.c_fc.bias", [H], Random(H, seed++)));
        var f = Node(g, "Gemm", [x2d, "blocks.0.mlp.c_fc.weight", "blocks.0.mlp.c_fc.bias"], "/blocks/blocks.0/mlp/c_fc/Gemm");
        var fr = Node(g, "Relu", [f], "/blocks/blocks.0/mlp/Relu");
        g.AddInitializer(Tensors.Float("blocks.0.mlp.c_proj.weight", [C, H], Random(C * H, seed++)));          // [out, in], transB
        g.AddInitializer(Tensors.Float("blocks.0.mlp.c_proj.bias", [C], Random(C, seed++)));
        var p = Node(g, "Gemm", [fr, "blocks.0.mlp.c_proj.weight", "blocks.0.mlp.c_proj.bias"], "/blocks/blocks.0/mlp/c_proj/Gemm", Attr.Int("transB", 1));
        var shape = Node(g, "Shape", [x2], "/blocks/blocks.0/mlp/Shape");
        var p3 = Node(g, "Reshape", [p, shape], "/blocks/blocks.0/mlp/Reshape_1");
        var x3 = Node(g, "Add", [x2, p3], "/blocks/blocks.0/Add_1");

        g.AddInitializer(Tensors.Float("onnx::MatMul_110", [C, C], Random(C * C, seed++)));                    // used twice
        var u1 = Node(g, "MatMul", [x3, "onnx::MatMul_110"], "/blocks/blocks.1/ff/ff.0/MatMul");
        var u1r = Node(g, "Relu", [u1], "/blocks/blocks.1/ff/ff.1/Relu");
        var u2 = Node(g, "MatMul", [u1r, "onnx::MatMul_110"], "/blocks/blocks.1/ff/ff.2/MatMul");
        g.AddInitializer(Tensors.FromDoubles("blocks.1.proj.weight", DataType.Float16, [C, C], Array.ConvertAll(Random(C * C, seed++), x => (double)x)));
        var wc = Node(g, "Cast", ["blocks.1.proj.weight"], "/blocks/blocks.1/proj/Cast", Attr.Int("to", (int)DataType.Float));
        var u3 = Node(g, "MatMul", [u2, wc], "/blocks/blocks.1/proj/MatMul");
        var x4 = Node(g, "Add", [x3, u3], "/blocks/blocks.1/Add");

        // com.microsoft.FusedMatMul with transB, as ORT's optimizer and our backward graphs write it
        g.EnsureOpset("com.microsoft", 1);
        g.AddInitializer(Tensors.Float("onnx::FusedMatMul_120", [C, C], Random(C * C, seed++)));               // [out, in]
        var u4 = g.Op("FusedMatMul", [x4, "onnx::FusedMatMul_120"], "blocks.2.fused_out", "com.microsoft", Attr.Int("transB", 1));
        g.Graph.Node[^1].Name = "/blocks/blocks.2/fused/FusedMatMul";
        g.Reindex();
        var x5 = Node(g, "Add", [x4, u4], "/blocks/blocks.2/Add");

        var eT = Node(g, "Transpose", ["transformer.wte.weight"], "/lm_head/Transpose");
        g.AddNode("MatMul", [x5, eT], ["logits"], "/lm_head/MatMul");
        g.AddOutput(ValueInfos.Tensor("logits", DataType.Float, "batch", "seq", Vocab));
        return model;
    }

    /// <summary>A plain two-layer MLP without a tied head: x [batch, 4] → MatMul+Add → Relu → MatMul → y [batch, 3].</summary>
    public static ModelProto Mlp()
    {
        var model = NewModel();
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, "batch", 4));
        g.AddInitializer(Tensors.Float("fc1.weight", [4, 6], Random(24, 7)));
        g.AddInitializer(Tensors.Float("fc1.bias", [6], Random(6, 8)));
        var h = Node(g, "MatMul", ["x", "fc1.weight"], "/fc1/MatMul");
        var hb = Node(g, "Add", [h, "fc1.bias"], "/fc1/Add");
        var r = Node(g, "Relu", [hb], "/Relu");
        g.AddInitializer(Tensors.Float("fc2.weight", [6, 3], Random(18, 9)));
        g.AddNode("MatMul", [r, "fc2.weight"], ["y"], "/fc2/MatMul");
        g.AddOutput(ValueInfos.Tensor("y", DataType.Float, "batch", 3));
        return model;
    }

    /// <summary>Only activation×activation MatMuls: nothing to adapt.</summary>
    public static ModelProto NoWeights()
    {
        var model = NewModel();
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("a", DataType.Float, 2, 3));
        g.AddInput(ValueInfos.Tensor("b", DataType.Float, 3, 2));
        g.AddNode("MatMul", ["a", "b"], ["c"], "/MatMul");
        g.AddOutput(ValueInfos.Tensor("c", DataType.Float, 2, 2));
        return model;
    }

    static string Node(GraphEditor g, string op, string[] inputs, string name, params AttributeProto[] attributes)
    {
        var output = g.UniqueName(name.TrimStart('/').Replace('/', '.') + "_out");
        g.AddNode(op, inputs, [output], name, "", attributes);
        return output;
    }

    // ---- running in ORT ----

    /// <summary>Feeds for a model's non-initializer inputs: token ids below the embedding size, masks of ones, random floats.</summary>
    public static Dictionary<string, (Array Data, long[] Shape)> Feeds(ModelProto model, int batch = 2, int seq = 5, int seed = 3)
    {
        var r = new Random(seed);
        var inits = new HashSet<string>(model.Graph.Initializer.Select(i => i.Name));
        long vocab = model.Graph.Node.Where(n => n.OpType == "Gather")
            .Select(n => model.Graph.Initializer.FirstOrDefault(i => i.Name == n.Input[0]))
            .Where(t => t is { Dims.Count: 2 }).Select(t => t!.Dims[0]).DefaultIfEmpty(10).Max();
        var feeds = new Dictionary<string, (Array, long[])>();
        foreach (var input in model.Graph.Input.Where(i => !inits.Contains(i.Name)))
        {
            var dims = ValueInfos.Dims(input) ?? [];
            // an empty cache: past length 0, and a mask over "past_sequence_length + sequence_length" as long as the tokens
            var shape = dims.Select((d, i) => d.Value ?? (d.Param is { } p && p.Contains("past") && !p.Contains('+') ? 0 : i == 0 ? batch : seq)).ToArray();
            int n = (int)shape.Aggregate(1L, (a, b) => a * b);
            var type = (DataType)ValueInfos.ElemType(input);
            Array data = type switch
            {
                DataType.Int64 when input.Name.Contains("mask") => Enumerable.Repeat(1L, n).ToArray(),
                DataType.Int64 when input.Name.Contains("position") => Enumerable.Range(0, n).Select(i => (long)(i % shape[^1])).ToArray(),
                DataType.Int64 when input.Name.Contains("token_type") => new long[n],   // segment ids: 0 (an encoder has 2 segments)
                DataType.Int64 => Enumerable.Range(0, n).Select(_ => (long)r.Next((int)vocab)).ToArray(),
                DataType.Float => Enumerable.Range(0, n).Select(_ => (float)(r.NextDouble() * 2 - 1)).ToArray(),
                _ => throw new NotSupportedException($"test feed for input '{input.Name}' of type {type}"),
            };
            feeds[input.Name] = (data, shape);
        }
        return feeds;
    }

    /// <summary>Runs a model in ORT (CPU EP) and returns the requested outputs as float64 arrays with their shapes.</summary>
    public static Dictionary<string, (double[] Data, long[] Shape)> Run(ModelProto model, IReadOnlyDictionary<string, (Array Data, long[] Shape)> feeds,
                                                                       IEnumerable<string>? outputs = null)
    {
        // full optimizations, as deployments run: LoRA defaults must stay overridable (never constant-folded)
        using var options = new SessionOptions { GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL };
        using var session = new InferenceSession(model.ToByteArray(), options);
        var names = (outputs ?? model.Graph.Output.Select(o => o.Name)).ToList();
        var values = new List<OrtValue>();
        try
        {
            foreach (var (_, (data, shape)) in feeds)
                values.Add(data switch
                {
                    float[] f => OrtValue.CreateTensorValueFromMemory(f, shape),
                    long[] l => OrtValue.CreateTensorValueFromMemory(l, shape),
                    bool[] b => OrtValue.CreateTensorValueFromMemory(b, shape),
                    _ => throw new NotSupportedException(data.GetType().Name),
                });
            using var run = new RunOptions();
            using var results = session.Run(run, feeds.Keys.ToList(), values, names);
            var map = new Dictionary<string, (double[], long[])>();
            for (int i = 0; i < names.Count; i++)
            {
                var info = results[i].GetTensorTypeAndShape();
                double[] d = info.ElementDataType switch
                {
                    TensorElementType.Float => Array.ConvertAll(results[i].GetTensorDataAsSpan<float>().ToArray(), x => (double)x),
                    TensorElementType.Float16 => Array.ConvertAll(results[i].GetTensorDataAsSpan<Float16>().ToArray(), x => (double)(float)x),
                    _ => throw new NotSupportedException(info.ElementDataType.ToString()),
                };
                map[names[i]] = (d, info.Shape);
            }
            return map;
        }
        finally
        {
            foreach (var v in values) v.Dispose();
        }
    }

    /// <summary>A copy of <paramref name="model"/> that also outputs the given intermediate values (float).</summary>
    public static ModelProto WithOutputs(ModelProto model, IEnumerable<string> values)
    {
        var copy = model.Clone();
        foreach (var v in values.Distinct())
            if (!copy.Graph.Output.Any(o => o.Name == v)) copy.Graph.Output.Add(ValueInfos.Tensor(v, (int)DataType.Float, null));
        return copy;
    }

    public static double MaxAbsDiff(double[] a, double[] b)
    {
        Assert.That(a.Length, Is.EqualTo(b.Length));
        double m = 0;
        for (int i = 0; i < a.Length; i++) m = Math.Max(m, Math.Abs(a[i] - b[i]));
        return m;
    }

    /// <summary>
    /// Model files under tests/fixtures (torch exports, our builder's), copied to the test output folder; not the fuzz
    /// corpus (fixtures/fuzz), whose models lean on files the fuzz harness writes beside them.
    /// </summary>
    public static IEnumerable<string> FixtureFiles()
    {
        var dir = Path.Combine(AppContext.BaseDirectory, "fixtures");
        var fuzz = Path.Combine(dir, "fuzz") + Path.DirectorySeparatorChar;
        return Directory.Exists(dir)
            ? Directory.EnumerateFiles(dir, "*.onnx", SearchOption.AllDirectories).Where(f => !f.StartsWith(fuzz, StringComparison.Ordinal)).Order()
            : [];
    }
}
