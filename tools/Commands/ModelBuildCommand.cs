using System.ComponentModel;
using System.Diagnostics;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// <c>onnxlora model build</c>: writes a GPT-2 or a Llama-family decoder as ONNX from a preset with seeded random
/// weights, from a Hugging Face GPT-2 <c>model.safetensors</c>, or from a Hugging Face model folder.
/// </summary>
public sealed class ModelBuildCommand(IAnsiConsole console) : Command<ModelBuildCommand.Settings>
{
    public const string Description = "Build a GPT-2 or Llama-family decoder as ONNX (opset 17): a preset with random weights, or Hugging Face weights";

    public sealed class Settings : CommandSettings
    {
        [CommandOption("-a|--arch <ARCH>")]
        [Description("Architecture of --preset: gpt2 (default) or llama (RMSNorm, RoPE, grouped-query attention, SwiGLU; Optimum's input_ids/attention_mask/position_ids)")]
        public string? Arch { get; init; }

        [CommandOption("-p|--preset <PRESET>")]
        [Description("Model shape. gpt2: tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl. llama: tiny, tiny-qwen2, smollm2-135m, qwen2.5-0.5b, llama-3.2-1b. With --weights it may be left out")]
        public string? Preset { get; init; }

        [CommandOption("-w|--weights <FILE>")]
        [Description("Hugging Face GPT-2 model.safetensors to take the weights from (F32, F16 or BF16); without it the weights are random")]
        public string? Weights { get; init; }

        [CommandOption("--from <DIR>")]
        [Description("A Hugging Face model folder (config.json + model.safetensors or model.safetensors.index.json shards) of a GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM; the shape comes from config.json")]
        public string? From { get; init; }

        [CommandOption("-s|--seed <N>")]
        [Description("Seed of the random weights (the same bits on every machine). Default: 0")]
        public long? Seed { get; init; }

        [CommandOption("-o|--out <FILE>")]
        [Description("The .onnx file to write (models over 2 GB also get <FILE>.data)")]
        public string? Out { get; init; }

        [CommandOption("--with-past")]
        [Description("Build the KV-cache form (Optimum's): past_key_values.{i}.key|value [[batch, kv_heads, past, head_dim]] in, present.{i}.key|value out, attention_mask over past + sequence, position_ids; generation then runs one token per step")]
        public bool WithPast { get; init; }

        [CommandOption("-f|--force|--overwrite")]
        [Description("Overwrite --out if it exists (never the --weights file)")]
        public bool Force { get; init; }

        public override ValidationResult Validate()
        {
            if (string.IsNullOrWhiteSpace(Out)) return ValidationResult.Error("--out is required: the .onnx file to write");
            if (Arch is not (null or "gpt2" or "llama")) return ValidationResult.Error($"--arch '{Arch}': use gpt2 or llama");
            if (From is not null && (Preset ?? Weights ?? Arch) is not null) return ValidationResult.Error("--from reads the shape and weights from the folder's config.json; leave out --preset, --arch and --weights");
            if (Weights is not null && Arch == "llama") return ValidationResult.Error("--weights reads GPT-2 safetensors; for a Llama-family model give its folder with --from DIR");
            if (Preset is null && Weights is null && From is null)
                return ValidationResult.Error($"give --preset (gpt2: {string.Join(", ", GptConfig.PresetNames)}; --arch llama: {string.Join(", ", LlamaConfig.PresetNames)}), --weights model.safetensors or --from DIR");
            if ((Weights ?? From) is not null && Seed is not null) return ValidationResult.Error("--seed applies to random weights only; leave it out with --weights or --from");
            return ValidationResult.Success();
        }
    }

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        var outPath = Path.GetFullPath(settings.Out!);
        var dataPath = outPath + ".data";
        foreach (var path in new[] { outPath, dataPath })
            OutputFolder.CheckFile(path, "--out", [settings.Weights, settings.From], settings.Force);

        var clock = Stopwatch.StartNew();
        Onnx.ModelProto model;
        string description;
        long parameters;
        if (settings.From is not null)
            (model, description, parameters) = HfModels.Build(settings.From, settings.WithPast);
        else if (settings.Arch == "llama")
        {
            var weights = LlamaWeights.Random(LlamaConfig.Preset(settings.Preset!), settings.Seed ?? 0);
            (model, description, parameters) = (LlamaBuilder.Build(weights, settings.WithPast), weights.Config.ToString(), weights.ParameterCount);
        }
        else
        {
            var config = settings.Preset is null ? null : GptConfig.Preset(settings.Preset);
            var weights = settings.Weights is null ? GptWeights.Random(config!, settings.Seed ?? 0) : GptWeights.FromSafeTensors(settings.Weights, config);
            (model, description, parameters) = (GptBuilder.Build(weights.Config, weights, settings.WithPast), $"GPT-2 {weights.Config}", weights.ParameterCount);
        }
        cancellationToken.ThrowIfCancellationRequested();
        if (File.Exists(dataPath)) File.Delete(dataPath);   // --force: a stale .data beside a new inline model would mislead
        OnnxFile.Save(model, outPath);

        long bytes = new FileInfo(outPath).Length + (File.Exists(dataPath) ? new FileInfo(dataPath).Length : 0);
        bool external = File.Exists(dataPath);
        var source = settings.From ?? settings.Weights ?? $"random, seed {settings.Seed ?? 0}";
        console.WriteLine($"wrote {settings.Out}: {bytes:N0} bytes{(external ? $" with {Path.GetFileName(dataPath)}" : "")}, {parameters:N0} parameters");
        console.WriteLine($"  model: {description}{(settings.WithPast ? ", with past (KV cache)" : "")}");
        console.WriteLine($"  weights: {source} ({clock.Elapsed.TotalSeconds:F1} s)");
        return 0;
    }
}
