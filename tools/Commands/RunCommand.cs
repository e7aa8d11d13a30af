using System.ComponentModel;
using OnnxLora.Pipeline.Runner;
using OnnxLora.Pipeline.Training;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// `onnxlora run [CONFIG]`: the whole pipeline from one config file; with no argument, the built-in default (a small GPT
/// learns a generated sentiment task in about a minute on two cores).
/// </summary>
public sealed class RunCommand(IAnsiConsole console) : Command<RunCommand.Settings>
{
    public sealed class Settings : CommandSettings
    {
        [CommandArgument(0, "[CONFIG]")]
        [Description("A YAML or JSON pipeline config (see examples/). Without it, the built-in default runs.")]
        public string? Config { get; init; }

        [CommandOption("--set <KEY=VALUE>")]
        [Description("Override one config value, e.g. --set train.lr=1e-4 (repeatable).")]
        public string[] Set { get; init; } = [];

        [CommandOption("--out <RUN_DIR>")]
        [Description("The run folder (overrides run_dir).")]
        public string? Out { get; init; }
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        var config = s.Config is null
            ? PipelineConfig.Parse(DemoData.DefaultConfig, "built-in default", Directory.GetCurrentDirectory())
            : PipelineConfig.Load(s.Config);
        foreach (var assignment in s.Set) config.Override(assignment);
        if (s.Out is not null) config.Override($"run_dir={Path.GetFullPath(s.Out)}");
        using var stop = new StopSignals(cancellationToken);
        console.MarkupLineInterpolated($"[bold]onnxlora run[/] ({config.Source})");
        var runner = new PipelineRunner(config, line => console.MarkupLineInterpolated($"  {line}"), new TrainBar(console));
        runner.Validate();
        var report = runner.Run(stop.Token);
        Render(report);
        return 0;
    }

    void Render(PipelineReport r)
    {
        var metrics = new Table().Title("before and after adaptation (held-out data)").AddColumns("", "base model", "with the adapter");
        metrics.AddRow("eval loss", $"{r.BaseLoss:F4}", $"{r.AdaptedLoss:F4}");
        if (r.BaseAccuracy is double a && r.AdaptedAccuracy is double b) metrics.AddRow("accuracy", $"{a:P1}", $"[bold]{b:P1}[/]");
        else metrics.AddRow("perplexity", $"{Math.Exp(r.BaseLoss):F1}", $"[bold]{Math.Exp(r.AdaptedLoss):F1}[/]");
        console.Write(metrics);

        var examples = new Table().Title("the same inputs, side by side").AddColumns("input", "expected", "base model", "adapted");
        foreach (var e in r.Examples) examples.AddRow(Markup.Escape(e.Input), Markup.Escape(e.Expected), Markup.Escape(e.Base), $"[bold]{Markup.Escape(e.Adapted)}[/]");
        if (r.Examples.Count > 0) console.Write(examples);

        var outputs = new Table().Title("written").AddColumns("what", "where");
        foreach (var (what, where) in r.Outputs) outputs.AddRow(what, Markup.Escape(where));
        console.Write(outputs);
        if (r.DeployMaxAbsDiff is double diff)
            console.MarkupLineInterpolated($"deployable model + .onnx_adapter through ONNX Runtime's LoRA API matches the merged model (max |Δlogit| {diff:E1})");
        console.MarkupLineInterpolated($"done in {r.Elapsed.TotalSeconds:F0} s; run folder {r.RunDir}");
    }

    /// <summary>A one-line training bar: step/total, loss, tokens/s and ETA.</summary>
    sealed class TrainBar(IAnsiConsole console) : IProgress<TrainProgress>
    {
        int _last = -1;

        public void Report(TrainProgress p)
        {
            int every = Math.Max(1, p.TotalSteps / 10);
            if (p.Step != p.TotalSteps && p.Step / every == _last) return;
            _last = p.Step / every;
            var eta = p.Step > 0 ? TimeSpan.FromSeconds(p.Elapsed.TotalSeconds / p.Step * (p.TotalSteps - p.Step)) : TimeSpan.Zero;
            int filled = (int)(20.0 * p.Step / p.TotalSteps);
            var bar = new string('█', filled) + new string('░', 20 - filled);
            var eval = p.EvalLoss is double e ? $" eval {e:F4}" : "";
            console.MarkupLineInterpolated($"  {bar} step {p.Step}/{p.TotalSteps} loss {p.Loss:F4}{eval} {p.TokensPerSecond:F0} tok/s ETA {eta:mm\\:ss}");
        }
    }
}
