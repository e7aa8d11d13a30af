using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;

namespace OnnxLora.Tools.Bench;

/// <summary>One measured generation: time to the first token and tokens/s over the whole request (all rows).</summary>
/// <param name="SameTokensAsOurs">GenAI's rows only: whether its greedy tokens equal OnnxLora's for the same prompts</param>
/// <param name="Tokens">GenAI's rows only: its new tokens per row</param>
public sealed record GenerateMeasure(int Batch, string Mode, string Variant, int PromptTokens, int NewTokens, double FirstTokenS, double TotalS,
                                     bool? SameTokensAsOurs = null, IReadOnlyList<IReadOnlyList<int>>? Tokens = null)
{
    public double TokensPerS => Batch * NewTokens / TotalS;
}

/// <summary>
/// <c>onnxlora bench --generate</c>: greedy generation on a with-past GPT-2 preset (random weights), LoRA on every
/// linear with a random nonzero adapter, for each batch size: without the cache (the whole context per token) and
/// with it, each on the base model, with the adapter (ONNX Runtime's multi-LoRA, plain Run) and merged. Time to the
/// first token is a separate one-token request; tokens/s counts every row's new tokens over the full request.
/// With <see cref="Spec.GenAiTool"/>, ONNX Runtime GenAI runs the same prompts (mode "genai", its own KV cache) in a
/// child process on the folders <c>export --format genai</c> writes: the base folder with and without its adapter, and
/// a folder of the merged model.
/// </summary>
public static class GenerateBench
{
    public sealed record Spec(string Preset, int PromptTokens, int NewTokens, IReadOnlyList<int> Batches, IReadOnlyList<string> Modes, IReadOnlyList<string> Variants, int Rank, int Threads, int Seed, string? GenAiTool = null);

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
        var genaiBase = Path.Combine(dir, "genai");
        var genaiMerged = Path.Combine(dir, "genai-merged");
        if (spec.GenAiTool is not null)
        {
            GenAiFolder.Write(adapter, rw, genaiBase);
            SetThreads(Path.Combine(genaiBase, GenAiFolder.ConfigFile), spec.Threads);
            var mergedModel = OnnxFile.Load(mergedPath);
            Directory.CreateDirectory(genaiMerged);
            OnnxFile.Save(mergedModel, Path.Combine(genaiMerged, GenAiFolder.ModelFile));
            AtomicFile.WriteAllText(Path.Combine(genaiMerged, GenAiFolder.ConfigFile), GenAiFolder.Config(mergedModel, mergedPath).ToJsonString());
            SetThreads(Path.Combine(genaiMerged, GenAiFolder.ConfigFile), spec.Threads);
            log("exported the genai folders (base with its adapter file; merged)");
        }

        var options = new AdapterHostOptions { IntraOpThreads = spec.Threads };
        using var deploy = AdapterHost.Create(Path.Combine(rw, RunLayout.DeployableModel), options);
        deploy.AddAdapter("bench", adapterPath);
        using var merged = AdapterHost.Create(mergedPath, options);
        var random = new Random(spec.Seed);
        var results = new List<GenerateMeasure>();
        foreach (var batch in spec.Batches)
        {
            var ours = new Dictionary<string, IReadOnlyList<GenerationResult>>();
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
                    ours[variant] = output;
                    var m = new GenerateMeasure(batch, mode, variant, spec.PromptTokens, spec.NewTokens, first, total);
                    results.Add(m);
                    log(string.Create(CultureInfo.InvariantCulture, $"batch {batch}, {mode}, {variant}: first token {first * 1000:F1} ms, {m.TokensPerS:F1} tokens/s ({total:F1} s)"));
                }
            if (spec.GenAiTool is null) continue;
            var promptsFile = Path.Combine(dir, $"prompts-{batch}.json");
            AtomicFile.WriteAllText(promptsFile, JsonSerializer.Serialize(prompts));
            foreach (var variant in spec.Variants)
            {
                var m = RunGenAi(spec, variant, variant == "merged" ? genaiMerged : genaiBase, promptsFile, batch, ours[variant]);
                results.Add(m);
                log(string.Create(CultureInfo.InvariantCulture, $"batch {batch}, genai, {variant}: first token {m.FirstTokenS * 1000:F1} ms, {m.TokensPerS:F1} tokens/s ({m.TotalS:F1} s), tokens {(m.SameTokensAsOurs == true ? "equal" : "differ from")} ours"));
            }
        }
        return results;
    }

    /// <summary>GenAI's session threads, as ours (<c>--threads</c>): the folder is the bench's own.</summary>
    static void SetThreads(string configPath, int threads)
    {
        var config = JsonNode.Parse(File.ReadAllText(configPath))!;
        config["model"]!["decoder"]!["session_options"]!["intra_op_num_threads"] = threads;
        AtomicFile.WriteAllText(configPath, config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>One GenAI request in the child (OnnxLora.GenAiBench: a warm-up, then the timed request); its JSON line.</summary>
    static GenerateMeasure RunGenAi(Spec spec, string variant, string folder, string promptsFile, int batch, IReadOnlyList<GenerationResult> ours)
    {
        var tool = spec.GenAiTool!;
        // the built dll runs under dotnet (the host that runs us, when known); anything else is run as is
        bool dll = tool.EndsWith(".dll", StringComparison.OrdinalIgnoreCase);
        var host = !dll ? tool : Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } h ? h : "dotnet";
        List<string> args = dll ? [tool] : [];
        args.AddRange(["--model", folder, "--prompts", promptsFile, "--new-tokens", spec.NewTokens.ToString(CultureInfo.InvariantCulture)]);
        if (variant == "adapter") args.AddRange(["--adapter", Path.Combine(folder, GenAiFolder.AdapterFile)]);
        var stdout = new BenchProcess("genai", host, args).Output(null);
        var line = stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).LastOrDefault(l => l.StartsWith('{'))
                   ?? throw new InvalidOperationException($"{tool} printed no JSON result line");
        var json = JsonNode.Parse(line)!;
        var tokens = json["tokens"]!.AsArray().Select(row => (IReadOnlyList<int>)row!.AsArray().Select(t => t!.GetValue<int>()).ToList()).ToList();
        bool same = tokens.Count == ours.Count && tokens.Zip(ours).All(p => p.First.SequenceEqual(p.Second.TokenIds));
        return new GenerateMeasure(batch, "genai", variant, spec.PromptTokens, spec.NewTokens, json["first_token_s"]!.GetValue<double>(), json["total_s"]!.GetValue<double>(), same, tokens);
    }
}
