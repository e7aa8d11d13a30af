using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.Tokenizers;

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
}

/// <summary>What <see cref="TextGenerator.Generate(IReadOnlyList{int}, GenerationOptions, string?)"/> produced.</summary>
/// <param name="TokenIds">the generated ids (prompt excluded; a stop token excluded)</param>
/// <param name="Text">the decoded generated text, cut before a stop sequence; null without a tokenizer</param>
/// <param name="StopReason">"max_new_tokens", "stop_token" or "stop_sequence"</param>
public sealed record GenerationResult(IReadOnlyList<int> TokenIds, string? Text, string StopReason);

/// <summary>
/// Autoregressive generation on an <see cref="AdapterHost"/>, one request per call (thread-safe: state is per call).
/// Our models have no KV cache, so every new token re-runs the whole context: n new tokens after a prompt of p cost
/// about n·(p + n/2) token forwards — O(n²) — instead of n with a cache. Fine for short answers; slow for long texts.
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
        ArgumentNullException.ThrowIfNull(options);
        if (promptIds.Count == 0) throw new ArgumentException("the prompt has no tokens", nameof(promptIds));
        _signature.CheckIds(promptIds, nameof(promptIds));
        int? context = options.ContextLength ?? _signature.ContextLength;
        var sampler = new Sampler(options.Sampling);
        var all = new List<int>(promptIds);
        var generated = new List<int>();
        string reason = "max_new_tokens";
        string? text = null;
        for (int step = 0; step < options.MaxNewTokens; step++)
        {
            int start = context is int c && all.Count > c ? all.Count - c : 0;
            var window = all.GetRange(start, all.Count - start);
            int width = _signature.FixedTokens ?? window.Count;
            var next = sampler.Next(LastLogits(window, width, adapter));
            if (options.StopTokenIds.Contains(next)) { reason = "stop_token"; break; }
            all.Add(next);
            generated.Add(next);
            if (Tokenizer is not null && options.StopSequences.Count > 0)
            {
                text = Tokenizer.Decode(generated);
                int cut = options.StopSequences.Select(s => text.IndexOf(s, StringComparison.Ordinal)).Where(i => i >= 0).DefaultIfEmpty(-1).Min();
                if (cut >= 0) { text = text[..cut]; reason = "stop_sequence"; return new GenerationResult(generated, text, reason); }
            }
        }
        return new GenerationResult(generated, Tokenizer?.Decode(generated), reason);
    }

    /// <summary>Logits at the last real token of <paramref name="window"/>: [vocab].</summary>
    float[] LastLogits(List<int> window, int width, string? adapter)
    {
        var feeds = _signature.Feeds([window], width, padId: 0);
        try
        {
            using var outputs = _host.Run(adapter, feeds, [_signature.Logits]);
            var logits = outputs[0];                                  // [1, tokens, vocab]
            var shape = logits.GetTensorTypeAndShape().Shape;
            int vocab = (int)shape[2];
            return logits.GetTensorDataAsSpan<float>().Slice((window.Count - 1) * vocab, vocab).ToArray();
        }
        finally { foreach (var v in feeds.Values) v.Dispose(); }
    }
}
