using System.Globalization;
using System.Text.Json.Nodes;
using Onnx;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>
/// A model folder ONNX Runtime GenAI (Microsoft.ML.OnnxRuntimeGenAI 0.20) opens as is: <c>genai_config.json</c>, the
/// deployable decoder with its KV cache (<see cref="ModelFile"/>; LoRA parameters stay optional inputs), and the
/// adapter as <see cref="AdapterFile"/>, which GenAI's <c>Adapters.LoadAdapter</c> + <c>Generator.SetActiveAdapter</c>
/// apply per generator. GenAI runs only models with a cache, so the rewrite must come from a with-past export.
/// </summary>
public static class GenAiFolder
{
    public const string ConfigFile = "genai_config.json", ModelFile = "model.onnx", AdapterFile = "adapter.onnx_adapter";

    /// <summary>The tokenizer files ONNX Runtime GenAI reads from the model folder, copied from a Hugging Face folder when present.</summary>
    public static readonly string[] TokenizerFiles = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model"];

    /// <summary>
    /// Writes the folder for <paramref name="adapter"/> and the rewrite in <paramref name="rewriteDir"/> into
    /// <paramref name="outDir"/> (existing, empty or ours). <paramref name="hfFolder"/>, the model's Hugging Face folder,
    /// gives the special token ids (config.json, generation_config.json) and the tokenizer files.
    /// </summary>
    public static void Write(LoraAdapter adapter, string rewriteDir, string outDir, string? hfFolder = null)
    {
        ArgumentNullException.ThrowIfNull(adapter);
        var deployPath = Path.Combine(rewriteDir, RunLayout.DeployableModel);
        if (!File.Exists(deployPath)) throw new FileNotFoundException($"{deployPath}: no deployable model; the genai format needs the rewrite folder's {RunLayout.DeployableModel}", deployPath);
        var model = OnnxFile.Load(deployPath);
        var config = Config(model, deployPath);
        if (hfFolder is not null) SpecialTokens(config, hfFolder);
        Directory.CreateDirectory(outDir);
        if (hfFolder is not null)
            foreach (var name in TokenizerFiles.Where(n => File.Exists(Path.Combine(hfFolder, n))))
                AtomicFile.WriteAllBytes(Path.Combine(outDir, name), File.ReadAllBytes(Path.Combine(hfFolder, name)));
        OnnxFile.Save(model, Path.Combine(outDir, ModelFile));
        OnnxAdapterFile.Write(Path.Combine(outDir, AdapterFile), adapter, new OnnxAdapterWriteOptions { DeployableModel = model });
        AtomicFile.WriteAllText(Path.Combine(outDir, ConfigFile), config.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>
    /// genai_config.json for <paramref name="model"/>: names and cache shape from its signature (roles), sizes and the model
    /// type from the builder's metadata (<see cref="GptBuilder.ConfigMetadataKey"/> / <see cref="LlamaBuilder.ConfigMetadataKey"/>, kept by the rewrite).
    /// </summary>
    public static JsonObject Config(ModelProto model, string source)
    {
        ModelRoles roles;
        try { roles = SignatureRoles.Decide(model, source: source); }
        catch (ArgumentException e) { throw new InvalidDataException(e.Message, e); }
        var keys = roles.Inputs.Where(i => i.Role == IoRole.PastKey).OrderBy(i => i.Layer).ToList();
        var values = roles.Inputs.Where(i => i.Role == IoRole.PastValue).OrderBy(i => i.Layer).ToList();
        if (keys.Count == 0 || keys.Count != values.Count)
            throw new InvalidDataException($"{source}: ONNX Runtime GenAI needs a KV cache (past_key_values.{{i}}.key|value in, present.{{i}}.key|value out); rewrite a with-past export (onnxlora model build --with-past, or optimum-cli export onnx --task text-generation-with-past)");
        int kvHeads = FixedDim(keys[0], 1, "kv_heads", source), headSize = FixedDim(keys[0], 3, "head_dim", source);
        var logits = roles.Outputs.First(o => o.Role == IoRole.Logits);
        if (logits.Dims is not { Count: 3 } || logits.Dims[2].Value is not long vocab)
            throw new InvalidDataException($"{source}: output '{logits.Name}' must be [batch, tokens, vocab] with a fixed vocab for ONNX Runtime GenAI");

        var meta = model.MetadataProps.ToDictionary(p => p.Key, p => p.Value);
        JsonNode? hf = meta.TryGetValue(GptBuilder.ConfigMetadataKey, out var g) ? JsonNode.Parse(g)
                     : meta.TryGetValue(LlamaBuilder.ConfigMetadataKey, out var l) ? JsonNode.Parse(l) : null;
        if (hf is null)
            throw new InvalidDataException($"{source}: no {GptBuilder.ConfigMetadataKey} / {LlamaBuilder.ConfigMetadataKey} metadata, so the model type, head count and context length are unknown; build the model with 'onnxlora model build' (--from a Hugging Face folder, --with-past)");
        // GenAI's "gpt2" type runs the older stacked cache (past_%d); Optimum's split key/value cache runs in its
        // generic decoder-only model, which the "decoder" type selects
        string type = hf["model_type"]?.GetValue<string>() ?? "gpt2";
        if (type == "gpt2") type = "decoder";
        int? Int(params string[] names) => names.Select(n => hf[n]?.GetValue<int>()).FirstOrDefault(v => v is not null);
        int heads = Int("num_attention_heads", "n_head") ?? kvHeads;
        int context = Int("max_position_embeddings", "n_positions") ?? throw new InvalidDataException($"{source}: the metadata gives no context length");
        // GPT-2's vocabulary ends with <|endoftext|>, its bos, eos and pad; others: the config's ids, else 0
        int special = vocab == 50257 ? 50256 : 0;
        int bos = Int("bos_token_id") ?? special, eos = Int("eos_token_id") ?? special, pad = Int("pad_token_id") ?? eos;

        var inputs = new JsonObject { ["input_ids"] = roles.InputIds };
        if (roles.Input(IoRole.AttentionMask) is { } mask) inputs["attention_mask"] = mask;
        if (roles.Input(IoRole.PositionIds) is { } positions) inputs["position_ids"] = positions;
        inputs["past_key_names"] = Template(keys, source);
        inputs["past_value_names"] = Template(values, source);
        var outputs = new JsonObject
        {
            ["logits"] = logits.Name,
            ["present_key_names"] = Template(roles.Outputs.Where(o => o.Role == IoRole.PresentKey).OrderBy(o => o.Layer).ToList(), source),
            ["present_value_names"] = Template(roles.Outputs.Where(o => o.Role == IoRole.PresentValue).OrderBy(o => o.Layer).ToList(), source),
        };
        return new JsonObject
        {
            ["model"] = new JsonObject
            {
                ["type"] = type,
                ["bos_token_id"] = bos, ["eos_token_id"] = eos, ["pad_token_id"] = pad,
                ["context_length"] = context,
                ["vocab_size"] = vocab,
                ["decoder"] = new JsonObject
                {
                    ["session_options"] = new JsonObject { ["log_id"] = "onnxruntime-genai", ["provider_options"] = new JsonArray() },
                    ["filename"] = ModelFile,
                    ["head_size"] = headSize,
                    ["hidden_size"] = Int("hidden_size", "n_embd") ?? heads * headSize,
                    ["num_attention_heads"] = heads,
                    ["num_key_value_heads"] = kvHeads,
                    ["num_hidden_layers"] = keys.Count,
                    ["inputs"] = inputs,
                    ["outputs"] = outputs,
                },
            },
            // greedy, as `onnxlora generate` defaults; the cache is concatenated by the graph, not shared in place
            ["search"] = new JsonObject
            {
                ["do_sample"] = false, ["num_beams"] = 1, ["num_return_sequences"] = 1, ["max_length"] = context, ["min_length"] = 0,
                ["temperature"] = 1.0, ["top_k"] = 1, ["top_p"] = 1.0, ["repetition_penalty"] = 1.0, ["length_penalty"] = 1.0,
                ["no_repeat_ngram_size"] = 0, ["diversity_penalty"] = 0.0, ["early_stopping"] = true, ["past_present_share_buffer"] = false,
            },
        };
    }

    /// <summary>bos/eos/pad ids from the folder's config.json, then generation_config.json (a list of eos ids: the first).</summary>
    static void SpecialTokens(JsonObject config, string hfFolder)
    {
        if (!Directory.Exists(hfFolder)) throw new DirectoryNotFoundException($"{hfFolder}: no such folder (the model's Hugging Face folder)");
        var model = config["model"]!.AsObject();
        foreach (var file in new[] { "config.json", "generation_config.json" })
        {
            var path = Path.Combine(hfFolder, file);
            if (!File.Exists(path)) continue;
            JsonNode? json;
            try { json = JsonNode.Parse(File.ReadAllText(path)); }
            catch (System.Text.Json.JsonException e) { throw new InvalidDataException($"{path}: not valid JSON ({e.Message})", e); }
            foreach (var key in new[] { "bos_token_id", "eos_token_id", "pad_token_id" })
            {
                var value = json?[key];
                if (value is JsonArray list) value = list.FirstOrDefault();
                if (value is null) continue;
                if (value.GetValueKind() != System.Text.Json.JsonValueKind.Number || !int.TryParse(value.ToJsonString(), NumberStyles.None, CultureInfo.InvariantCulture, out var id))
                    throw new InvalidDataException($"{path}: {key} must be a token id (a non-negative integer), got {value.ToJsonString()}");
                model[key] = id;
            }
        }
    }

    static int FixedDim(SignatureEntry entry, int axis, string what, string source) =>
        entry.Dims is { Count: 4 } d && d[axis].Value is long v ? checked((int)v)
            : throw new InvalidDataException($"{source}: input '{entry.Name}' needs a fixed {what} (dim {axis}) for genai_config.json");

    /// <summary>GenAI's printf-style name template (<c>past_key_values.%d.key</c>) that gives every layer's name.</summary>
    static string Template(List<SignatureEntry> layers, string source)
    {
        if (layers.Count == 0) throw new InvalidDataException($"{source}: the model has past inputs but no matching present outputs");
        var first = layers[0];
        var template = first.Name.Replace($".{first.Layer}.", ".%d.", StringComparison.Ordinal);
        for (int i = 0; i < layers.Count; i++)
            if (layers[i].Layer != i || template.Replace("%d", i.ToString(CultureInfo.InvariantCulture), StringComparison.Ordinal) != layers[i].Name)
                throw new InvalidDataException($"{source}: cache names like '{layers[i].Name}' do not follow one template with the layer number (e.g. past_key_values.%d.key) for layers 0..{layers.Count - 1}, as ONNX Runtime GenAI needs");
        return template;
    }
}
