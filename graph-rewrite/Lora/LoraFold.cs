using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>Adds or subtracts scale·A·B into the frozen weights (shared by <see cref="MergeLora"/> and <see cref="UnmergeLora"/>).</summary>
internal static class LoraFold
{
    /// <summary>W + scale·A·B.</summary>
    public static (ModelProto Model, bool Modified) Add(ModelProto model, LoraManifest manifest, IReadOnlyDictionary<string, TensorProto> parameters, bool bIncludesScale) =>
        Fold(model, manifest, parameters, bIncludesScale, subtract: false);

    /// <summary>W − scale·A·B.</summary>
    public static (ModelProto Model, bool Modified) Subtract(ModelProto model, LoraManifest manifest, IReadOnlyDictionary<string, TensorProto> parameters, bool bIncludesScale) =>
        Fold(model, manifest, parameters, bIncludesScale, subtract: true);

    static (ModelProto Model, bool Modified) Fold(ModelProto model, LoraManifest manifest, IReadOnlyDictionary<string, TensorProto> parameters,
                                                  bool bIncludesScale, bool subtract)
    {
        string what = subtract ? "unmerge" : "merge";
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(manifest);
        ArgumentNullException.ThrowIfNull(parameters);
        var (stripped, modified) = StripLora.Run(model, manifest);
        var result = modified ? stripped : model.Clone();
        var g = new GraphEditor(result);
        var layers = LinearLayers.Discover(result);
        foreach (var t in manifest.Targets)
        {
            var a = Parameter(parameters, t.LoraA, t.Module, what);
            var b = Parameter(parameters, t.LoraB, t.Module, what);
            if (a.Dims.Count != 2 || b.Dims.Count != 2 || a.Dims[0] != t.In || b.Dims[1] != t.Out || a.Dims[1] != b.Dims[0])
                throw new ArgumentException($"{what}: module '{t.Module}' needs A [{t.In}, r] and B [r, {t.Out}], got A [{string.Join(", ", a.Dims)}] and B [{string.Join(", ", b.Dims)}]");
            long rank = a.Dims[1];
            if (rank == 0) continue;
            var layer = layers.FirstOrDefault(l => l.Nodes.Contains(t.Nodes[0]))
                ?? throw new ArgumentException($"{what}: the model has no linear node '{t.Nodes[0]}' of module '{t.Module}'; is it the base model the LoRA manifest was made for ({manifest.BaseModel})?");
            if (layer.In != t.In || layer.Out != t.Out)
                throw new ArgumentException($"{what}: weight '{layer.Weight}' of module '{t.Module}' is {layer.In}→{layer.Out}, the manifest says {t.In}→{t.Out}; wrong base model?");
            var init = g.Initializer(layer.Weight)!;
            var type = (DataType)init.DataType;
            if (subtract && type is DataType.Float16 or DataType.Bfloat16)
                throw new NotSupportedException($"{what}: weight '{layer.Weight}' is {type}; merging rounded W + ΔW to {type} (relative error up to {(type == DataType.Float16 ? "2^-11" : "2^-8")} of |W|), so subtracting cannot give W back. Use the base model instead of unmerging.");

            double scale = bIncludesScale ? 1 : t.Scale;
            var w = Tensors.ToDoubles(init);                 // [in, out], or [out, in] when transposed
            var av = Tensors.ToDoubles(a);                   // [in, r]
            var bv = Tensors.ToDoubles(b);                   // [r, out]
            long n = t.In, m = t.Out;
            for (long i = 0; i < n; i++)
                for (long o = 0; o < m; o++)
                {
                    double delta = 0;
                    for (long k = 0; k < rank; k++) delta += av[i * rank + k] * bv[k * m + o];
                    w[layer.WeightTransposed ? o * n + i : i * m + o] += (subtract ? -scale : scale) * delta;
                }
            var folded = Tensors.FromDoubles(init.Name, type, init.Dims.ToArray(), w);

            if (!subtract && layer.SharedWith.Count > 0)
            {
                // the weight is also read elsewhere (a tied embedding Gather): give the linear nodes their own merged copy
                folded.Name = g.UniqueName(layer.Weight + ".merged");
                g.AddInitializer(folded);
                foreach (var use in layer.Uses)
                {
                    var first = use.Chain.Count > 0 ? use.Chain[0] : use.Node;
                    var node = g.Nodes.First(x => LinearLayers.NodeName(x) == first);
                    for (int i = 0; i < node.Input.Count; i++) if (node.Input[i] == layer.Weight) node.Input[i] = folded.Name;
                }
                g.Reindex();
            }
            else
            {
                init.ClearRawData(); init.FloatData.Clear(); init.DoubleData.Clear(); init.Int32Data.Clear();
                init.RawData = folded.RawData;
            }
        }
        return (result, true);
    }

    static TensorProto Parameter(IReadOnlyDictionary<string, TensorProto> parameters, string name, string module, string what) =>
        parameters.TryGetValue(name, out var t) ? t
            : throw new ArgumentException($"{what}: no tensor '{name}' for module '{module}' ({parameters.Count} LoRA tensors given); does the adapter belong to this rewrite?");
}
