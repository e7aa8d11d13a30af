using System.Text.Json;
using System.Text.Json.Nodes;

namespace OnnxLora.Models;

public sealed partial class GptWeights
{
    static readonly string[] FloatDTypes = ["F32", "F16", "BF16", "F64"];

    /// <summary>
    /// Reads a Hugging Face GPT-2 <c>model.safetensors</c> (GPT2LMHeadModel names with the <c>transformer.</c> prefix,
    /// or GPT2Model names without it). Vocabulary, context, width, layers and <c>c_attn</c> bias are read from the
    /// shapes; the head count (and LayerNorm epsilon) from <paramref name="config"/>, or without one from the Hugging
    /// Face <c>config.json</c> beside the file (<c>n_head</c>, <c>layer_norm_epsilon</c>), or else from the preset of
    /// the same width.
    /// With a <paramref name="config"/> every shape must match it. Every expected tensor's name, dtype (F32, F16,
    /// BF16 or F64, converted to float32) and shape is checked before anything is copied; errors name the file and
    /// the tensor. The causal-mask buffers (<c>attn.bias</c>, <c>attn.masked_bias</c>) are skipped, and a
    /// <c>lm_head.weight</c> is accepted only as a tied copy of <c>wte</c> (or in its place when <c>wte</c> is left out).
    /// </summary>
    /// <exception cref="FileNotFoundException">No file at <paramref name="path"/>.</exception>
    /// <exception cref="InvalidDataException">Not a safetensors file, or not a GPT-2 checkpoint of the expected shape.</exception>
    public static GptWeights FromSafeTensors(string path, GptConfig? config = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        config?.Validate();
        return Import(SafeTensorsFile.Read(path).Tensors, path, config);
    }

    /// <summary>
    /// The weights of a Hugging Face GPT2LMHeadModel folder (<see cref="HfCheckpoint"/>: one model.safetensors or shards),
    /// checked as <see cref="FromSafeTensors"/> checks them; the head count comes from its config.json. Consumes
    /// <paramref name="checkpoint"/> (its tensors are handed over).
    /// </summary>
    public static GptWeights FromCheckpoint(HfCheckpoint checkpoint, GptConfig? config = null)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        config?.Validate();
        var files = checkpoint.Tensors.Values.Select(t => t.File).Distinct().ToList();
        // errors name the one weights file, or the shard index (beside config.json either way)
        var what = files.Count == 1 ? files[0] : Path.Combine(checkpoint.Directory, HfCheckpoint.IndexFile);
        var raw = checkpoint.Tensors.ToDictionary(kv => kv.Key, kv => kv.Value.Tensor, StringComparer.Ordinal);
        checkpoint.Tensors.Clear();   // Import drops each buffer once converted; the checkpoint must not keep them alive
        return Import(raw, what, config);
    }

    static GptWeights Import(Dictionary<string, SafeTensor> raw, string path, GptConfig? config)
    {
        bool prefixed = raw.Keys.Any(k => k.StartsWith(GptLayout.Prefix, StringComparison.Ordinal));
        string InFile(string fullName) => prefixed ? fullName : fullName[GptLayout.Prefix.Length..];
        InvalidDataException Error(string message) =>
            new($"{path}: {message}. Is this a Hugging Face GPT-2 model.safetensors?");

        // 1. Names: one canonical (prefixed) name per parameter; buffers and the tied head set aside.
        var byName = new Dictionary<string, (string Key, SafeTensor Tensor)>(StringComparer.Ordinal);
        (string Key, SafeTensor Tensor)? lmHead = null;
        var blocks = new SortedSet<int>();
        foreach (var (key, tensor) in raw)
        {
            if (key == GptLayout.LmHead) { lmHead = (key, tensor); continue; }
            var local = key.StartsWith(GptLayout.Prefix, StringComparison.Ordinal) ? key[GptLayout.Prefix.Length..] : key;
            var block = BlockName().Match(local);
            if (block.Success)
            {
                if (GptLayout.IgnoredBlockBuffers.Contains(block.Groups[2].Value)) continue;
                // the index sizes the model: bound it by what the file holds before anything is allocated from it
                if (!int.TryParse(block.Groups[1].Value, out var index) || index >= raw.Count)
                    throw Error($"tensor '{key}' names block {block.Groups[1].Value}, but the file holds only {raw.Count} tensors");
                blocks.Add(index);
            }
            if (!byName.TryAdd(GptLayout.Prefix + local, (key, tensor)))
                throw Error($"tensors '{byName[GptLayout.Prefix + local].Key}' and '{key}' are the same parameter");
        }

        // a tied checkpoint may keep the head and drop the embedding: they are one tensor
        if (!byName.ContainsKey(GptLayout.TokenEmbedding) && lmHead is { } onlyHead)
        {
            byName[GptLayout.TokenEmbedding] = onlyHead;
            lmHead = null;
        }

        // 2. Shape: from the embeddings and the block count, unless a config was given.
        if (config is null)
        {
            var wte = Expect2D(GptLayout.TokenEmbedding, "[vocab, width]");
            var wpe = Expect2D(GptLayout.PositionEmbedding, "[context, width]");
            if (blocks.Count == 0) throw Error("no transformer blocks (no 'h.0.…' tensors)");
            if (blocks.Max + 1 != blocks.Count)
                throw Error($"block indices are not 0..{blocks.Count - 1}: block {Enumerable.Range(0, blocks.Max + 1).First(i => !blocks.Contains(i))} is missing (the file has up to 'h.{blocks.Max}')");
            int width = checked((int)wte.Shape[1]);
            // the head count is not in any shape: a Hugging Face config.json beside the file says it, else the preset of that width
            var (heads, epsilon) = ReadHfConfig(path)
                ?? (GptConfig.PresetWithWidth(width) is { } preset ? (preset.Heads, preset.LayerNormEpsilon)
                    : throw Error($"width {width} ('{InFile(GptLayout.TokenEmbedding)}' {Show(wte.Shape)}) matches no preset and there is no config.json beside it, so the head count is unknown; pass a GptConfig with Heads"));
            bool qkvBias = byName.ContainsKey(GptLayout.Block(0, "attn.c_attn.bias"));
            try
            {
                config = new GptConfig(checked((int)wte.Shape[0]), checked((int)wpe.Shape[0]), width, heads, blocks.Max + 1, epsilon, qkvBias);
            }
            catch (ArgumentException e) { throw Error(e.Message); }
        }

        // 3. Assert every expected tensor (name, dtype, shape) and nothing else, before copying anything.
        var layout = GptLayout.Tensors(config);
        var missing = new List<string>();
        foreach (var (name, shape) in layout)
        {
            if (!byName.TryGetValue(name, out var entry)) { missing.Add(InFile(name)); continue; }
            var (key, tensor) = entry;
            if (!FloatDTypes.Contains(tensor.DType))
                throw Error($"tensor '{key}' has dtype {tensor.DType}; expected one of {string.Join(", ", FloatDTypes)}");
            if (tensor.Shape.SequenceEqual(shape)) continue;
            bool transposed = GptLayout.IsConv1DWeight(name) && tensor.Shape.SequenceEqual(shape.Reverse());
            throw Error($"tensor '{key}' has shape {Show(tensor.Shape)}, {config} needs {Show(shape)}" +
                        (transposed ? " (it looks like nn.Linear [out, in] layout; GPT-2's Conv1D weights are [in, out])" : ""));
        }
        if (missing.Count > 0)
            throw Error($"missing tensor '{missing[0]}'{(missing.Count > 1 ? $" and {missing.Count - 1} more" : "")} for {config} " +
                        $"(the file has {byName.Count} parameter tensors, {layout.Count} expected)");
        var expected = layout.Select(t => t.Name).ToHashSet();
        var unexpected = byName.Where(kv => !expected.Contains(kv.Key)).Select(kv => kv.Value.Key).ToList();
        if (unexpected.Count > 0)
            throw Error($"unexpected tensor '{unexpected[0]}'{(unexpected.Count > 1 ? $" and {unexpected.Count - 1} more" : "")} for {config}");
        float[]? tiedHead = null;
        if (lmHead is var (headKey, head))
        {
            var wteTensor = byName[GptLayout.TokenEmbedding].Tensor;
            if (!head.Shape.SequenceEqual(wteTensor.Shape) || !FloatDTypes.Contains(head.DType))
                throw Error($"tensor '{headKey}' ({head.DType} {Show(head.Shape)}) is not a tied copy of '{InFile(GptLayout.TokenEmbedding)}' {Show(wteTensor.Shape)}");
            tiedHead = head.ToFloats();
        }

        // 4. Copy, dropping each file buffer once converted so a large checkpoint is not held twice.
        var tensors = new Dictionary<string, WeightTensor>(layout.Count, StringComparer.Ordinal);
        foreach (var (name, shape) in layout)
        {
            tensors[name] = new WeightTensor(shape, byName[name].Tensor.ToFloats());
            raw.Remove(byName[name].Key);
            byName.Remove(name);
        }
        if (tiedHead is not null && !tiedHead.AsSpan().SequenceEqual(tensors[GptLayout.TokenEmbedding].Values))
            throw Error($"tensor '{GptLayout.LmHead}' differs from '{InFile(GptLayout.TokenEmbedding)}'; only GPT-2's tied LM head is supported");
        return new GptWeights(config, tensors);

        (int Heads, double Epsilon)? ReadHfConfig(string weightsPath)
        {
            var file = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(weightsPath))!, "config.json");
            if (!File.Exists(file)) return null;
            try
            {
                var json = JsonNode.Parse(File.ReadAllText(file), documentOptions: new JsonDocumentOptions { AllowDuplicateProperties = false })?.AsObject();
                if (json?["n_head"] is not { } heads) return null;
                return (heads.GetValue<int>(), json["layer_norm_epsilon"]?.GetValue<double>() ?? 1e-5);
            }
            catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
            {
                throw new InvalidDataException($"{file}: cannot read n_head/layer_norm_epsilon ({e.Message}); fix it or pass a GptConfig", e);
            }
        }

        SafeTensor Expect2D(string name, string what)
        {
            if (!byName.TryGetValue(name, out var entry)) throw Error($"missing tensor '{InFile(name)}' {what}");
            if (entry.Tensor.Shape.Length != 2) throw Error($"tensor '{entry.Key}' has shape {Show(entry.Tensor.Shape)}, expected {what}");
            return entry.Tensor;
        }
    }
}
