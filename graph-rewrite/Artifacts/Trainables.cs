using Onnx;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Numerics;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Artifacts;

/// <summary>
/// What the artifacts train, what they keep frozen, and the initial values of both. The policy: every LoRA factor of
/// the manifest trains (frozen at its initial value under <see cref="ArtifactOptions.FreezeLora"/>); a classifier adds
/// its head, trained fully (W) or frozen at its seeded init with a LoRA pair (A kaiming, B zero) at the manifest's rank.
/// </summary>
internal sealed class Trainables
{
    /// <summary>A trainable tensor with its spec entry and initial value.</summary>
    public sealed record Param(ParamSpec Spec, TensorProto Initial)
    {
        public string Name => Spec.Name;
        public long[] Shape => Spec.Shape;
        public ParamInfo Info => new(Name, (int)DataType.Float, Shape);
    }

    readonly List<Param> _params = new();
    readonly List<TensorProto> _frozen = new();

    /// <summary>The trainable tensors, in the order the models list them.</summary>
    public IReadOnlyList<Param> Params => _params;
    /// <summary>Tensors that do not train but belong to the adapter (constants of the models).</summary>
    public IReadOnlyList<TensorProto> Frozen => _frozen;

    public static Trainables Choose(GraphEditor view, LoraManifest manifest, ArtifactOptions options, string logits)
    {
        var t = new Trainables();
        foreach (var target in manifest.Targets)
            foreach (var (name, kind) in new[] { (target.LoraA, "lora_a"), (target.LoraB, "lora_b") })
            {
                if (!view.IsGraphInput(name) || view.Initializer(name) is not { } init)
                    throw new ArgumentException($"'{name}' ({target.Module}) from {RunLayout.LoraConfig} is not an input with an initializer of the training view; re-run 'onnxlora rewrite'");
                if (options.FreezeLora) t._frozen.Add(init.Clone());   // a constant of the models, still part of the adapter
                else t.Add(name, kind, target.Module, init.Clone(), options.Optimizer);
            }
        if (options.Task == TrainingTask.Cls) t.AddHead(view, manifest, options, logits);
        return t;
    }

    void Add(string name, string kind, string module, TensorProto init, OptimizerKind optimizer)
    {
        if (init.DataType != (int)DataType.Float)
            throw new NotSupportedException($"trainable '{name}' is {(DataType)init.DataType}; training artifacts keep parameters in float32");
        _params.Add(new Param(new ParamSpec { Name = name, Kind = kind, Module = module, Shape = init.Dims.ToArray(), Moments = Optimizers.Moments(optimizer, name) }, init));
    }

    // the task head: W [d, classes] trained fully, or frozen W plus A [d, r]·B [r, classes]
    void AddHead(GraphEditor view, LoraManifest manifest, ArtifactOptions options, string logits)
    {
        var (hidden, _) = ClassHead.FindHidden(view, logits);
        var d = ClassHead.HiddenWidth(view.Model, hidden);
        var w = Tensors.Float(ClassHead.Weight, [d, options.Classes], InitialWeight(d * options.Classes, options.HeadSeed, options.HeadInitStd));
        if (options.HeadMode == HeadMode.Full) { Add(ClassHead.Weight, "head", ClassHead.PeftModule, w, options.Optimizer); return; }
        _frozen.Add(w);
        int r = manifest.Rank;
        var a = LoraInitialValues.A(d, r, LoraInit.Kaiming, manifest.Seed, ClassHead.PeftModule);
        Add(ClassHead.LoraA, "head_lora_a", ClassHead.PeftModule, Tensors.FromDoubles(ClassHead.LoraA, DataType.Float, [d, r], a), options.Optimizer);
        Add(ClassHead.LoraB, "head_lora_b", ClassHead.PeftModule, Tensors.Float(ClassHead.LoraB, [r, options.Classes], new float[r * options.Classes]), options.Optimizer);
    }

    // N(0, std²) from SeededNormal: the same head on every platform (Box–Muller over Math.Log would not be)
    static float[] InitialWeight(long count, int seed, double std)
    {
        var values = new float[count];
        new SeededNormal((ulong)seed, ClassHead.Weight).Fill(values, std);
        return values;
    }

    /// <summary>A model with no inputs whose outputs are the parameters' and then the frozen tensors' initial values, by name.</summary>
    public ModelProto InitialValuesModel()
    {
        var m = new ModelProto { IrVersion = 8, ProducerName = "onnxlora", Graph = new GraphProto { Name = "initial_params" } };
        m.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(m);
        foreach (var t in _params.Select(p => p.Initial).Concat(_frozen))
        {
            var init = t.Clone(); init.Name = t.Name + ".init";
            g.AddInitializer(init);
            g.AddNode("Identity", [init.Name], [t.Name], t.Name);
            g.AddOutput(ValueInfos.Tensor(t.Name, t.DataType, t.Dims.Select(d => new Dim(d)).ToArray()));
        }
        return m;
    }
}
