using Onnx;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>
/// Pass: removes LoRA branches, giving back the base model's structure. Functional (returns a modified copy).
/// Cases: 1. an Add whose second input is (scale ·) x·A·B with B one of the manifest's LoRA parameters is removed
/// and the base node writes the Add's output name again; 2. the LoRA inputs (and the dropout switch) are removed with
/// their default initializers; 3. the branch nodes and their constants, now dead, go. A model without branches comes
/// back unchanged (<c>modified = false</c>).
/// </summary>
public static class StripLora
{
    public static (ModelProto Model, bool Modified) Run(ModelProto model, LoraManifest manifest)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(manifest);
        var loraNames = new HashSet<string>(manifest.Targets.SelectMany(t => new[] { t.LoraA, t.LoraB }));
        if (manifest.DropoutTrainingModeInput is { } mode) loraNames.Add(mode);
        var loraB = new HashSet<string>(manifest.Targets.Select(t => t.LoraB));
        if (!model.Graph.Input.Any(i => loraNames.Contains(i.Name)) && !model.Graph.Initializer.Any(i => loraNames.Contains(i.Name)))
            return (model, false);

        var copy = model.Clone();
        var g = new GraphEditor(copy);
        foreach (var add in g.Nodes.Where(n => n.OpType == "Add" && n.Input.Count == 2 && IsBranch(g, n.Input[1], loraB)).ToList())
        {
            var baseNode = g.Producer(add.Input[0]) ?? throw new InvalidOperationException($"{add.Describe()}: no node produces its base input '{add.Input[0]}'");
            var output = add.Output[0];
            g.RemoveNode(add);
            g.RenameNodeOutput(baseNode, baseNode.Output.IndexOf(add.Input[0]), output);
        }
        foreach (var input in copy.Graph.Input.Where(i => loraNames.Contains(i.Name)).ToList()) copy.Graph.Input.Remove(input);
        foreach (var init in copy.Graph.Initializer.Where(i => loraNames.Contains(i.Name)).ToList()) copy.Graph.Initializer.Remove(init);
        g.Reindex();
        g.RemoveDeadNodes();
        return (copy, true);
    }

    // (x·A)·B, optionally times a scale: the value's producer is MatMul(h, B) or Mul(MatMul(h, B), scale)
    static bool IsBranch(GraphEditor g, string value, HashSet<string> loraB)
    {
        var p = g.Producer(value);
        if (p is { OpType: "Mul" }) p = g.Producer(p.Input[0]);
        return p is { OpType: "MatMul" } && p.Input.Count == 2 && loraB.Contains(p.Input[1]);
    }
}
