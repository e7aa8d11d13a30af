using Onnx;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using static OnnxLora.Tests.Autodiff.In;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Autodiff;

/// <summary>
/// Every gradient rule against central finite differences. float64 rows use h = 1e-6 and a relative tolerance of 1e-6
/// (truncation error is O(h²) ≈ 1e-12, rounding ≈ 1e-16/h ≈ 1e-10). Rows marked float32 run ops whose ORT CPU
/// kernel has no float64 version (FusedMatMul, the production spelling of dX = dY·Wᵀ; Erf): h = 1e-2. Their floor:
/// the loss Σ r·y over n ≤ 48 terms of size ≲ 1 is rounded to float32 (unit 6e-8) with an error ≈ √n·6e-8·|L| ≲ 2e-6,
/// which the difference quotient divides by 2h (≈ 1e-4), plus the O(h²) truncation h²/6·|f‴| ≲ 4e-5 (Erf, Gelu,
/// LayerNormalization; zero for the linear MatMuls). Tolerance 2e-4 stays above that floor (observed worst: 2.3e-5)
/// and far below the O(1) error of a wrong rule.
/// </summary>
public class GradientRuleTests
{
    public sealed record Row(string Name, string Op, In[] Inputs, AttributeProto[]? Attrs = null, int Outputs = 1,
                             string Domain = "", int Opset = 17, bool Float32 = false, int[]? Used = null)
    {
        public override string ToString() => Name;
    }

    static AttributeProto I(string n, long v) => Attr.Int(n, v);
    static AttributeProto Ints_(string n, params long[] v) => Attr.Ints(n, v);
    static AttributeProto F(string n, float v) => Attr.Float(n, v);
    static AttributeProto S(string n, string v) => Attr.Str(n, v);
    static In Scalar(double v) => Const(Tensors.Double("", [], [v]));
    static In Bools(long[] shape, params bool[] v) => Const(Tensors.Bool("", shape, v));

    public static IEnumerable<Row> Rows() =>
    [
        new("Add broadcast [2,3]+[3]", "Add", [R(2, 3), R(3)]),
        new("Add broadcast both [2,1,3]+[4,1]", "Add", [R(2, 1, 3), R(4, 1)]),
        new("Sub [2,3]-[2,1]", "Sub", [R(2, 3), R(2, 1)]),
        new("Mul [2,3,4]*[1,4]", "Mul", [R(2, 3, 4), R(1, 4)]),
        new("Mul same input shape", "Mul", [R(3, 2), R(3, 2)]),
        new("Max broadcast [2,3] vs [3]", "Max", [R(2, 3), R(3)]),
        new("Min broadcast [2,1,3] vs [4,1]", "Min", [R(2, 1, 3), R(4, 1)]),
        new("Div [2,3]/[3]", "Div", [R(2, 3), Range(0.5, 1.5, 3)]),
        new("Sum variadic", "Sum", [R(2, 3), R(3), R(1, 1)]),
        new("Neg", "Neg", [R(2, 3)]),
        new("Pow const exponent 3", "Pow", [Range(0.5, 1.5, 2, 3), Scalar(3)]),
        new("Pow both inputs", "Pow", [Range(0.5, 1.5, 2, 3), Range(0.5, 2, 3)]),
        new("Sqrt", "Sqrt", [Range(0.5, 2, 2, 3)]),
        new("Reciprocal", "Reciprocal", [Range(0.5, 2, 2, 3)]),
        new("Exp", "Exp", [R(2, 3)]),
        new("Log", "Log", [Range(0.5, 2, 2, 3)]),
        new("Tanh", "Tanh", [R(2, 3)]),
        new("Erf (no float64 kernel)", "Erf", [R(2, 3)], Float32: true),
        new("Sigmoid", "Sigmoid", [R(2, 3)]),
        new("Sin", "Sin", [R(2, 3)]),
        new("Cos", "Cos", [R(2, 3)]),
        new("Relu", "Relu", [Range(0.1, 1, 2, 3)]),
        new("Relu negative side", "Relu", [Range(-1, -0.1, 2, 3)]),
        new("Gelu exact (opset 20; Erf has no float64 kernel)", "Gelu", [R(2, 5)], Opset: 20, Float32: true),
        new("Gelu tanh (opset 20)", "Gelu", [R(2, 5)], [S("approximate", "tanh")], Opset: 20, Float32: true),
        new("FastGelu (com.microsoft; float kernel only)", "FastGelu", [R(2, 5)], Domain: "com.microsoft", Float32: true),
        new("FastGelu with bias", "FastGelu", [R(2, 3, 4), R(4)], Domain: "com.microsoft", Float32: true),
        new("Softmax axis -1", "Softmax", [R(2, 3, 4)], [I("axis", -1)]),
        new("Softmax axis 1", "Softmax", [R(2, 3, 4)], [I("axis", 1)]),
        new("LogSoftmax axis -1", "LogSoftmax", [R(2, 3, 4)], [I("axis", -1)]),
        new("LogSoftmax axis 0", "LogSoftmax", [R(2, 3, 4)], [I("axis", 0)]),
        new("LayerNormalization axis -1", "LayerNormalization", [R(2, 3, 4), R(4), R(4)], [I("axis", -1), F("epsilon", 1e-5f)]),
        new("LayerNormalization axis 1, no bias", "LayerNormalization", [R(2, 3, 4), R(3, 4)], [I("axis", 1)], Float32: true),
        new("ReduceSum axes [0,-1] keepdims", "ReduceSum", [R(2, 3, 4), Ints(0, -1)], [I("keepdims", 1)]),
        new("ReduceSum all, no keepdims", "ReduceSum", [R(2, 3)], [I("keepdims", 0)]),
        new("ReduceMean axes [-1] (opset 17 attribute)", "ReduceMean", [R(2, 3, 4)], [Ints_("axes", -1), I("keepdims", 0)]),
        new("ReduceMean axes input (opset 18)", "ReduceMean", [R(2, 3, 4), Ints(1)], [I("keepdims", 0)], Opset: 18),
        new("Reshape [2,3,4]→[6,-1]", "Reshape", [R(2, 3, 4), Ints(6, -1)]),
        new("Transpose perm [2,0,1]", "Transpose", [R(2, 3, 4)], [Ints_("perm", 2, 0, 1)]),
        new("Transpose default perm", "Transpose", [R(2, 3, 4)]),
        new("Squeeze axes [1]", "Squeeze", [R(2, 1, 3), Ints(1)]),
        new("Unsqueeze axes [-1]", "Unsqueeze", [R(2, 3), Ints(-1)]),
        new("Flatten axis 2", "Flatten", [R(2, 3, 4)], [I("axis", 2)]),
        new("Slice negative, clamped, strided", "Slice", [R(4, 5), Ints(1, -4), Ints(3, 100), Ints(0, -1), Ints(1, 2)]),
        new("Slice negative step", "Slice", [R(4, 5), Ints(-1), Ints(-5), Ints(1), Ints(-2)]),
        new("Split [2,4] axis -1", "Split", [R(4, 6), Ints(2, 4)], [I("axis", -1)], Outputs: 2),
        new("Split, one output unused", "Split", [R(4, 6), Ints(3, 3)], [I("axis", 1)], Outputs: 2, Used: [1]),
        new("Concat axis -1", "Concat", [R(2, 3), R(2, 2)], [I("axis", -1)]),
        new("Gather rows, repeated and negative", "Gather", [R(5, 3), Const(Tensors.Int64("", [2, 2], [0, 4, -1, 0]))], [I("axis", 0)]),
        new("Where broadcast", "Where", [Bools([2, 3], true, false, true, false, false, true), R(2, 3), R(3)]),
        new("Expand [3,1]→[2,3,4]", "Expand", [R(3, 1), Ints(2, 3, 4)]),
        new("Cast float→double", "Cast", [R(2, 3)], [I("to", (long)DataType.Double)], Float32: true),
        new("Identity", "Identity", [R(2, 3)]),
        new("Dropout, inference mode", "Dropout", [R(2, 3)]),
        new("MatMul 2-D", "MatMul", [R(2, 3), R(3, 4)]),
        new("MatMul batched × 2-D weight", "MatMul", [R(2, 2, 3), R(3, 4)]),
        new("MatMul 2-D × batched", "MatMul", [R(2, 3), R(2, 3, 4)]),
        new("MatMul broadcast batch dims", "MatMul", [R(2, 1, 2, 3), R(3, 3, 4)]),
        new("MatMul batched × 2-D weight, FusedMatMul path", "MatMul", [R(2, 2, 3), R(3, 4)], Float32: true),
        new("MatMul broadcast batch, FusedMatMul path", "MatMul", [R(2, 1, 2, 3), R(3, 3, 4)], Float32: true),
        new("Gemm plain with C [4]", "Gemm", [R(2, 3), R(3, 4), R(4)]),
        new("Gemm transA alpha beta", "Gemm", [R(3, 2), R(3, 4), R(2, 4)], [I("transA", 1), F("alpha", 0.5f), F("beta", 2f)]),
        new("Gemm transB", "Gemm", [R(2, 3), R(4, 3), R(1, 4)], [I("transB", 1)]),
        new("Gemm transA transB, no C", "Gemm", [R(3, 2), R(4, 3)], [I("transA", 1), I("transB", 1), F("alpha", 1.5f)]),
        new("FusedMatMul transB alpha", "FusedMatMul", [R(2, 2, 3), R(4, 3)], [I("transB", 1), F("alpha", 0.5f)], Domain: "com.microsoft", Float32: true),
        new("FusedMatMul transA", "FusedMatMul", [R(2, 3, 2), R(2, 3, 4)], [I("transA", 1)], Domain: "com.microsoft", Float32: true),
        new("FusedMatMul transA transB", "FusedMatMul", [R(3, 2), R(4, 3)], [I("transA", 1), I("transB", 1), F("alpha", 2f)], Domain: "com.microsoft", Float32: true),
    ];

    [TestCaseSource(nameof(Rows))]
    public void MatchesFiniteDifferences(Row row)
    {
        const int seed = 1234;
        var type = row.Float32 ? DataType.Float : DataType.Double;
        double tolerance = row.Float32 ? 2e-4 : 1e-6;
        var r = GradCheck.Run(row.Op, row.Inputs, row.Attrs ?? [], type, seed, row.Outputs, row.Domain, row.Opset,
                              plainMatMul: !row.Float32, usedOutputs: row.Used);
        Assert.That(r.MaxError, NUnit.Framework.Is.LessThanOrEqualTo(tolerance),
            $"{row.Name}: max error {r.MaxError:G3} > tolerance {tolerance:G3} (seed {r.Seed}) at {r.Where}");
    }
}

/// <summary>Dropout in training mode draws a new mask every run, so it is checked against its own mask output.</summary>
public class DropoutRuleTests
{
    [Test]
    public void TrainingModeGradientIsTheMaskedScaledOutputGradient()
    {
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "g" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Version = 17 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, 4, 8));
        g.AddInput(ValueInfos.Tensor("training", DataType.Bool));
        var ratio = g.AddConstant("ratio", Tensors.Scalar("", DataType.Float, 0.25));
        g.AddNode("Dropout", ["x", ratio, "training"], ["y"], "drop", attributes: Attr.Int("seed", 7));
        var rv = Enumerable.Range(0, 32).Select(i => (float)Math.Sin(i + 1)).ToArray();
        var r = g.AddConstant("r", Tensors.Float("", [4, 8], rv));
        var loss = g.Op("ReduceSum", [g.Op("Mul", ["y", r])], "loss", attributes: Attr.Int("keepdims", 0));
        var grads = GradientBuilder.Build(model, new Dictionary<string, string> { [loss] = g.AddConstant("one", Tensors.Scalar("", DataType.Float, 1)) }, ["x"]);
        var node = model.Graph.Node.First(n => n.OpType == "Dropout");
        Assert.That(node.Output, Has.Count.EqualTo(2), "the rule adds the mask output to the forward node");
        g.AddOutput(ValueInfos.Tensor(grads["x"], DataType.Float, 4, 8));
        g.AddOutput(ValueInfos.Tensor(node.Output[1], DataType.Bool, 4, 8));
        using var s = new Microsoft.ML.OnnxRuntime.InferenceSession(Google.Protobuf.MessageExtensions.ToByteArray(model));
        foreach (var training in new[] { true, false })
        {
            var feeds = new Dictionary<string, (Array, long[])> { ["x"] = (new float[32].Select((_, i) => i * 0.1f).ToArray(), [4, 8]), ["training"] = (new[] { training }, []) };
            var values = feeds.Values.Select(v => v.Item1 is float[] f ? Microsoft.ML.OnnxRuntime.OrtValue.CreateTensorValueFromMemory(f, v.Item2) : Microsoft.ML.OnnxRuntime.OrtValue.CreateTensorValueFromMemory((bool[])v.Item1, v.Item2)).ToList();
            using var ro = new Microsoft.ML.OnnxRuntime.RunOptions();
            using var res = s.Run(ro, feeds.Keys.ToList(), values, [grads["x"], node.Output[1]]);
            var dx = res[0].GetTensorDataAsSpan<float>().ToArray();
            var mask = res[1].GetTensorDataAsSpan<bool>().ToArray();
            if (training) Assert.That(mask.Count(m => !m), Is.GreaterThan(0), "some elements dropped");
            for (int i = 0; i < 32; i++)
                Assert.That(dx[i], Is.EqualTo(mask[i] ? rv[i] * (training ? 1 / 0.75f : 1f) : 0f).Within(1e-6), $"training={training}: dx[{i}]");
            foreach (var v in values) v.Dispose();
        }
    }
}
