using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>
/// How a GPT-style deployable model is fed: token ids [batch, tokens] (int64 "input_ids", or its only int64 input),
/// optional "attention_mask" and "position_ids", and the logits output ("logits", or the first output).
/// </summary>
internal sealed class ModelSignature
{
    public required string InputIds { get; init; }
    public string? AttentionMask { get; init; }
    public string? PositionIds { get; init; }
    public required string Logits { get; init; }
    /// <summary>Rank of the logits: 3 = [batch, tokens, vocab or classes], 2 = [batch, classes].</summary>
    public required int LogitsRank { get; init; }
    /// <summary>Size of the last logits dim when the model declares it.</summary>
    public int? LogitsWidth { get; init; }
    /// <summary>A fixed token count the model declares for its ids input (inputs are padded to it), or null.</summary>
    public int? FixedTokens { get; init; }
    public required TensorElementType IdsType { get; init; }
    /// <summary>The most tokens the model takes: its fixed token count, or n_positions from the builder's metadata; null = unknown.</summary>
    public int? ContextLength { get; init; }

    public static ModelSignature Of(AdapterHost host)
    {
        var inputs = host.Inputs;
        var ids = inputs.ContainsKey("input_ids") ? "input_ids"
            : inputs.Where(kv => kv.Value.ElementDataType is TensorElementType.Int64 or TensorElementType.Int32 && kv.Value.Dimensions.Length == 2)
                    .Select(kv => kv.Key).SingleOrDefault()
            ?? throw new InvalidDataException($"{host.ModelPath}: no token-ids input (expected 'input_ids' [batch, tokens]; inputs: {string.Join(", ", inputs.Keys)})");
        string? mask = inputs.ContainsKey("attention_mask") ? "attention_mask" : null;
        string? positions = inputs.ContainsKey("position_ids") ? "position_ids" : null;
        var other = inputs.Keys.Where(k => k != ids && k != mask && k != positions).ToList();
        if (other.Count > 0)
            throw new InvalidDataException($"{host.ModelPath}: inputs {string.Join(", ", other.Select(o => $"'{o}'"))} are not token ids, attention_mask or position_ids " +
                "(a model with a KV cache, past_key_values, is not supported yet; export it without)");
        var outputs = host.Outputs;
        var logits = outputs.ContainsKey("logits") ? "logits" : outputs.Keys.First();
        var dims = outputs[logits].Dimensions;
        if (dims.Length is not (2 or 3)) throw new InvalidDataException($"{host.ModelPath}: output '{logits}' has rank {dims.Length}; expected [batch, tokens, vocab] or [batch, classes]");
        int seq = inputs[ids].Dimensions[1];
        return new ModelSignature
        {
            InputIds = ids, AttentionMask = mask, PositionIds = positions, Logits = logits, LogitsRank = dims.Length,
            LogitsWidth = dims[^1] > 0 ? dims[^1] : null, FixedTokens = seq > 0 ? seq : null,
            IdsType = inputs[ids].ElementDataType,
            ContextLength = seq > 0 ? seq : PositionsFromMetadata(host),
        };
    }

    /// <summary>n_positions from the OnnxLora builder's "onnxlora.gpt_config" metadata (kept by rewrites), if present.</summary>
    static int? PositionsFromMetadata(AdapterHost host)
    {
        if (!host.ModelMetadata.TryGetValue("onnxlora.gpt_config", out var json)) return null;
        try { return System.Text.Json.Nodes.JsonNode.Parse(json)?["n_positions"]?.GetValue<int>(); }
        catch (Exception e) when (e is System.Text.Json.JsonException or InvalidOperationException or FormatException) { return null; }
    }

    /// <summary>Builds the feeds for a right-padded batch of rows (each at most <paramref name="width"/> tokens).</summary>
    public Dictionary<string, OrtValue> Feeds(IReadOnlyList<IReadOnlyList<int>> rows, int width, int padId)
    {
        int batch = rows.Count;
        var ids = new long[batch * width];
        var mask = new long[batch * width];
        var positions = new long[batch * width];
        for (int b = 0; b < batch; b++)
            for (int t = 0; t < width; t++)
            {
                bool real = t < rows[b].Count;
                ids[b * width + t] = real ? rows[b][t] : padId;
                mask[b * width + t] = real ? 1 : 0;
                positions[b * width + t] = t;
            }
        long[] shape = [batch, width];
        var feeds = new Dictionary<string, OrtValue>
        {
            [InputIds] = IdsType == TensorElementType.Int32
                ? OrtValue.CreateTensorValueFromMemory(Array.ConvertAll(ids, v => (int)v), shape)
                : OrtValue.CreateTensorValueFromMemory(ids, shape),
        };
        if (AttentionMask is not null) feeds[AttentionMask] = OrtValue.CreateTensorValueFromMemory(mask, shape);
        if (PositionIds is not null) feeds[PositionIds] = OrtValue.CreateTensorValueFromMemory(positions, shape);
        return feeds;
    }

    public void CheckIds(IReadOnlyList<int> ids, string what)
    {
        foreach (var id in ids)
            if (id < 0 || (LogitsRank == 3 && LogitsWidth is int v && id >= v))
                throw new ArgumentOutOfRangeException(what, id, $"token id {id} is outside the model's vocabulary [0, {LogitsWidth}); was the text tokenized for another model?");
    }
}
