using Microsoft.ML.Tokenizers;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>
/// One request's state in a <see cref="DecodeBatch"/>: its tokens so far, what it generated, its own options and
/// <see cref="Sampler"/>, its text, and why it stopped. The rules that end a request live here, once, for
/// <see cref="TextGenerator.GenerateBatch"/> and the <see cref="GenerationScheduler"/>.
/// </summary>
internal sealed class GenerationRow
{
    readonly Tokenizer? _tokenizer;
    volatile bool _abandoned;

    /// <param name="context">the most tokens the model sees at once (null = unlimited)</param>
    public GenerationRow(IReadOnlyList<int> prompt, GenerationOptions options, int? context, Tokenizer? tokenizer)
    {
        All = new List<int>(prompt);
        PromptLength = prompt.Count;
        Options = options;
        Context = context;
        Sampler = new Sampler(options.Sampling);
        _tokenizer = tokenizer;
        if (tokenizer is not null) Stream = new TextStream(tokenizer, options.StopSequences);
    }

    public GenerationOptions Options { get; }
    public int PromptLength { get; }
    public int? Context { get; }
    public Sampler Sampler { get; }

    /// <summary>Prompt and generated tokens; with a cache, all but the last are in the cache and the last is fed next.</summary>
    public List<int> All { get; }
    public List<int> Generated { get; } = new();

    /// <summary>Incremental text and stop sequences; null without a tokenizer.</summary>
    public TextStream? Stream { get; }

    /// <summary>"max_new_tokens", "stop_token" or "stop_sequence" once finished; null while running.</summary>
    public string? Reason { get; private set; }

    /// <summary>The text cut before a stop sequence, once one is found.</summary>
    string? _cutText;

    /// <summary>Nobody waits for this row any more (its request was cancelled); it leaves its batch at the next run.</summary>
    public bool Abandoned => _abandoned;

    public void Abandon() => _abandoned = true;

    /// <summary>Finished or abandoned: no more runs.</summary>
    public bool Done => Reason is not null || _abandoned;

    /// <summary>Whether the whole text fits the context, so the cache (which cannot slide a window) serves this row.</summary>
    public bool FitsContext => Context is not int c || PromptLength + Options.MaxNewTokens - 1 <= c;

    /// <summary>Samples the next token from <paramref name="logits"/> [vocab] and applies the stop rules.</summary>
    public void Choose(ReadOnlySpan<float> logits)
    {
        var next = Sampler.Next(logits);
        if (Options.StopTokenIds.Contains(next)) { Reason = "stop_token"; return; }
        All.Add(next);
        Generated.Add(next);
        int cut = Stream?.Add(Generated) ?? -1;
        if (cut >= 0) { _cutText = Stream!.Text[..cut]; Reason = "stop_sequence"; return; }
        if (Generated.Count == Options.MaxNewTokens) Reason = "max_new_tokens";
    }

    /// <summary>The last <see cref="Context"/> tokens (all when null).</summary>
    public List<int> Window()
    {
        int start = Context is int c && All.Count > c ? All.Count - c : 0;
        return All.GetRange(start, All.Count - start);
    }

    /// <summary>The generated text: cut before a stop sequence, else all generated tokens decoded; null without a tokenizer.</summary>
    public string? Text => _cutText ?? _tokenizer?.Decode(Generated);

    public GenerationResult Result() => new(Generated, Text, Reason ?? "max_new_tokens");
}
