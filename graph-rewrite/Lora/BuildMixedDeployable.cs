using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>
/// Pass: turns a deployable model (<see cref="BuildDeployable"/>) into one that serves a different adapter on every
/// batch row (Punica / S-LoRA style). Functional (returns a modified copy). Each target's A and B inputs become
/// <c>&lt;A&gt;.stack</c> [slots, in, r_max] and <c>&lt;B&gt;.stack</c> [slots, r_max, out] (every adapter's A, and its
/// scale·B, zero-padded to the largest rank), and one new input <see cref="AdapterIndexInput"/> [batch] (int64) picks
/// each row's slot: <c>y = base(x) + (x₃·A.stack[idx])·B.stack[idx]</c> with x₃ = x as [batch, −1, in], reshaped back to
/// the base output's shape. Zero padding adds exact zeros, so a smaller rank computes what it computes alone. The stacks
/// default to one zero-rank slot, so with every index 0 the model computes the base model.
/// </summary>
/// <remarks>
/// adapter_index must have one entry per row of the batch: with fewer, the reshape may still succeed and mix rows, so
/// the runner checks it (<c>MixedAdapterBatch</c>). Only float LoRA inputs are supported.
/// </remarks>
public static class BuildMixedDeployable
{
    /// <summary>The per-row slot input: 0..slots−1.</summary>
    public const string AdapterIndexInput = "adapter_index";

    /// <summary>The stacked input that replaces LoRA parameter <paramref name="parameter"/>.</summary>
    public static string StackName(string parameter) => parameter + ".stack";

    public static ModelProto Run(ModelProto deployable, LoraManifest manifest, string source = "the deployable model")
    {
        ArgumentNullException.ThrowIfNull(deployable);
        ArgumentNullException.ThrowIfNull(manifest);
        LoraBranch.CheckIrVersion(deployable);
        var copy = deployable.Clone();
        var g = new GraphEditor(copy);
        if (g.IsGraphInput(AdapterIndexInput) || g.IsInitializer(AdapterIndexInput) || g.Producer(AdapterIndexInput) is not null)
            throw new InvalidOperationException($"{source}: already has a value named '{AdapterIndexInput}'; was it made mixed already? Give the rewrite's {RunLayout.DeployableModel}.");
        g.AddInput(ValueInfos.Tensor(AdapterIndexInput, DataType.Int64, new Dim(null, "batch")));
        var batch = g.Op("Shape", [AdapterIndexInput], "lora/batch");                       // [1]
        var anyRows = g.AddConstant("lora/any_rows", Tensors.Int64Vector("", -1));
        foreach (var t in manifest.Targets)
        {
            foreach (var p in new[] { t.LoraA, t.LoraB })
            {
                var input = g.Graph.Input.FirstOrDefault(i => i.Name == p)
                    ?? throw new InvalidDataException($"{source}: has no input '{p}' for module '{t.Module}'; the model and {RunLayout.LoraConfig} come from different rewrites");
                if ((DataType)ValueInfos.ElemType(input) != DataType.Float)
                    throw new NotSupportedException($"{source}: LoRA input '{p}' is {(DataType)ValueInfos.ElemType(input)}; mixed-adapter batching supports float LoRA inputs only");
            }
            var rank = new Dim(null, t.Module + ".lora_rank");
            var aStack = AddStack(g, StackName(t.LoraA), [1, t.In, 0], [new Dim(null, "lora_slots"), new Dim(t.In), rank]);
            var bStack = AddStack(g, StackName(t.LoraB), [1, 0, t.Out], [new Dim(null, "lora_slots"), rank, new Dim(t.Out)]);
            var a = g.Op("Gather", [aStack, AdapterIndexInput], t.Module + "/lora/A_rows", "", Attr.Int("axis", 0));   // [batch, in, r]
            var b = g.Op("Gather", [bStack, AdapterIndexInput], t.Module + "/lora/B_rows", "", Attr.Int("axis", 0));   // [batch, r, out]
            var inDim = g.AddConstant(t.Module + "/lora/in", Tensors.Int64Vector("", t.In));
            var rowsShape = g.Op("Concat", [batch, anyRows, inDim], t.Module + "/lora/rows_shape", "", Attr.Int("axis", 0));

            var uses = g.Consumers(t.LoraA).ToList();
            if (uses.Count == 0) throw new InvalidDataException($"{source}: no node uses '{t.LoraA}' (module '{t.Module}')");
            foreach (var xa in uses)
            {
                var (add, deltaIndex) = Branch(g, xa, t, source);
                var x3 = g.Op("Reshape", [xa.Input[0], rowsShape], t.Module + "/lora/x_rows");          // [batch, s, in]
                var h = g.Op("MatMul", [x3, a], t.Module + "/lora/h");                                    // [batch, s, r]
                var d3 = g.Op("MatMul", [h, b], t.Module + "/lora/delta_rows");                           // [batch, s, out]
                var baseShape = g.Op("Shape", [add.Input[1 - deltaIndex]], t.Module + "/lora/base_shape");
                var delta = g.Op("Reshape", [d3, baseShape], t.Module + "/lora/delta");
                add.Input[deltaIndex] = delta;
            }
            foreach (var p in new[] { t.LoraA, t.LoraB })
            {
                copy.Graph.Input.Remove(copy.Graph.Input.First(i => i.Name == p));
                g.RemoveInitializer(p);
            }
        }
        g.Reindex();
        g.RemoveDeadNodes();
        g.SortTopologically();
        return copy;
    }

    // A stacked parameter: a graph input with a default of one zero-rank slot (the base model).
    static string AddStack(GraphEditor g, string name, long[] defaultDims, Dim[] dims)
    {
        LoraBranch.AddParameter(g, Tensors.Raw(name, DataType.Float, defaultDims, []));
        var info = g.Graph.Input.First(i => i.Name == name);
        info.Type = ValueInfos.Tensor(name, DataType.Float, dims).Type;
        return name;
    }

    // The deployable branch at one use of A: MatMul(x, A) → MatMul(h, B) → Add(base, delta); returns the Add and delta's slot.
    static (NodeProto Add, int DeltaIndex) Branch(GraphEditor g, NodeProto xa, LoraTarget t, string source)
    {
        InvalidDataException Bad(string what) => new($"{source}: {xa.Describe()} uses '{t.LoraA}' but {what}; expected the rewrite's branch MatMul(x, A) → MatMul(h, B) → Add (module '{t.Module}')");
        if (xa.OpType != "MatMul" || xa.Input.Count != 2 || xa.Input[1] != t.LoraA) throw Bad("is not MatMul(x, A)");
        var hb = g.Consumers(xa.Output[0]);
        if (hb.Count != 1 || hb[0] is not { OpType: "MatMul" } mb || mb.Input[0] != xa.Output[0] || mb.Input[1] != t.LoraB)
            throw Bad($"its output is not used by exactly one MatMul(h, '{t.LoraB}')");
        var adds = g.Consumers(mb.Output[0]);
        if (adds.Count != 1 || adds[0] is not { OpType: "Add" } add || add.Input.Count != 2 || g.IsGraphOutput(mb.Output[0]))
            throw Bad("x·A·B is not added to the base output by exactly one Add");
        return (add, add.Input.IndexOf(mb.Output[0]));
    }
}
