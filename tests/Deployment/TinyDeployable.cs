using Microsoft.ML.OnnxRuntime;
using Onnx;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// A small deployable graph built by hand, as the rewrite's deploy.onnx will look: two adapted layers
/// <c>y = x·W + (x·A)·B</c>, each A/B a graph input with a same-named zero-rank default initializer (A [in, 0], B [0, out]),
/// a base model without the branches, and the manifest describing both targets.
/// </summary>
static class TinyDeployable
{
    public const int In = 6, Hidden = 5, Out = 4, Rank = 3;
    public const double Alpha = 6;

    public sealed record Files(string Deploy, string Base, LoraManifest Manifest, float[] W0, float[] W1);

    public static LoraManifest Manifest(LoraScaling scaling = LoraScaling.Peft) => new()
    {
        ToolVersion = "test",
        BaseModel = "base.onnx",
        BaseModelSha256 = "",
        Rank = Rank,
        Alpha = Alpha,
        Scaling = scaling,
        Targets =
        [
            Target("transformer.h.0.mlp.c_fc", "W0", In, Hidden, scaling),
            Target("transformer.h.0.mlp.c_proj", "W1", Hidden, Out, scaling),
        ],
    };

    static LoraTarget Target(string module, string weight, long inDim, long outDim, LoraScaling scaling) => new()
    {
        Module = module, Nodes = [module + "/MatMul"], Weight = weight, In = inDim, Out = outDim, Rank = Rank, Alpha = Alpha,
        Scale = LoraManifest.ScaleFor(scaling, Alpha, Rank), LoraA = $"lora_A.{module}", LoraB = $"lora_B.{module}",
    };

    /// <param name="parameterType">element type of the LoRA inputs (cast to float inside the graph when not Float)</param>
    public static Files Write(string dir, LoraScaling scaling = LoraScaling.Peft, int seed = 1, DataType parameterType = DataType.Float)
    {
        var manifest = Manifest(scaling);
        var rng = new Random(seed);
        var w0 = Enumerable.Range(0, In * Hidden).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray();
        var w1 = Enumerable.Range(0, Hidden * Out).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray();
        var deploy = Path.Combine(dir, "deploy.onnx");
        var @base = Path.Combine(dir, "base.onnx");
        OnnxFile.Save(Build(manifest, w0, w1, withBranches: true, parameterType), deploy);
        OnnxFile.Save(Build(manifest, w0, w1, withBranches: false, parameterType), @base);
        manifest.Save(Path.Combine(dir, RunLayout.LoraConfig));
        return new Files(deploy, @base, manifest, w0, w1);
    }

    static ModelProto Build(LoraManifest manifest, float[] w0, float[] w1, bool withBranches, DataType parameterType)
    {
        var model = new ModelProto { IrVersion = 8, ProducerName = "test", Graph = new GraphProto { Name = "tiny" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", DataType.Float, "batch", In));     // [batch, in]
        g.AddInitializer(Tensors.Float("W0", [In, Hidden], w0));
        g.AddInitializer(Tensors.Float("W1", [Hidden, Out], w1));
        var h = Layer(g, "x", manifest.Targets[0], withBranches, parameterType);
        var y = Layer(g, h, manifest.Targets[1], withBranches, parameterType);
        g.AddNode("Identity", [y], ["y"]);
        g.AddOutput(ValueInfos.Tensor("y", DataType.Float, "batch", Out));   // [batch, out]
        return model;
    }

    static string Layer(GraphEditor g, string x, LoraTarget t, bool withBranches, DataType type)
    {
        var y = g.Op("MatMul", [x, t.Weight], t.Module + "/y");
        if (!withBranches) return y;
        g.AddInput(ValueInfos.Tensor(t.LoraA, type, t.In, "rank"));
        g.AddInput(ValueInfos.Tensor(t.LoraB, type, "rank", t.Out));
        g.AddInitializer(Tensors.Raw(t.LoraA, type, [t.In, 0], []));
        g.AddInitializer(Tensors.Raw(t.LoraB, type, [0, t.Out], []));
        string a = t.LoraA, b = t.LoraB;
        if (type != DataType.Float)
        {
            a = g.Op("Cast", [a], t.Module + "/a32", "", Attr.Int("to", (long)DataType.Float));
            b = g.Op("Cast", [b], t.Module + "/b32", "", Attr.Int("to", (long)DataType.Float));
        }
        var xa = g.Op("MatMul", [x, a], t.Module + "/xa");
        var xab = g.Op("MatMul", [xa, b], t.Module + "/xab");
        return g.Op("Add", [y, xab], t.Module + "/out");
    }

    public static float[] Input(int batch, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, batch * In).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
    }

    /// <summary>Runs a plain session (no adapter API) with the given feeds; returns y.</summary>
    public static float[] RunPlain(string model, float[] x, int batch, IReadOnlyDictionary<string, (long[] Shape, float[] Data)>? extraFeeds = null)
    {
        using var session = new InferenceSession(model);
        var names = new List<string> { "x" };
        var values = new List<OrtValue> { OrtValue.CreateTensorValueFromMemory(x, [batch, In]) };
        foreach (var (name, (shape, data)) in extraFeeds ?? new Dictionary<string, (long[], float[])>())
        {
            names.Add(name);
            values.Add(OrtValue.CreateTensorValueFromMemory(data, shape));
        }
        try
        {
            using var runOptions = new RunOptions();
            using var outputs = session.Run(runOptions, names, values, ["y"]);
            return outputs[0].GetTensorDataAsSpan<float>().ToArray();
        }
        finally { foreach (var v in values) v.Dispose(); }
    }

    public static double MaxAbsDiff(float[] a, float[] b)
    {
        Assert.That(a.Length, Is.EqualTo(b.Length));
        return a.Zip(b).Max(p => Math.Abs((double)p.First - p.Second));
    }
}
