using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Models;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>
/// How a deployable decoder is fed, from the roles of its inputs and outputs (<see cref="SignatureRoles"/>, with the
/// overrides the rewrite recorded in the model and those the host was given): token ids, optional attention_mask,
/// position_ids, token_type_ids, cache_position and KV-cache inputs (fed empty: the graph recomputes the whole context),
/// and the logits output.
/// </summary>
internal sealed class ModelSignature
{
    public required ModelRoles Roles { get; init; }
    public string InputIds => Roles.InputIds;
    public string? AttentionMask => Roles.Input(IoRole.AttentionMask);
    public string? PositionIds => Roles.Input(IoRole.PositionIds);
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
        ModelRoles roles;
        try { roles = SignatureRoles.Decide(Describe(host.Inputs), Describe(host.Outputs), host.InputRoles, host.ModelPath); }
        catch (ArgumentException e) { throw new InvalidDataException(e.Message, e); }
        var logits = roles.Logits;
        var dims = host.Outputs[logits].Dimensions;
        if (dims.Length is not (2 or 3)) throw new InvalidDataException($"{host.ModelPath}: output '{logits}' has rank {dims.Length}; expected [batch, tokens, vocab] or [batch, classes]");
        var ids = host.Inputs[roles.InputIds];
        int seq = ids.Dimensions[1];
        return new ModelSignature
        {
            Roles = roles, Logits = logits, LogitsRank = dims.Length,
            LogitsWidth = dims[^1] > 0 ? dims[^1] : null, FixedTokens = seq > 0 ? seq : null,
            IdsType = ids.ElementDataType,
            ContextLength = seq > 0 ? seq : PositionsFromMetadata(host),
        };
    }

    static List<IoDescription> Describe(IReadOnlyDictionary<string, NodeMetadata> values) =>
        values.Select(kv => new IoDescription(kv.Key, (DataType)(int)kv.Value.ElementDataType,
            kv.Value.IsTensor ? kv.Value.Dimensions.Select((d, i) => d >= 0 ? new Dim(d) : new Dim(null, NullIfEmpty(kv.Value.SymbolicDimensions, i))).ToList() : null)).ToList();

    static string? NullIfEmpty(string[] symbols, int i) => i < symbols.Length && symbols[i].Length > 0 ? symbols[i] : null;

    /// <summary>n_positions from the OnnxLora builder's <see cref="GptBuilder.ConfigMetadataKey"/> metadata (kept by rewrites), if present.</summary>
    static int? PositionsFromMetadata(AdapterHost host)
    {
        if (!host.ModelMetadata.TryGetValue(GptBuilder.ConfigMetadataKey, out var json)) return null;
        try { return System.Text.Json.Nodes.JsonNode.Parse(json)?["n_positions"]?.GetValue<int>(); }
        catch (Exception e) when (e is System.Text.Json.JsonException or InvalidOperationException or FormatException) { return null; }
    }

    /// <summary>
    /// Builds the feeds for a batch of rows (each at most <paramref name="width"/> tokens), right-padded, or left-padded
    /// for batched generation (every row's last token in the last column); positions come from the mask.
    /// </summary>
    public Dictionary<string, OrtValue> Feeds(IReadOnlyList<IReadOnlyList<int>> rows, int width, int padId, bool leftPad = false)
    {
        var tokens = PaddedTokens.Pad(rows, width, padId, leftPad);
        var feeds = new Dictionary<string, OrtValue>();
        try
        {
            foreach (var input in Roles.Inputs) feeds[input.Name] = SignatureFeeds.Create(input, tokens);
            return feeds;
        }
        catch
        {
            foreach (var v in feeds.Values) v.Dispose();
            throw;
        }
    }

    public void CheckIds(IReadOnlyList<int> ids, string what)
    {
        foreach (var id in ids)
            if (id < 0 || (LogitsRank == 3 && LogitsWidth is int v && id >= v))
                throw new ArgumentOutOfRangeException(what, id, $"token id {id} is outside the model's vocabulary [0, {LogitsWidth}); was the text tokenized for another model?");
    }
}
