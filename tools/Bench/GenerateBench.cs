using System.Diagnostics;
using System.Globalization;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Onnx;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;

namespace OnnxLora.Tools.Bench;

/// <summary>One measured generation: time to the first token and tokens/s over the whole request (all rows).</summary>
public sealed record GenerateMeasure(int Batch, string Mode, string Variant, int PromptTokens, int NewTokens, double FirstTokenS, double TotalS)
{
    public double TokensPerS => Batch * NewTokens / TotalS;
}

/// <summary>
/// <c>onnxlora bench --generate</c>: greedy generation on a with-past GPT-2 preset (random weights), LoRA on every
/// linear with a random nonzero adapter, for each batch size: without the cache (the whole context per token) and
/// with it, each on the base model, with the adapter (ONNX Runtime's multi-LoRA, plain Run) and merged. Time to the
/// first token is a separate one-token request; tokens/s counts every row's new tokens over the full request.
/// </summary>
public static class GenerateBench
{
    public sealed record Spec(string Preset, int PromptTokens, int NewTokens, IReadOnlyList<int> Batches, IReadOnlyList<string> Modes, IReadOnlyList<string> Variants, int Rank, int Threads, int Seed);

    public static readonly string[] AllModes = ["nocache", "cache"];
    public static readonly string[] Variants = ["base", "adapter", "merged"];   // the order they run and print in

    public static List<GenerateMeasure> Run(Spec spec, string dir, Action<string> log)
    {
        var config = GptConfig.Preset(spec.Preset);
        if (spec.PromptTokens + spec.NewTokens > config.ContextLength)
            throw new ArgumentException($"prompt {spec.PromptTokens} + new {spec.NewTokens} tokens exceed {spec.Preset}'s context ({config.ContextLength})");
        var modelPath = Path.Combine(dir, "model.onnx");
        var weights = GptWeights.Random(config, spec.Seed);
        OnnxFile.Save(GptBuilder.Build(config, weights, withPast: true), modelPath);
        var rw = Path.Combine(dir, "rw");
        var rewrite = LoraRewrite.RewriteFile(modelPath, new LoraConfig { Rank = spec.Rank, Alpha = spec.Rank, TargetModules = ["c_attn", "c_proj", "c_fc"] }, rw);
        var adapter = LoraAdapter.CreateRandom(rewrite.Manifest, spec.Seed);
        var adapterPath = Path.Combine(dir, "bench.onnx_adapter");
        AdapterFiles.Write(adapter, AdapterFormat.OnnxAdapter, adapterPath, rw);
        var mergedPath = Path.Combine(dir, "merged.onnx");
        AdapterFiles.Write(adapter, AdapterFormat.Merged, mergedPath, rw);
        log($"built {spec.Preset} with past, LoRA r={spec.Rank} on c_attn/c_proj/c_fc, merged copy");

        var options = new AdapterHostOptions { IntraOpThreads = spec.Threads };
        using var deploy = AdapterHost.Create(Path.Combine(rw, LoraManifest.DeployableModelFile), options);
        deploy.AddAdapter("bench", adapterPath);
        using var merged = AdapterHost.Create(mergedPath, options);
        var random = new Random(spec.Seed);
        var results = new List<GenerateMeasure>();
        foreach (var batch in spec.Batches)
        {
            var prompts = Enumerable.Range(0, batch).Select(_ => (IReadOnlyList<int>)Enumerable.Range(0, spec.PromptTokens).Select(_ => random.Next(config.VocabSize)).ToList()).ToList();
            foreach (var mode in spec.Modes)
                foreach (var variant in spec.Variants)
                {
                    var generator = new TextGenerator(variant == "merged" ? merged : deploy);
                    string? name = variant == "adapter" ? "bench" : null;
                    var request = new GenerationOptions { MaxNewTokens = 1, UseCache = mode == "cache" };
                    generator.GenerateBatch(prompts, request, name);   // warm-up: first-run allocations and kernels
                    var clock = Stopwatch.StartNew();
                    generator.GenerateBatch(prompts, request, name);
                    double first = clock.Elapsed.TotalSeconds;
                    clock.Restart();
                    var output = generator.GenerateBatch(prompts, request with { MaxNewTokens = spec.NewTokens }, name);
                    double total = clock.Elapsed.TotalSeconds;
                    if (output.Any(o => o.TokenIds.Count != spec.NewTokens)) throw new InvalidOperationException("a row stopped early; the bench needs every row to generate all its tokens");
                    var m = new GenerateMeasure(batch, mode, variant, spec.PromptTokens, spec.NewTokens, first, total);
                    results.Add(m);
                    log(string.Create(CultureInfo.InvariantCulture, $"batch {batch}, {mode}, {variant}: first token {first * 1000:F1} ms, {m.TokensPerS:F1} tokens/s ({total:F1} s)"));
                }
        }
        return results;
    }
}
