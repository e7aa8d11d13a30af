using System.Runtime.CompilerServices;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>One generation request: its prompt, its own options (length, sampling, stops) and its adapter (null = base).</summary>
public sealed record GenerationRequest(IReadOnlyList<int> PromptIds, GenerationOptions Options, string? Adapter);

/// <summary>One step of a request's output: the token, the text it adds (empty while a UTF-8 character is incomplete), and on the last event why it stopped.</summary>
/// <param name="TokenId">the new token, or -1 on a final event that carries no token (a stop token or stop sequence)</param>
/// <param name="TextDelta">text added since the previous event (null without a tokenizer)</param>
/// <param name="FinishReason">null while running; then "length" (max tokens), "stop" (stop token or sequence) — OpenAI's names</param>
public sealed record GeneratedToken(int TokenId, string? TextDelta, string? FinishReason);

/// <summary>Limits of a <see cref="GenerationScheduler"/>.</summary>
public sealed record SchedulerOptions
{
    /// <summary>Rows decoded together in one run at most.</summary>
    public int MaxBatch { get; init; } = 8;

    /// <summary>Requests waiting for a slot at most; one more is refused with <see cref="QueueFullException"/>.</summary>
    public int QueueCapacity { get; init; } = 64;
}

/// <summary>The scheduler's queue is full (a server answers 429).</summary>
public sealed class QueueFullException(int capacity) : Exception($"the generation queue is full ({capacity} requests waiting); retry later")
{
    /// <summary>The queue's capacity.</summary>
    public int Capacity { get; } = capacity;
}

/// <summary>
/// Serves many concurrent generation requests on one <see cref="TextGenerator"/>. Contract for servers: a request
/// either is refused at once (<see cref="QueueFullException"/>) or streams its tokens; cancelling the token stops its
/// work; every request gets what it would get alone.
/// </summary>
public sealed class GenerationScheduler : IAsyncDisposable
{
    readonly TextGenerator _generator;
    readonly SchedulerOptions _options;
    readonly SemaphoreSlim _slots;
    int _waiting, _running;

    /// <param name="generator">the generator (not owned)</param>
    /// <param name="options">limits; null = defaults</param>
    public GenerationScheduler(TextGenerator generator, SchedulerOptions? options = null)
    {
        _generator = generator ?? throw new ArgumentNullException(nameof(generator));
        _options = options ?? new SchedulerOptions();
        _slots = new SemaphoreSlim(_options.MaxBatch);
    }

    /// <summary>The generator requests run on.</summary>
    public TextGenerator Generator => _generator;

    /// <summary>Requests waiting for a slot.</summary>
    public int QueueDepth => Volatile.Read(ref _waiting);

    /// <summary>Requests being decoded.</summary>
    public int Running => Volatile.Read(ref _running);

    /// <summary>
    /// Starts <paramref name="request"/> and streams its tokens. Throws <see cref="QueueFullException"/> before the
    /// first token when the queue is full.
    /// </summary>
    public IAsyncEnumerable<GeneratedToken> Generate(GenerationRequest request, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(request);
        if (Interlocked.Increment(ref _waiting) > _options.QueueCapacity)
        {
            Interlocked.Decrement(ref _waiting);
            throw new QueueFullException(_options.QueueCapacity);
        }
        return Stream(request, cancellationToken);
    }

    // one request per slot, whole result at once: the simple engine the batching scheduler replaces
    async IAsyncEnumerable<GeneratedToken> Stream(GenerationRequest request, [EnumeratorCancellation] CancellationToken ct)
    {
        try { await _slots.WaitAsync(ct).ConfigureAwait(false); }
        finally { Interlocked.Decrement(ref _waiting); }
        GenerationResult result;
        Interlocked.Increment(ref _running);
        try { result = await Task.Run(() => _generator.Generate(request.PromptIds, request.Options, request.Adapter), ct).ConfigureAwait(false); }
        finally { Interlocked.Decrement(ref _running); _slots.Release(); }
        var tokens = result.TokenIds;
        for (int i = 0; i < tokens.Count; i++)
            yield return new GeneratedToken(tokens[i], i == 0 ? result.Text : "", null);
        yield return new GeneratedToken(-1, tokens.Count == 0 ? result.Text : "", result.StopReason == "max_new_tokens" ? "length" : "stop");
    }

    /// <inheritdoc/>
    public ValueTask DisposeAsync() { _slots.Dispose(); return ValueTask.CompletedTask; }
}
