using System.ComponentModel;
using System.Diagnostics;
using OnnxLora.GraphRewrite.Onnx;
using OnnxLora.Models;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// <c>onnxlora model build</c>: writes a GPT-2 as ONNX from a preset with seeded random weights, or from a Hugging
/// Face GPT-2 <c>model.safetensors</c>.
/// </summary>
public sealed class ModelBuildCommand(IAnsiConsole console) : Command<ModelBuildCommand.Settings>
{
    public const string Description = "Build a GPT-2 as ONNX (opset 17) from a preset with random weights, or from Hugging Face GPT-2 safetensors";

    public sealed class Settings : CommandSettings
    {
        [CommandOption("-p|--preset <PRESET>")]
        [Description("Model shape: tiny, small, gpt2, gpt2-medium, gpt2-large or gpt2-xl. With --weights it may be left out (the shape is read from the file)")]
        public string? Preset { get; init; }

        [CommandOption("-w|--weights <FILE>")]
        [Description("Hugging Face GPT-2 model.safetensors to take the weights from (F32, F16 or BF16); without it the weights are random")]
        public string? Weights { get; init; }

        [CommandOption("-s|--seed <N>")]
        [Description("Seed of the random weights (GPT-2 init, the same bits on every machine). Default: 0")]
        public long? Seed { get; init; }

        [CommandOption("-o|--out <FILE>")]
        [Description("The .onnx file to write (models over 2 GB also get <FILE>.data)")]
        public string? Out { get; init; }

        [CommandOption("-f|--force|--overwrite")]
        [Description("Overwrite --out if it exists (never the --weights file)")]
        public bool Force { get; init; }

        public override ValidationResult Validate()
        {
            if (string.IsNullOrWhiteSpace(Out)) return ValidationResult.Error("--out is required: the .onnx file to write");
            if (Preset is null && Weights is null) return ValidationResult.Error($"give --preset ({string.Join(", ", GptConfig.PresetNames)}) or --weights model.safetensors");
            if (Weights is not null && Seed is not null) return ValidationResult.Error("--seed applies to random weights only; leave it out with --weights");
            return ValidationResult.Success();
        }
    }

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        var config = settings.Preset is null ? null : GptConfig.Preset(settings.Preset);
        var outPath = Path.GetFullPath(settings.Out!);
        var dataPath = outPath + ".data";
        foreach (var path in new[] { outPath, dataPath })
            OutputFolder.CheckFile(path, "--out", [settings.Weights], settings.Force);

        var clock = Stopwatch.StartNew();
        var weights = settings.Weights is null
            ? GptWeights.Random(config!, settings.Seed ?? 0)
            : GptWeights.FromSafeTensors(settings.Weights, config);
        cancellationToken.ThrowIfCancellationRequested();
        if (File.Exists(dataPath)) File.Delete(dataPath);   // --force: a stale .data beside a new inline model would mislead
        GptBuilder.Save(weights.Config, weights, outPath);

        long bytes = new FileInfo(outPath).Length + (File.Exists(dataPath) ? new FileInfo(dataPath).Length : 0);
        bool external = File.Exists(dataPath);
        console.WriteLine($"wrote {settings.Out}: {bytes:N0} bytes{(external ? $" with {Path.GetFileName(dataPath)}" : "")}, {weights.ParameterCount:N0} parameters");
        console.WriteLine($"  model: GPT-2 {weights.Config}");
        console.WriteLine($"  weights: {(settings.Weights is null ? $"random, seed {settings.Seed ?? 0}" : settings.Weights)} ({clock.Elapsed.TotalSeconds:F1} s)");
        return 0;
    }
}
