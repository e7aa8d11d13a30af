using System.Text.Json;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;

namespace OnnxLora.Pipeline.Adapters;

/// <summary>Options for <see cref="PeftAdapter.Write"/>.</summary>
public sealed class PeftExportOptions
{
    /// <summary>base_model_name_or_path (e.g. "gpt2"); default: the manifest's base model path.</summary>
    public string? BaseModelNameOrPath { get; init; }

    /// <summary>task_type: "CAUSAL_LM" or "SEQ_CLS"; default: SEQ_CLS when the adapter has extra (head) tensors.</summary>
    public string? TaskType { get; init; }

    /// <summary>
    /// fan_in_fan_out; default: true when every target is a GPT-2 Conv1D module (attn.c_attn, attn.c_proj, mlp.c_fc,
    /// mlp.c_proj) whose weight is stored [in, out], as Hugging Face GPT-2 keeps it.
    /// </summary>
    public bool? FanInFanOut { get; init; }
}

/// <summary>
/// Hugging Face PEFT's LoRA format: a folder with <c>adapter_model.safetensors</c> (<c>base_model.model.&lt;module&gt;.lora_A.weight</c>
/// [r, in] and <c>.lora_B.weight</c> [out, r], B unscaled; trained heads as <c>base_model.model.&lt;module&gt;.&lt;param&gt;</c> listed in
/// modules_to_save) and <c>adapter_config.json</c> (r, lora_alpha, target_modules, use_rslora, fan_in_fan_out, …).
/// PEFT scales the branch by lora_alpha / r (lora_alpha / √r with use_rslora); OnnxLora's plain-alpha scaling is written
/// as the lora_alpha that gives the same scale, per module through alpha_pattern where targets differ.
/// </summary>
public static class PeftAdapter
{
    public const string WeightsFile = "adapter_model.safetensors";
    public const string ConfigFile = "adapter_config.json";
    public const string Prefix = "base_model.model.";
    /// <summary>The classification head's name in PEFT's files (after the prefix): the score Linear's weight, [classes, d].</summary>
    public const string PeftHeadWeight = ClassHead.PeftModule + ".weight";

    /// <summary>Writes <paramref name="adapter"/> as a PEFT adapter folder (both files atomically).</summary>
    public static void Write(string directory, LoraAdapter adapter, PeftExportOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(adapter);
        options ??= new PeftExportOptions();
        var m = adapter.Manifest;
        if (m.Targets.Count == 0) throw new ArgumentException("the adapter has no targets: nothing to export");
        Directory.CreateDirectory(directory);

        var tensors = new List<KeyValuePair<string, SafeTensor>>();
        foreach (var t in m.Targets)
        {
            var a = adapter.A(t).Transpose2D();          // [r, in]
            var b = adapter.B(t).Transpose2D();          // [out, r]
            tensors.Add(new($"{Prefix}{t.Module}.lora_A.weight", SafeTensor.FromFloats(a.Shape, a.Data)));
            tensors.Add(new($"{Prefix}{t.Module}.lora_B.weight", SafeTensor.FromFloats(b.Shape, b.Data)));
        }
        foreach (var (name, x) in adapter.Extras)
        {
            // the classification head is *ForSequenceClassification's score Linear: PEFT saves it as score.weight [classes, d]
            var (key, value) = name == ClassHead.Weight ? (PeftHeadWeight, x.Transpose2D()) : (name, x);
            tensors.Add(new(Prefix + key, SafeTensor.FromFloats(value.Shape, value.Data)));
        }

        bool rs = m.Scaling == LoraScaling.RsLora;
        // the lora_alpha that makes PEFT's scale equal to ours
        double PeftAlpha(LoraTarget t) => rs ? t.Scale * Math.Sqrt(t.Rank) : t.Scale * t.Rank;
        var alphas = m.Targets.GroupBy(PeftAlpha).OrderByDescending(g => g.Count()).ToList();
        double loraAlpha = alphas[0].Key;
        var rankPattern = new JsonObject();
        var alphaPattern = new JsonObject();
        foreach (var t in m.Targets)
        {
            if (t.Rank != m.Rank) rankPattern[t.Module] = t.Rank;
            if (PeftAlpha(t) != loraAlpha) alphaPattern[t.Module] = PeftAlpha(t);
        }
        // module suffixes, PEFT's usual form (the manifest's own patterns may use OnnxLora's "re:"/"all-linear" forms)
        var targetModules = m.Targets.Select(t => t.Module.Split('.')[^1]).Distinct().ToList();
        var modulesToSave = adapter.Extras.Keys.Select(k => k == ClassHead.Weight ? PeftHeadWeight : k).Select(k => k.Contains('.') ? k[..k.LastIndexOf('.')] : k).Distinct().ToList();
        bool fanInFanOut = options.FanInFanOut ?? m.Targets.All(t => !t.WeightTransposed && GptLayout.IsConv1DModule(t.Module));

        var config = new JsonObject
        {
            ["peft_type"] = "LORA",
            ["task_type"] = options.TaskType ?? (adapter.Extras.Count > 0 ? "SEQ_CLS" : "CAUSAL_LM"),
            ["base_model_name_or_path"] = options.BaseModelNameOrPath ?? m.BaseModel,
            ["r"] = m.Rank,
            ["lora_alpha"] = loraAlpha,
            ["lora_dropout"] = m.Dropout,
            ["use_rslora"] = rs,
            ["fan_in_fan_out"] = fanInFanOut,
            ["bias"] = "none",
            ["target_modules"] = new JsonArray(targetModules.Select(s => (JsonNode?)JsonValue.Create(s)).ToArray()),
            ["layers_to_transform"] = m.LayersToTransform is { } layers ? new JsonArray(layers.Select(l => (JsonNode?)JsonValue.Create(l)).ToArray()) : null,
            ["modules_to_save"] = modulesToSave.Count > 0 ? new JsonArray(modulesToSave.Select(s => (JsonNode?)JsonValue.Create(s)).ToArray()) : null,
            ["rank_pattern"] = rankPattern,
            ["alpha_pattern"] = alphaPattern,
            ["init_lora_weights"] = true,
            ["inference_mode"] = true,
        };
        var metadata = new Dictionary<string, string> { ["format"] = "pt" };
        if (adapter.Classifier is { } info) metadata[ClassHead.MetadataKey] = ClassHead.ToJson(info);   // PEFT ignores it; pooling and label names travel
        SafeTensorsFile.Write(Path.Combine(directory, WeightsFile), tensors, metadata);
        AtomicFile.WriteAllText(Path.Combine(directory, ConfigFile), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>True when <paramref name="path"/> is a folder holding a PEFT adapter.</summary>
    public static bool IsPeftDirectory(string path) => Directory.Exists(path) && File.Exists(Path.Combine(path, WeightsFile));

    /// <summary>
    /// Reads a PEFT adapter folder as an adapter of <paramref name="manifest"/>: module names map to the manifest's targets,
    /// every name and shape is checked, A and B are transposed to [in, r] and [r, out], and B is rescaled so that
    /// our scale · A·B equals PEFT's (lora_alpha / r, or / √r, with rank_pattern and alpha_pattern). Other tensors become
    /// extras (heads) under their model names.
    /// </summary>
    public static LoraAdapter Read(string directory, LoraManifest manifest)
    {
        var weightsPath = Path.Combine(directory, WeightsFile);
        var configPath = Path.Combine(directory, ConfigFile);
        if (!File.Exists(weightsPath)) throw new FileNotFoundException($"{directory}: no {WeightsFile} (a PEFT adapter folder holds {WeightsFile} and {ConfigFile})", weightsPath);
        var config = PeftConfig.Load(configPath);
        var (tensors, metadata) = SafeTensorsFile.Read(weightsPath);

        var targets = manifest.Targets.ToDictionary(t => t.Module, StringComparer.Ordinal);
        var lora = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
        var extras = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
        var unknown = new List<string>();
        foreach (var (key, tensor) in tensors)
        {
            var name = Normalize(key);
            bool isA = name.EndsWith(".lora_A.weight", StringComparison.Ordinal), isB = name.EndsWith(".lora_B.weight", StringComparison.Ordinal);
            if (!isA && !isB)
            {
                if (name.Contains(".lora_", StringComparison.Ordinal)) unknown.Add(key);   // lora_embedding_*, magnitude vectors, …
                else if (name == PeftHeadWeight) extras[ClassHead.Weight] = new AdapterTensor(tensor.Shape, Floats(tensor, key)).Transpose2D();
                else extras[name] = new AdapterTensor(tensor.Shape, Floats(tensor, key));
                continue;
            }
            var module = name[..^".lora_A.weight".Length];
            if (!targets.TryGetValue(module, out var t)) { unknown.Add(key); continue; }
            long[] expected = isA ? [t.Rank, t.In] : [t.Out, t.Rank];
            if (!tensor.Shape.SequenceEqual(expected))
                throw new InvalidDataException($"{weightsPath}: tensor '{key}' has shape [{string.Join(", ", tensor.Shape)}], module '{module}' needs " +
                    $"[{string.Join(", ", expected)}] ({(isA ? "[r, in]" : "[out, r]")} with r = {t.Rank}); was the adapter trained with another rank or base model?");
            if (config.RankFor(module) != t.Rank)
                throw new InvalidDataException($"{configPath}: r for module '{module}' is {config.RankFor(module)}, but its tensor '{key}' has rank {t.Rank}; " +
                    "fix r / rank_pattern (PEFT's scale is lora_alpha / r)");
            var x = new AdapterTensor(tensor.Shape, Floats(tensor, key)).Transpose2D();
            if (isA) lora[t.LoraA] = x;
            else lora[t.LoraB] = x.Scaled(config.ScaleFor(module) / t.Scale);
        }
        if (unknown.Count > 0)
            throw new InvalidDataException($"{weightsPath}: {unknown.Count} LoRA tensor(s) do not belong to a module of the manifest: {LoraAdapter.Preview(unknown)}; " +
                $"the manifest adapts {LoraAdapter.Preview(manifest.Targets.Select(t => t.Module).ToList())}. Rewrite the base with the adapter's target_modules.");
        return LoraAdapter.Create(manifest, lora, extras, weightsPath, ClassHead.ReadInfo(metadata, weightsPath));

        float[] Floats(SafeTensor tensor, string key) => tensor.DType is "F32" or "F16" or "BF16" or "F64" ? tensor.ToFloats()
            : throw new InvalidDataException($"{weightsPath}: tensor '{key}' has dtype {tensor.DType}; adapter tensors are F32, F16, BF16 or F64");
    }

    /// <summary>Strips "base_model.model." and PEFT's adapter-name infixes (".default", "modules_to_save.default.").</summary>
    static string Normalize(string key)
    {
        var name = key.StartsWith(Prefix, StringComparison.Ordinal) ? key[Prefix.Length..] : key;
        return name.Replace(".modules_to_save.default.", ".", StringComparison.Ordinal)
                   .Replace(".lora_A.default.weight", ".lora_A.weight", StringComparison.Ordinal)
                   .Replace(".lora_B.default.weight", ".lora_B.weight", StringComparison.Ordinal);
    }

    /// <summary>
    /// The parts of adapter_config.json that decide PEFT's scale, each checked for its JSON type and range: r and
    /// rank_pattern ranks are positive integers, lora_alpha and alpha_pattern values finite numbers, use_rslora a boolean.
    /// </summary>
    sealed record PeftConfig(string Path, int Rank, double Alpha, bool UseRsLora, IReadOnlyList<(string Key, double Value)> RankPattern, IReadOnlyList<(string Key, double Value)> AlphaPattern)
    {
        public static PeftConfig Load(string path)
        {
            if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file (PEFT writes {ConfigFile} beside {WeightsFile}; its r and lora_alpha give the scale)", path);
            InvalidDataException Bad(string what) => new($"{path}: {what}");
            JsonObject json;
            try
            {
                // a key given twice is an error here, not later when JsonObject indexes its members (found by afl++)
                json = JsonNode.Parse(File.ReadAllText(path), documentOptions: new JsonDocumentOptions { AllowDuplicateProperties = false }) as JsonObject
                    ?? throw Bad("expected a JSON object of PEFT settings");
            }
            catch (JsonException e) { throw Bad($"not valid JSON ({e.Message})"); }
            var type = json["peft_type"] is { } t ? String(t, "peft_type") : null;
            if (type is not null && type != "LORA") throw Bad($"peft_type is '{type}'; only LORA adapters can be imported");
            int rank = Rank(json["r"] ?? throw Bad("no 'r'"), "r");
            // PEFT's default lora_alpha (8) is not guessed: the scale depends on it
            double alpha = Alpha(json["lora_alpha"] ?? throw Bad("no 'lora_alpha'"), "lora_alpha");
            bool rs = json["use_rslora"] is { } r ? Bool(r, "use_rslora") : false;
            return new PeftConfig(path, rank, alpha, rs, Pattern(json["rank_pattern"], "rank_pattern", (n, k) => Rank(n, k)), Pattern(json["alpha_pattern"], "alpha_pattern", Alpha));

            string String(JsonNode node, string key) =>
                node is JsonValue v && v.TryGetValue<string>(out var x) ? x : throw Bad($"'{key}' is {node.ToJsonString()}, expected a string");
            bool Bool(JsonNode node, string key) =>
                node is JsonValue v && v.TryGetValue<bool>(out var x) ? x : throw Bad($"'{key}' is {node.ToJsonString()}, expected true or false");
            double Number(JsonNode node, string key) =>
                node is JsonValue v && v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<double>(out var x) && double.IsFinite(x) ? x
                : throw Bad($"'{key}' is {node.ToJsonString()}, expected a finite number");
            int Rank(JsonNode node, string key)
            {
                double x = Number(node, key);
                return x >= 1 && x <= MaxRank && x == Math.Floor(x) ? (int)x : throw Bad($"'{key}' is {node.ToJsonString()}, expected a whole number from 1 to {MaxRank}");
            }
            double Alpha(JsonNode node, string key)
            {
                double x = Number(node, key);
                // |alpha| past 1e6 turns B into infinities or silently loses it to float rounding: no trained adapter has one
                return x > 0 && x <= MaxAlpha ? x : throw Bad($"'{key}' is {node.ToJsonString()}, expected a number in (0, {MaxAlpha:G}]");
            }
            List<(string, double)> Pattern(JsonNode? node, string key, Func<JsonNode, string, double> value) => node switch
            {
                null => [],
                JsonObject o => o.Select(kv => (kv.Key, value(kv.Value ?? throw Bad($"'{key}.{kv.Key}' is null"), $"{key}.{kv.Key}"))).ToList(),
                _ => throw Bad($"'{key}' is {node.ToJsonString()}, expected an object of module pattern → value"),
            };
        }

        const int MaxRank = 1 << 16;
        const double MaxAlpha = 1e6;

        /// <summary>PEFT's pattern lookup through <see cref="LoraTargeting.MatchesPatternKey"/>: first matching key wins.</summary>
        double? Match(IReadOnlyList<(string Key, double Value)> pattern, string module, string field)
        {
            foreach (var (key, value) in pattern)
            {
                try { if (LoraTargeting.MatchesPatternKey(key, module)) return value; }
                catch (ArgumentException e) { throw new InvalidDataException($"{Path}: '{field}' key: {e.Message}", e); }
            }
            return null;
        }

        /// <summary>The rank PEFT uses for <paramref name="module"/> (rank_pattern, else r).</summary>
        public int RankFor(string module) => (int)(Match(RankPattern, module, "rank_pattern") ?? Rank);

        public double ScaleFor(string module)
        {
            double r = RankFor(module), a = Match(AlphaPattern, module, "alpha_pattern") ?? Alpha;
            return UseRsLora ? a / Math.Sqrt(r) : a / r;
        }
    }
}
