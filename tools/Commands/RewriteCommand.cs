using System.ComponentModel;
using System.Globalization;
using OnnxLora.GraphRewrite.Contracts;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.GraphRewrite.Lora;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// `onnxlora rewrite MODEL.onnx --out DIR --rank R --alpha A …`: adds LoRA branches to the chosen linear layers and
/// writes DIR/model.onnx (training view), DIR/deploy.onnx (deployable) and DIR/lora_config.json, atomically.
/// </summary>
public sealed class RewriteCommand(IAnsiConsole console) : Command<RewriteCommand.Settings>
{
    public sealed class Settings : CommandSettings
    {
        [CommandArgument(0, "<MODEL>")]
        [Description("The base ONNX model (never modified).")]
        public string Model { get; init; } = "";

        [CommandOption("-o|--out <DIR>")]
        [Description("Output folder: new or empty (an earlier rewrite output only with --overwrite); never the input's folder.")]
        public string? Out { get; init; }

        [CommandOption("--overwrite")]
        [Description("Replace --out when it holds an earlier 'onnxlora rewrite' output (nothing else is ever replaced).")]
        public bool Overwrite { get; init; }

        [CommandOption("-r|--rank <R>")]
        [Description("LoRA rank r (default 8).")]
        public int Rank { get; init; } = 8;

        [CommandOption("-a|--alpha <A>")]
        [Description("lora_alpha (default: the rank).")]
        public double? Alpha { get; init; }

        [CommandOption("--targets <LIST>")]
        [Description("Modules to adapt: names or .suffixes (c_attn,c_proj), re:<regex> (full match), or all-linear (default; every linear but the head).")]
        public string Targets { get; init; } = LoraConfig.AllLinear;

        [CommandOption("--exclude <LIST>")]
        [Description("Modules to leave alone, matched like --targets.")]
        public string? Exclude { get; init; }

        [CommandOption("--layers <LIST>")]
        [Description("Only these blocks (first numeric path segment), e.g. 0,1,10-11.")]
        public string? Layers { get; init; }

        [CommandOption("--rank-pattern <MAP>")]
        [Description("Per-module ranks: regex=rank,… (regex matches the path or a suffix after a dot; first match wins).")]
        public string? RankPattern { get; init; }

        [CommandOption("--alpha-pattern <MAP>")]
        [Description("Per-module alphas: regex=alpha,…")]
        public string? AlphaPattern { get; init; }

        [CommandOption("--scaling <RULE>")]
        [Description("peft (alpha/r, default), rslora (alpha/√r) or alpha (plain alpha).")]
        public string Scaling { get; init; } = "peft";

        [CommandOption("--init <INIT>")]
        [Description("A's initial values: kaiming (uniform, a=√5, default) or gaussian (N(0, 1/r)).")]
        public string Init { get; init; } = "kaiming";

        [CommandOption("--dropout <P>")]
        [Description("LoRA dropout on the branch input, training view only (default 0).")]
        public double Dropout { get; init; }

        [CommandOption("--seed <N>")]
        [Description("Seed for A's initial values (default 0).")]
        public int Seed { get; init; }

        [CommandOption("--input-role <NAME=ROLE>")]
        [InputRoleHelp(" Recorded in both models, so train and deploy feed the same roles.")]
        public string[] InputRoles { get; init; } = [];
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (string.IsNullOrEmpty(s.Out)) throw new ArgumentException("--out DIR is required (the folder for model.onnx, deploy.onnx and lora_config.json)");
        var config = ToConfig(s);
        var result = LoraRewrite.RewriteFile(s.Model, config, s.Out, s.Overwrite, RoleOverride.ParseAll(s.InputRoles));

        var table = new Table().Title($"LoRA targets ({result.Targets.Count})").AddColumns("module", "nodes", "in", "out", "rank", "alpha", "scale", "params", "flags");
        foreach (var t in result.Targets)
        {
            var l = t.Layer;
            var flags = string.Join(" ", new[] { l.IsHead ? "head" : null, l.IsShared ? "shared" : null, l.WeightTransposed ? "transposed" : null }.Where(f => f is not null));
            table.AddRow(Markup.Escape(l.Module), l.Uses.Count.ToString(CultureInfo.InvariantCulture), l.In.ToString(CultureInfo.InvariantCulture),
                l.Out.ToString(CultureInfo.InvariantCulture), t.Rank.ToString(CultureInfo.InvariantCulture), t.Alpha.ToString("G6", CultureInfo.InvariantCulture),
                t.Scale.ToString("G6", CultureInfo.InvariantCulture), t.Parameters.ToString("N0", CultureInfo.InvariantCulture), flags);
        }
        console.Write(table);
        console.WriteLine(result.ParameterLine);
        if (SignatureRoles.TakesTokens(result.DeployableModel))   // what train and deploy will feed, by role
            console.WriteLine("inputs: " + string.Join(", ", SignatureRoles.Decide(result.DeployableModel, source: s.Model).Inputs.Select(e => $"{e.Name} ({e})")));
        console.WriteLine($"wrote {s.Out}: {RunLayout.TrainingModel} (training view), {RunLayout.DeployableModel} (deployable), {RunLayout.LoraConfig}");
        return 0;
    }

    /// <summary>The command line as a validated <see cref="LoraConfig"/>.</summary>
    internal static LoraConfig ToConfig(Settings s) => new()
    {
        Rank = s.Rank,
        Alpha = s.Alpha ?? s.Rank,
        TargetModules = LoraConfig.ParseList(s.Targets),
        ExcludeModules = s.Exclude is null ? [] : LoraConfig.ParseList(s.Exclude),
        LayersToTransform = s.Layers is null ? null : LoraConfig.ParseLayers(s.Layers),
        RankPattern = s.RankPattern is null ? new Dictionary<string, int>()
            : LoraConfig.ParsePatternValues(s.RankPattern, "--rank-pattern").ToDictionary(kv => kv.Key, kv => (int)kv.Value == kv.Value ? (int)kv.Value
                : throw new FormatException($"--rank-pattern: rank {kv.Value} for '{kv.Key}' is not a whole number")),
        AlphaPattern = s.AlphaPattern is null ? new Dictionary<string, double>() : LoraConfig.ParsePatternValues(s.AlphaPattern, "--alpha-pattern"),
        Scaling = Cli.Flag("--scaling", () => WireNames.Parse<LoraScaling>(s.Scaling, "scaling")),
        Init = Cli.Flag("--init", () => WireNames.Parse<LoraInit>(s.Init, "init")),
        Dropout = s.Dropout,
        Seed = s.Seed,
    };
}
