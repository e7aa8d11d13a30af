using System.ComponentModel;
using System.Globalization;
using Onnx;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>`onnxlora inspect M.onnx`: what a model is made of, and which of its weights LoRA can adapt.</summary>
public sealed class InspectCommand(IAnsiConsole console) : Command<InspectCommand.Settings>
{
    public sealed class Settings : CommandSettings
    {
        [CommandArgument(0, "<MODEL>")]
        [Description("The ONNX model to inspect.")]
        public string Model { get; init; } = "";

        [CommandOption("--input-role <NAME=ROLE>")]
        [InputRoleHelp]
        public string[] InputRoles { get; init; } = [];
    }

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        var model = OnnxFile.Load(settings.Model);
        var graph = model.Graph;
        var inits = new HashSet<string>(graph.Initializer.Select(i => i.Name));
        console.MarkupLineInterpolated($"[bold]{settings.Model}[/]: IR version {model.IrVersion}, opsets {string.Join(", ", model.OpsetImport.Select(o => $"{(o.Domain is "" or "ai.onnx" ? "ai.onnx" : o.Domain)} {o.Version}"))}, producer '{model.ProducerName} {model.ProducerVersion}'");

        // the role table: what each input and output is for, as train and deploy will feed and read them
        ModelRoles? roles = null;
        string? rolesError = null;
        if (SignatureRoles.TakesTokens(model))
        {
            try { roles = SignatureRoles.Decide(model, RoleOverride.ParseAll(settings.InputRoles), settings.Model); }
            catch (ArgumentException e) { rolesError = e.Message; }
        }
        string Role(string name) => roles?.RoleOf(name)?.ToString() ?? (rolesError is null ? "" : "?");
        var io = new Table().Title("inputs and outputs").AddColumns("", "name", "role", "type", "shape");
        foreach (var i in graph.Input.Where(i => !inits.Contains(i.Name))) io.AddRow("input", Markup.Escape(i.Name), Markup.Escape(Role(i.Name)), TypeName(ValueInfos.ElemType(i)), Shape(i));
        foreach (var i in graph.Input.Where(i => inits.Contains(i.Name))) io.AddRow("input (default)", Markup.Escape(i.Name), "", TypeName(ValueInfos.ElemType(i)), Shape(i));
        foreach (var o in graph.Output) io.AddRow("output", Markup.Escape(o.Name), Markup.Escape(Role(o.Name)), TypeName(ValueInfos.ElemType(o)), Shape(o));
        console.Write(io);
        if (rolesError is not null) console.MarkupLineInterpolated($"[yellow]roles: {rolesError}[/]");

        var ops = new Table().Title($"operators ({graph.Node.Count} nodes)").AddColumns("op", "count");
        foreach (var group in graph.Node.GroupBy(n => n.Domain is "" or "ai.onnx" ? n.OpType : $"{n.Domain}.{n.OpType}").OrderByDescending(g => g.Count()).ThenBy(g => g.Key, StringComparer.Ordinal))
            ops.AddRow(Markup.Escape(group.Key), group.Count().ToString(CultureInfo.InvariantCulture));
        console.Write(ops);

        long parameters = LoraRewrite.CountParameters(model);
        long bytes = graph.Initializer.Sum(Tensors.ByteSize);
        console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"parameters: {parameters:N0} in float initializers; {graph.Initializer.Count:N0} initializers, {bytes:N0} bytes ({bytes / 1048576.0:F1} MiB)"));

        var layers = LinearLayers.Discover(model);
        var linears = new Table().Title("LoRA-able weight MatMul/Gemm nodes").AddColumns("#", "module", "op", "in", "out", "flags", "weight");
        int row = 0;
        foreach (var l in layers)
            linears.AddRow((++row).ToString(CultureInfo.InvariantCulture), Markup.Escape(l.Module + string.Concat(l.Aliases.Select(a => " = " + a))), string.Join("+", l.Uses.Select(u => u.OpType).Distinct()),
                l.In.ToString(CultureInfo.InvariantCulture), l.Out.ToString(CultureInfo.InvariantCulture), Flags(l), Markup.Escape(l.Weight));
        console.Write(linears);

        var linearNodes = new HashSet<string>(layers.SelectMany(l => l.Nodes));
        int others = graph.Node.Count(n => n.OpType is "MatMul" or "Gemm" or "FusedMatMul" && !linearNodes.Contains(n.Name.Length > 0 ? n.Name : n.Output[0]));
        int heads = layers.Count(l => l.IsHead);
        int uses = layers.Where(l => !l.IsHead).Sum(l => l.Uses.Count);
        console.WriteLine($"{uses} LoRA-able weight MatMul/Gemm nodes in {layers.Count - heads} modules"
            + (heads > 0 ? $", plus {heads} output head{(heads > 1 ? "s" : "")}{(layers.Any(l => l.IsHead && l.SharedWith.Count > 0) ? " (tied to the embedding)" : "")}" : "")
            + $"; {others} other MatMul/Gemm nodes (activation × activation, or no constant weight) are never targets");
        return 0;
    }

    static string Flags(LinearLayer l) => string.Join(" ", new[]
    {
        l.IsHead ? "head" : null,
        l.IsShared ? $"shared×{l.Uses.Count + l.SharedWith.Count}" : null,
        l.WeightTransposed ? "transposed" : null,
        l.ComputeType != l.WeightType ? $"{TypeName(l.WeightType)}→{TypeName(l.ComputeType)}" : null,
    }.Where(f => f is not null));

    static string TypeName(int elemType) => ((TensorProto.Types.DataType)elemType).ToString().ToLowerInvariant();

    static string Shape(ValueInfoProto info) =>
        ValueInfos.Dims(info) is { } dims ? Markup.Escape("[" + string.Join(", ", dims.Select(d => d.ToString())) + "]") : "?";
}
