using Microsoft.ML.OnnxRuntime;
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
    public IReadOnlyList<string> StopSequences { get; init; } = [];

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
        && _signature.Roles.Inputs.Where(i => i.Role.IsPast()).All(i => PresentFor(i) is not null);

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
        foreach (var p in prompts)
        {
            if (p.Count == 0) throw new ArgumentException("a prompt has no tokens", nameof(prompts));
            _signature.CheckIds(p, nameof(prompts));
        }
        int? context = options.ContextLength ?? _signature.ContextLength;
        var rows = prompts.Select(p => new Row(new List<int>(p), new Sampler(options.Sampling))).ToList();
        // one adapter for the whole request, even if it is replaced meanwhile (the cache holds its keys and values)
        using var lease = _host.Lease(adapter);
        if (options.UseCache && CanCache(prompts, options, context)) CachedSteps(rows, options, lease);
        else UncachedSteps(rows, options, lease, context);
        return rows.Select(r => new GenerationResult(r.Generated, r.Text ?? Tokenizer?.Decode(r.Generated), r.Reason ?? "max_new_tokens")).ToList();
    }

    /// <summary>
    /// The cache serves a request when the whole text fits the context (a cache cannot slide a window) and, for
    /// prompts of different lengths, the model takes the mask and positions that left padding needs.
    /// </summary>
    bool CanCache(IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions options, int? context)
    {
        if (!HasCache) return false;
        int longest = prompts.Max(p => p.Count);
        if (context is int c && longest + options.MaxNewTokens - 1 > c) return false;
        bool ragged = prompts.Any(p => p.Count != longest);
        return !ragged || (_signature.AttentionMask is not null && _signature.PositionIds is not null);
    }

    /// <summary>The present output that carries <paramref name="past"/>'s layer forward, or null.</summary>
    string? PresentFor(SignatureEntry past)
    {
        var role = past.Role switch { IoRole.PastKey => IoRole.PresentKey, IoRole.PastValue => IoRole.PresentValue, _ => IoRole.PresentKeyValue };
        return _signature.Roles.Outputs.FirstOrDefault(o => o.Role == role && o.Layer == past.Layer)?.Name;
    }

    /// <summary>
    /// Generation with the cache: one run over the left-padded prompts (empty pasts), then one run per token with
    /// input_ids [batch, 1], the mask grown by one column, each row's next position, and the previous run's present
    /// OrtValues fed as the past as they are (no copy; they are freed once the next run has produced its own). Plain
    /// Run, because only Run applies the request's adapter. Rows that stop keep a slot in the batch (their tokens are
    /// dropped) so the cache never has to be re-packed.
    /// </summary>
    void CachedSteps(List<Row> rows, GenerationOptions options, AdapterHost.AdapterLease lease)
    {
        int batch = rows.Count, width = rows.Max(r => r.All.Count);
        var tokens = PaddedTokens.Pad(rows.Select(r => (IReadOnlyList<int>)r.All).ToList(), width, padId: 0, left: true);
        var pasts = _signature.Roles.Inputs.Where(i => i.Role.IsPast()).ToList();
        var outputNames = new List<string> { _signature.Logits };
        outputNames.AddRange(pasts.Select(p => PresentFor(p)!));
        // the mask of every step: [batch, width + new tokens], row-major per step width
        var maskRows = new List<long>[batch];
        var nextPosition = new long[batch];
        for (int b = 0; b < batch; b++)
        {
            maskRows[b] = new List<long>(width + options.MaxNewTokens);
            for (int t = 0; t < width; t++) maskRows[b].Add(tokens.Mask[b * width + t]);
            nextPosition[b] = rows[b].All.Count;
        }
        IDisposableReadOnlyCollection<OrtValue>? previous = null;
        var feeds = _signature.Feeds(rows.Select(r => (IReadOnlyList<int>)r.All).ToList(), width, padId: 0, leftPad: true);
        try
        {
            for (int step = 0; step < options.MaxNewTokens; step++)
            {
                var outputs = lease.Run(feeds, outputNames);
                foreach (var (name, value) in feeds)
                    if (previous is null || !previous.Contains(value)) value.Dispose();
                previous?.Dispose();
                previous = outputs;
                feeds = [];
                var logits = outputs[0];                                   // [batch, tokens, vocab]
                var shape = logits.GetTensorTypeAndShape().Shape;
                int columns = (int)shape[1], vocab = (int)shape[2];
                var data = logits.GetTensorDataAsSpan<float>();
                var next = new long[batch];
                for (int b = 0; b < batch; b++)
                {
                    var row = rows[b];
                    if (row.Reason is null) Choose(row, data.Slice((b * columns + columns - 1) * vocab, vocab), options);
                    next[b] = row.Reason is null ? row.All[^1] : 0;       // a stopped row runs on a dummy token
                }
                if (rows.All(r => r.Reason is not null) || step == options.MaxNewTokens - 1) break;

                int total = maskRows[0].Count + 1;
                var mask = new long[batch * total];
                var positions = new long[batch];
                for (int b = 0; b < batch; b++)
                {
                    maskRows[b].Add(1);
                    maskRows[b].CopyTo(mask, b * total);
                    positions[b] = nextPosition[b]++;
                }
                foreach (var input in _signature.Roles.Inputs)
                {
                    feeds[input.Name] = input.Role switch
                    {
                        IoRole.InputIds => SignatureFeeds.Create(input, next, [batch, 1]),
                        IoRole.AttentionMask => SignatureFeeds.Create(input, mask, [batch, total]),
                        IoRole.PositionIds => SignatureFeeds.Create(input, positions, [batch, 1]),
                        IoRole.TokenTypeIds => SignatureFeeds.Create(input, new long[batch], [batch, 1]),
                        IoRole.CachePosition => SignatureFeeds.Create(input, [total - 1], [1]),
                        _ => outputs[1 + pasts.IndexOf(input)],
                    };
                }
            }
        }
        finally
        {
            foreach (var value in feeds.Values)
                if (previous is null || !previous.Contains(value)) value.Dispose();
            previous?.Dispose();
        }
    }

    /// <summary>Samples <paramref name="row"/>'s next token from <paramref name="logits"/> and applies the stop rules.</summary>
    void Choose(Row row, ReadOnlySpan<float> logits, GenerationOptions options)
    {
        var next = row.Sampler.Next(logits);
        if (options.StopTokenIds.Contains(next)) { row.Reason = "stop_token"; return; }
        row.All.Add(next);
        row.Generated.Add(next);
        if (Tokenizer is not null && options.StopSequences.Count > 0)
        {
            var text = Tokenizer.Decode(row.Generated);
            int cut = options.StopSequences.Select(s => text.IndexOf(s, StringComparison.Ordinal)).Where(c => c >= 0).DefaultIfEmpty(-1).Min();
            if (cut >= 0) { row.Text = text[..cut]; row.Reason = "stop_sequence"; }
        }
    }

    /// <summary>Generation without a cache: every step re-runs each active row's whole window.</summary>
    void UncachedSteps(List<Row> rows, GenerationOptions options, AdapterHost.AdapterLease lease, int? context)
    {
        for (int step = 0; step < options.MaxNewTokens; step++)
        {
            var active = rows.Where(r => r.Reason is null).ToList();
            if (active.Count == 0) break;
            var windows = active.Select(r => r.Window(context)).ToList();
            var logits = LastLogits(windows, lease);
            for (int i = 0; i < active.Count; i++) Choose(active[i], logits[i], options);
        }
    }

    /// <summary>The logits at each window's last token: [rows][vocab], from one run.</summary>
    float[][] LastLogits(List<List<int>> windows, AdapterHost.AdapterLease lease)
    {
        int width = _signature.FixedTokens ?? windows.Max(w => w.Count);
        // left padding needs the mask (padding must not be attended) and position_ids (a graph that counts positions
        // itself would number the padding); otherwise right padding, which a causal model never lets reach a real token
        bool left = _signature.AttentionMask is not null && _signature.PositionIds is not null;
        var feeds = _signature.Feeds(windows.Cast<IReadOnlyList<int>>().ToList(), width, padId: 0, leftPad: left);
        try
        {
            using var outputs = lease.Run(feeds, [_signature.Logits]);
            var logits = outputs[0];                                  // [rows, tokens, vocab]
            int vocab = (int)logits.GetTensorTypeAndShape().Shape[2];
            var data = logits.GetTensorDataAsSpan<float>();
            var result = new float[windows.Count][];
            for (int b = 0; b < windows.Count; b++)
            {
                int column = left ? width - 1 : windows[b].Count - 1;
                result[b] = data.Slice((b * width + column) * vocab, vocab).ToArray();
            }
            return result;
        }
        finally { foreach (var v in feeds.Values) v.Dispose(); }
    }

    /// <summary>One prompt's state: its tokens so far, what it generated, its sampler, and why it stopped (null = running).</summary>
    sealed class Row(List<int> all, Sampler sampler)
    {
        public List<int> All { get; } = all;
        public List<int> Generated { get; } = new();
        public Sampler Sampler { get; } = sampler;
        public string? Reason { get; set; }
        public string? Text { get; set; }

        /// <summary>The last <paramref name="context"/> tokens (all when null).</summary>
        public List<int> Window(int? context)
        {
            int start = context is int c && All.Count > c ? All.Count - c : 0;
            return All.GetRange(start, All.Count - start);
        }
    }
}
