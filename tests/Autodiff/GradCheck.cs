using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using Onnx;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Autodiff;

/// <summary>One input of a gradient-check row: a random tensor that requires grad, or a fixed constant.</summary>
public sealed record In(long[] Shape, TensorProto? Constant = null, double Low = -1, double High = 1, bool Grad = true)
{
    public static In R(params long[] shape) => new(shape);
    /// <summary>Random values in [low, high] (for ops that need positive inputs or values away from a kink).</summary>
    public static In Range(double low, double high, params long[] shape) => new(shape, Low: low, High: high);
    /// <summary>A random float input that is fed but not differentiated.</summary>
    public static In Frozen(params long[] shape) => new(shape, Grad: false);
    public static In Ints(params long[] values) => new([values.Length], Tensors.Int64Vector("", values));
    public static In Const(TensorProto t) => new(t.Dims.ToArray(), t);
    /// <summary>An omitted optional input ("").</summary>
    public static In Empty => new([], Grad: false) { IsEmpty = true };
    public bool IsEmpty { get; init; }
}

/// <summary>
/// Central finite differences against the gradient graph, run in ORT CPU. The checked function is
/// loss = Σₖ Σ Yₖ ⊙ Rₖ with fixed random Rₖ, so every output element's gradient is exercised with a distinct weight.
/// </summary>
public static class GradCheck
{
    public sealed record Result(double MaxError, string Where, int Seed);

    public static Result Run(string op, In[] inputs, AttributeProto[] attrs, DataType type, int seed, int outputs = 1,
                             string domain = "", int opset = 17, bool plainMatMul = true, int[]? usedOutputs = null)
    {
        var rng = new Random(seed);
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "check" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = opset });
        if (domain.Length > 0) model.OpsetImport.Add(new OperatorSetIdProto { Domain = domain, Version = 1 });
        var g = new GraphEditor(model);
        var feeds = new List<(string Name, long[] Shape, double[] Values)>();
        var names = new List<string>();
        for (int i = 0; i < inputs.Length; i++)
        {
            var input = inputs[i];
            if (input.IsEmpty) { names.Add(""); continue; }
            if (input.Constant is { } c) { names.Add(g.AddConstant($"c{i}", c.Clone())); continue; }
            var name = $"x{i}";
            var values = Enumerable.Range(0, (int)input.Shape.Aggregate(1L, (a, b) => a * b))
                .Select(_ => input.Low + (input.High - input.Low) * rng.NextDouble()).ToArray();
            g.AddInput(ValueInfos.Tensor(name, type, input.Shape.Select(d => new Dim(d)).ToArray()));
            feeds.Add((name, input.Shape, values));
            names.Add(name);
        }
        var outs = Enumerable.Range(0, outputs).Select(k => $"y{k}").ToArray();
        g.AddNode(op, names, outs, "op", domain, attrs);

        // loss = Σₖ ReduceSum(Yₖ ⊙ Rₖ)
        var shapes = ShapeInference.Infer(model);
        var terms = new List<string>();
        foreach (var k in usedOutputs ?? Enumerable.Range(0, outputs).ToArray())
        {
            var s = shapes[outs[k]];
            Assert.That(s.IsStatic, Is.True, $"shape inference left {outs[k]} of {op} as {s}");
            var dims = s.Dims!.Select(d => d.Value!.Value).ToArray();
            var r = Enumerable.Range(0, (int)dims.Aggregate(1L, (a, b) => a * b)).Select(_ => rng.NextDouble() * 2 - 1).ToArray();
            var rName = g.AddConstant($"r{k}", Tensors.FromDoubles("", (DataType)s.ElemType, dims, r));
            terms.Add(g.Op("ReduceSum", [g.Op("Mul", [outs[k], rName])], "term", attributes: Attr.Int("keepdims", 0)));
        }
        var loss = terms.Count == 1 ? terms[0] : g.Op("Sum", terms.ToArray(), "loss");
        int lossType = shapes[outs[(usedOutputs ?? [0])[0]]].ElemType;
        g.AddOutput(ValueInfos.Tensor(loss, lossType, []));
        var one = g.AddConstant("one", Tensors.Scalar("", (DataType)lossType, 1));

        var wrt = feeds.Select(f => f.Name).Where(n => inputs[int.Parse(n[1..])].Grad).ToList();
        var grads = GradientBuilder.Build(model, new Dictionary<string, string> { [loss] = one }, wrt, new GradientOptions { PlainMatMul = plainMatMul });
        foreach (var p in wrt) g.AddOutput(ValueInfos.Tensor(grads[p], (int)type, null));

        using var options = new SessionOptions { LogSeverityLevel = OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR };
        using var session = new InferenceSession(model.ToByteArray(), options);
        double Loss(List<(string Name, long[] Shape, double[] Values)> f) => RunOnce(session, f, type, [loss])[0][0];
        var analytic = RunOnce(session, feeds, type, wrt.Select(p => grads[p]).ToArray());

        double h = type == DataType.Double ? 1e-6 : 1e-2;
        double worst = 0; string where = "";
        for (int w = 0; w < wrt.Count; w++)
        {
            int fi = feeds.FindIndex(f => f.Name == wrt[w]);
            var values = feeds[fi].Values;
            for (int e = 0; e < values.Length; e++)
            {
                double keep = values[e];
                values[e] = keep + h; double up = Loss(feeds);
                values[e] = keep - h; double down = Loss(feeds);
                values[e] = keep;
                double numeric = (up - down) / (2 * h);
                double err = Math.Abs(analytic[w][e] - numeric) / Math.Max(1, Math.Abs(numeric));
                if (err > worst) { worst = err; where = $"d{wrt[w]}[{e}]: graph {analytic[w][e]:G6}, finite difference {numeric:G6}"; }
            }
        }
        return new Result(worst, where, seed);
    }

    static double[][] RunOnce(InferenceSession session, List<(string Name, long[] Shape, double[] Values)> feeds, DataType type, string[] outputs)
    {
        var values = feeds.Select(f => type == DataType.Double
            ? OrtValue.CreateTensorValueFromMemory(f.Values.ToArray(), f.Shape)
            : OrtValue.CreateTensorValueFromMemory(Array.ConvertAll(f.Values, v => (float)v), f.Shape)).ToList();
        try
        {
            using var runOptions = new RunOptions();
            using var results = session.Run(runOptions, feeds.Select(f => f.Name).ToList(), values, outputs);
            return results.Select(r => r.GetTensorTypeAndShape().ElementDataType == TensorElementType.Double
                ? r.GetTensorDataAsSpan<double>().ToArray()
                : Array.ConvertAll(r.GetTensorDataAsSpan<float>().ToArray(), x => (double)x)).ToArray();
        }
        finally { foreach (var v in values) v.Dispose(); }
    }
}
