using Microsoft.ML.Tokenizers;
using OnnxLora.GraphRewrite.Signature;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>Options for <see cref="TextGenerator"/>.</summary>
public sealed record GenerationOptions
{
    /// <summary>Tokens to generate at most.</summary>
    public int MaxNewTokens
    {
        get;
        init => field = value > 0 ? value : throw new ArgumentOutOfRangeException(nameof(MaxNewTokens), value, "MaxNewTokens must be greater than zero.");
    } = 50;

    public SamplingOptions Sampling { get; init; } = SamplingOptions.Greedy;

    /// <summary>Generation stops when the generated text contains one of these; the text is cut before it.</summary>
    public IReadOnlyList<string> StopSequences
    {
        get;
        init => field = value is null || value.Any(string.IsNullOrEmpty)
            ? throw new ArgumentException("StopSequences must be non-empty strings (an empty one would stop before the first token).", nameof(StopSequences))
            : value;
    } = [];

    /// <summary>Generation stops at one of these token ids (not included in the output), e.g. GPT-2's &lt;|endoftext|&gt; 50256.</summary>
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];

    /// <summary>
    /// The most tokens the model sees at once; longer contexts keep their last tokens. Default: the model's declared
    /// token count, or n_positions from OnnxLora's builder metadata, else unlimited (a GPT's position table limits it:
    /// give its context length).
    /// </summary>
    public int? ContextLength { get; init; }

    /// <summary>
    /// Use the model's KV cache when it has one (default): the prompt runs once, then one token per run. False re-runs
    /// the whole context for every token (the only way for a model without a cache).
    /// </summary>
    public bool UseCache { get; init; } = true;
}

/// <summary>What <see cref="TextGenerator.Generate(IReadOnlyList{int}, GenerationOptions, string?)"/> produced.</summary>
/// <param name="TokenIds">the generated ids (prompt excluded; a stop token excluded)</param>
/// <param name="Text">the decoded generated text, cut before a stop sequence; null without a tokenizer</param>
/// <param name="StopReason">"max_new_tokens", "stop_token" or "stop_sequence"</param>
public sealed record GenerationResult(IReadOnlyList<int> TokenIds, string? Text, string StopReason);

/// <summary>
/// Autoregressive generation on an <see cref="AdapterHost"/>, one request per call (thread-safe: state is per call).
/// A model with a KV cache (Optimum's past_key_values.{i}.* in, present.{i}.* out) runs the prompt once, then one
/// token per run, each step's present values fed back as the next past (<see cref="HasCache"/>). A model without one
/// re-runs the whole context for every new token: n new tokens after a prompt of p cost about n·(p + n/2) token
/// forwards — O(n²) — instead of n (<see cref="NoCacheNotice"/>).
/// </summary>
public sealed class TextGenerator
{
    readonly AdapterHost _host;
    readonly ModelSignature _signature;

    /// <param name="host">the host (not owned)</param>
    /// <param name="tokenizer">turns text into ids and back; null = token ids only (models whose vocabulary is not GPT-2's)</param>
    public TextGenerator(AdapterHost host, Tokenizer? tokenizer = null)
    {
        ArgumentNullException.ThrowIfNull(host);
        _host = host;
        Tokenizer = tokenizer;
        _signature = ModelSignature.Of(host);
        if (_signature.LogitsRank != 3) throw new InvalidDataException($"{host.ModelPath}: output '{_signature.Logits}' is [batch, classes]; generation needs [batch, tokens, vocab] logits");
    }

    public Tokenizer? Tokenizer { get; }

    /// <summary>True when the model takes a KV cache the generator can feed (past inputs, present outputs, no fixed token count).</summary>
    public bool HasCache => _signature.Roles.HasPast && _signature.FixedTokens is null
        && _signature.Roles.Inputs.Where(i => i.Role.IsPast()).All(i => DecodeBatch.PresentFor(_signature, i) is not null);

    /// <summary>What a user of a model without a cache should know, in one line.</summary>
    public const string NoCacheNotice = "note: the model has no KV cache (past_key_values.*/present.*), so every new token re-runs the whole context (O(n²) in the length); export it with past (model build --with-past, optimum-cli ... --task text-generation-with-past) for one run per token";

    /// <summary>GPT-2's byte-level BPE (Microsoft.ML.Tokenizers with its bundled data; works offline).</summary>
    public static Tokenizer Gpt2Tokenizer() => TiktokenTokenizer.CreateForModel("gpt2");

    /// <summary>GPT-2's &lt;|endoftext|&gt; id.</summary>
    public const int Gpt2EndOfText = 50256;

    /// <summary>Generates from text; needs a tokenizer.</summary>
    public GenerationResult Generate(string prompt, GenerationOptions options, string? adapter = null)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        var tokenizer = Tokenizer ?? throw new InvalidOperationException("this generator has no tokenizer; pass token ids");
        var ids = tokenizer.EncodeToIds(prompt);
        if (ids.Count == 0) throw new ArgumentException("the prompt is empty", nameof(prompt));
        return Generate(ids, options, adapter);
    }

    /// <summary>Generates from token ids with adapter <paramref name="adapter"/> (null = base model).</summary>
    public GenerationResult Generate(IReadOnlyList<int> promptIds, GenerationOptions options, string? adapter = null)
    {
        ArgumentNullException.ThrowIfNull(promptIds);
        return GenerateBatch([promptIds], options, adapter)[0];
    }

    /// <summary>
    /// Generates for several prompts at once, one run per new token for the whole batch. Rows are left-padded when the
    /// model takes an attention mask and position ids (every row's last token in the last column, positions from the
    /// mask), right-padded otherwise (a causal model never lets right padding reach a real token). Each row samples with its own
    /// <see cref="Sampler"/> from <see cref="GenerationOptions.Sampling"/>, so a row gets what it gets alone; rows that
    /// stop drop out of later runs.
    /// </summary>
    public IReadOnlyList<GenerationResult> GenerateBatch(IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions options, string? adapter = null)
    {
        ArgumentNullException.ThrowIfNull(prompts);
        ArgumentNullException.ThrowIfNull(options);
        var rows = prompts.Select(p => NewRow(p, options, nameof(prompts))).ToList();
        // one adapter for the whole request, even if it is replaced meanwhile (the cache holds its keys and values)
        using var lease = _host.Lease(adapter);
        using var batch = NewBatch(lease, options.UseCache && CanCache(rows));
        batch.Admit(rows);
        while (batch.Rows.Any(r => !r.Done)) batch.Step();
        return rows.Select(r => r.Result()).ToList();
    }

    internal AdapterHost Host => _host;

    /// <summary>A row for <paramref name="prompt"/> after checking its ids; its context is the options' or the model's.</summary>
    internal GenerationRow NewRow(IReadOnlyList<int> prompt, GenerationOptions options, string what)
    {
        ArgumentNullException.ThrowIfNull(prompt, what);
        ArgumentNullException.ThrowIfNull(options);
        if (prompt.Count == 0) throw new ArgumentException("a prompt has no tokens", what);
        _signature.CheckIds(prompt, what);
        return new GenerationRow(prompt, options, options.ContextLength ?? _signature.ContextLength, Tokenizer);
    }

    /// <summary>A batch on <paramref name="lease"/> (not owned), with the cache or without.</summary>
    internal DecodeBatch NewBatch(AdapterHost.AdapterLease lease, bool cached) => new(_signature, lease, cached);

    /// <summary>
    /// The cache serves rows when every row's whole text fits its context (a cache cannot slide a window) and, for
    /// prompts of different lengths, the model takes the mask and positions that left padding needs.
    /// </summary>
    internal bool CanCache(IReadOnlyList<GenerationRow> rows)
    {
        if (!HasCache || !rows.All(r => r.FitsContext)) return false;
        bool ragged = rows.Any(r => r.PromptLength != rows[0].PromptLength);
        return !ragged || (_signature.AttentionMask is not null && _signature.PositionIds is not null);
    }
}
