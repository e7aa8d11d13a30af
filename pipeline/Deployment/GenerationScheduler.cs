using System.Runtime.CompilerServices;
using System.Runtime.ExceptionServices;
using System.Threading.Channels;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>One generation request: its prompt, its own options (length, sampling, stops) and its adapter (null = base).</summary>
public sealed record GenerationRequest(IReadOnlyList<int> PromptIds, GenerationOptions Options, string? Adapter);

/// <summary>One step of a request's output: the token, the text it adds (empty while a UTF-8 character is incomplete), and on the last event why it stopped.</summary>
/// <param name="TokenId">the new token; -1 on the final event, which carries no token</param>
/// <param name="TextDelta">
/// text added since the previous event (null without a tokenizer). Concatenated, the deltas are the request's text as
/// <see cref="TextGenerator.Generate(IReadOnlyList{int}, GenerationOptions, string?)"/> gives it; text that could be the
/// start of a stop sequence is held back until it is known not to be
/// </param>
/// <param name="FinishReason">null while running; then "length" (max tokens), "stop" (stop token or sequence) — OpenAI's names</param>
public sealed record GeneratedToken(int TokenId, string? TextDelta, string? FinishReason);

/// <summary>Limits of a <see cref="GenerationScheduler"/>.</summary>
public sealed record SchedulerOptions
{
    /// <summary>Rows decoded together in one run at most.</summary>
    public int MaxBatch
    {
        get;
        init => field = value > 0 ? value : throw new ArgumentOutOfRangeException(nameof(MaxBatch), value, "MaxBatch must be greater than zero.");
    } = 8;

    /// <summary>Requests being decoded at once, over all batches (each row holds its KV cache); more wait in the queue.</summary>
    public int MaxRunning
    {
        get;
        init => field = value > 0 ? value : throw new ArgumentOutOfRangeException(nameof(MaxRunning), value, "MaxRunning must be greater than zero.");
    } = 32;

    /// <summary>
    /// Requests not yet admitted by the decode loop at most; one more is refused with <see cref="QueueFullException"/>.
    /// The loop admits between steps, so this also bounds the requests that may arrive during one step (0 refuses every
    /// request: a server's way to test its 429).
    /// </summary>
    public int QueueCapacity
    {
        get;
        init => field = value >= 0 ? value : throw new ArgumentOutOfRangeException(nameof(QueueCapacity), value, "QueueCapacity must be ≥ 0.");
    } = 64;
}

/// <summary>The scheduler's queue is full (a server answers 429).</summary>
public sealed class QueueFullException(int capacity) : Exception($"the generation queue is full ({capacity} requests waiting); retry later")
{
    /// <summary>The queue's capacity.</summary>
    public int Capacity { get; } = capacity;
}

/// <summary>
/// Serves many concurrent generation requests on one <see cref="TextGenerator"/> with continuous batching. Contract for
/// servers: a request either is refused at once (<see cref="QueueFullException"/>) or streams its tokens; cancelling
/// its token (or leaving the stream) stops its work; every request gets what it would get alone.
/// </summary>
/// <remarks>
/// <para>Requests with the same adapter (and the same path: with the model's KV cache or without) share a lane: one
/// <see cref="DecodeBatch"/> on one <see cref="AdapterHost.Lease"/>, decoded one run per step for all its rows, each row
/// with its own options and seeded <see cref="Sampler"/>. New requests join a lane between its steps (with a cache: one
/// prefill run for the newcomers, whose caches are then merged into the lane's, left-padded and masked); finished and
/// cancelled rows leave at its next step. A request uses the cache when its model has one, its options allow it and
/// its whole text fits the context; otherwise its lane re-runs each row's window every step. A cached model without
/// attention_mask and position_ids cannot pad: a newcomer joins only a lane whose rows hold as many tokens as its
/// prompt, else it waits until that lane drains (and holds back later requests for the lane meanwhile).</para>
/// <para>Fairness: one decode loop; the lanes take turns in round-robin, one turn each (admit the lane's newcomers,
/// then one step), so an adapter with many requests delays another by at most one step per turn. Waiting requests are
/// admitted in arrival order, up to <see cref="SchedulerOptions.MaxBatch"/> rows per lane and
/// <see cref="SchedulerOptions.MaxRunning"/> in all; a request that cannot join its lane yet is not overtaken there.</para>
/// <para>An error in a run (say an out-of-range position) ends every request of that lane with the error; other lanes
/// go on. A replaced adapter serves the requests already admitted to its lane; later ones start a new lane.</para>
/// </remarks>
public sealed class GenerationScheduler : IAsyncDisposable
{
    readonly TextGenerator _generator;
    readonly SchedulerOptions _options;
    readonly object _gate = new();
    readonly List<Job> _waiting = new();                 // arrival order; under _gate
    readonly List<Lane> _lanes = new();                  // the loop's only
    readonly SemaphoreSlim _wake = new(0);
    readonly CancellationTokenSource _stop = new();
    readonly Task _loop;
    int _running, _turn;
    long _runs, _tokens;
    bool _disposed;
    Exception? _fault;

    /// <param name="generator">the generator (not owned)</param>
    /// <param name="options">limits; null = defaults</param>
    public GenerationScheduler(TextGenerator generator, SchedulerOptions? options = null)
    {
        _generator = generator ?? throw new ArgumentNullException(nameof(generator));
        _options = options ?? new SchedulerOptions();
        _loop = Task.Factory.StartNew(Loop, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
    }

    /// <summary>The generator requests run on.</summary>
    public TextGenerator Generator => _generator;

    /// <summary>Requests waiting for a slot.</summary>
    public int QueueDepth { get { lock (_gate) return _waiting.Count; } }

    /// <summary>Requests being decoded.</summary>
    public int Running => Volatile.Read(ref _running);

    /// <summary>ONNX Runtime runs made so far (prefills and steps); <see cref="GeneratedTokens"/> / Runs is the mean rows per run.</summary>
    public long Runs => Interlocked.Read(ref _runs);

    /// <summary>Tokens streamed so far, over all requests.</summary>
    public long GeneratedTokens => Interlocked.Read(ref _tokens);

    /// <summary>Called on the decode loop before each turn; tests pace the loop with it to make a join or a cancellation happen mid-decode.</summary>
    internal Action? BeforeTurn { get; set; }

    /// <summary>
    /// Queues <paramref name="request"/> and streams its tokens. Throws <see cref="QueueFullException"/> at once when the
    /// queue is full, and <see cref="ArgumentException"/> for a prompt the model cannot take; an adapter that is not
    /// loaded, or a failed run, ends the stream with the error. Cancelling <paramref name="cancellationToken"/>, or
    /// leaving the stream early, removes the request from the queue or its row from its batch at the next step.
    /// </summary>
    public IAsyncEnumerable<GeneratedToken> Generate(GenerationRequest request, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(request);
        var row = _generator.NewRow(request.PromptIds, request.Options, nameof(request));
        var job = new Job(request.Adapter, row, request.Options.UseCache && _generator.CanCache([row]));
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_fault is not null) throw new InvalidOperationException($"the generation loop failed: {_fault.Message}", _fault);
            if (_waiting.Count >= _options.QueueCapacity) throw new QueueFullException(_options.QueueCapacity);
            _waiting.Add(job);
        }
        job.Registration = cancellationToken.Register(() => Abandon(job));
        _wake.Release();
        return Stream(job, cancellationToken);
    }

    static async IAsyncEnumerable<GeneratedToken> Stream(Job job, [EnumeratorCancellation] CancellationToken ct)
    {
        try
        {
            await foreach (var token in job.Events.Reader.ReadAllAsync(ct).ConfigureAwait(false)) yield return token;
            if (job.Error is not null) ExceptionDispatchInfo.Throw(job.Error);
        }
        finally
        {
            job.Registration.Dispose();
            job.Abandon();
        }
    }

    /// <summary>A waiting request leaves the queue now; a running one leaves its batch at the next step.</summary>
    void Abandon(Job job)
    {
        bool waiting;
        lock (_gate) waiting = _waiting.Remove(job);
        if (waiting) job.Complete(new OperationCanceledException("the request was cancelled"));
        else job.Abandon();
    }

    void Loop()
    {
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                AdmitWaiting();
                if (_lanes.Count == 0)
                {
                    try { _wake.Wait(_stop.Token); } catch (OperationCanceledException) { break; }
                    continue;
                }
                int index = _turn % _lanes.Count;
                var lane = _lanes[index];
                BeforeTurn?.Invoke();
                Turn(lane);
                if (lane.IsEmpty)
                {
                    _lanes.RemoveAt(index);
                    lane.Dispose();
                    _turn = index;                               // the next lane moved into this index
                }
                else _turn = index + 1;
            }
        }
        catch (Exception e)
        {
            lock (_gate) _fault = e;
        }
        // disposed (or failed): end every request still here
        var end = _fault ?? new ObjectDisposedException(nameof(GenerationScheduler), "the generation scheduler was disposed");
        foreach (var lane in _lanes)
        {
            foreach (var job in lane.Jobs.Concat(lane.Newcomers)) job.Complete(end);
            lane.Dispose();
        }
        _lanes.Clear();
        Volatile.Write(ref _running, 0);
        List<Job> waiting;
        lock (_gate) { waiting = [.. _waiting]; _waiting.Clear(); }
        foreach (var job in waiting) job.Complete(end);
    }

    /// <summary>Moves waiting requests, in arrival order, into the newcomers of their lanes while there is room.</summary>
    void AdmitWaiting()
    {
        lock (_gate)
        {
            var blocked = new HashSet<Lane>();
            for (int i = 0; i < _waiting.Count && _running < _options.MaxRunning;)
            {
                var job = _waiting[i];
                AdapterHost.AdapterLease lease;
                try { lease = _generator.Host.Lease(job.Adapter); }
                catch (Exception e) when (e is KeyNotFoundException or ObjectDisposedException)
                {
                    _waiting.RemoveAt(i);
                    job.Complete(e);
                    continue;
                }
                var lane = _lanes.FirstOrDefault(l => l.Batch.Cached == job.Cached && l.Lease.Entry == lease.Entry);
                if (lane is null) _lanes.Add(lane = new Lane(_generator.NewBatch(lease, job.Cached), lease));
                else lease.Dispose();
                bool fits = !blocked.Contains(lane) && lane.Size < _options.MaxBatch && lane.Batch.CanJoin(job.Row, lane.Newcomers.Select(n => n.Row));
                if (!fits) { blocked.Add(lane); i++; continue; }
                _waiting.RemoveAt(i);
                lane.Newcomers.Add(job);
                Interlocked.Increment(ref _running);
            }
        }
    }

    /// <summary>One turn of a lane: its newcomers join (one prefill run with a cache), then one step for all its rows.</summary>
    void Turn(Lane lane)
    {
        int runs = lane.Batch.Runs;
        try
        {
            var newcomers = lane.Newcomers.Where(j => !j.Row.Abandoned).ToList();
            lane.Jobs.AddRange(lane.Newcomers);
            lane.Newcomers.Clear();
            lane.Batch.Admit(newcomers.Select(j => j.Row).ToList());
            Publish(lane);
            lane.Batch.Step();
            Publish(lane);
        }
        catch (Exception e)
        {
            foreach (var job in lane.Jobs) job.Complete(e);
            Interlocked.Add(ref _running, -lane.Jobs.Count);
            lane.Jobs.Clear();
            lane.Batch.Dispose();
        }
        finally { Interlocked.Add(ref _runs, lane.Batch.Runs - runs); }
    }

    /// <summary>Streams each row's new tokens; ends the requests that finished or were abandoned.</summary>
    void Publish(Lane lane)
    {
        for (int i = lane.Jobs.Count - 1; i >= 0; i--)
        {
            var job = lane.Jobs[i];
            var row = job.Row;
            if (row.Abandoned) { Finished(lane, i, new OperationCanceledException("the request was cancelled")); continue; }
            while (job.Published < row.Generated.Count)
            {
                job.Events.Writer.TryWrite(new GeneratedToken(row.Generated[job.Published++], row.Stream?.TakeDelta(), null));
                Interlocked.Increment(ref _tokens);
            }
            if (row.Reason is null) continue;
            job.Events.Writer.TryWrite(new GeneratedToken(-1, row.Stream?.Finish(row.Text!), row.Reason == "max_new_tokens" ? "length" : "stop"));
            Finished(lane, i, null);
        }
    }

    void Finished(Lane lane, int index, Exception? error)
    {
        lane.Jobs[index].Complete(error);
        lane.Jobs.RemoveAt(index);
        Interlocked.Decrement(ref _running);
    }

    /// <summary>Stops the decode loop after its current run; requests still queued or running end with <see cref="ObjectDisposedException"/>.</summary>
    public async ValueTask DisposeAsync()
    {
        lock (_gate)
        {
            if (_disposed) return;
            _disposed = true;
        }
        _stop.Cancel();
        await _loop.ConfigureAwait(false);
        _stop.Dispose();
        // _wake stays undisposed: a Generate racing this disposal may still release it (it holds no handle)
    }

    /// <summary>A request: its row, its event stream, and how much of the row has been streamed.</summary>
    sealed class Job(string? adapter, GenerationRow row, bool cached)
    {
        public string? Adapter { get; } = adapter;
        public GenerationRow Row { get; } = row;
        public bool Cached { get; } = cached;
        public Channel<GeneratedToken> Events { get; } = Channel.CreateUnbounded<GeneratedToken>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
        public CancellationTokenRegistration Registration { get; set; }
        public int Published { get; set; }
        public Exception? Error { get; private set; }

        /// <summary>Ends the stream, with <paramref name="error"/> thrown to the reader after the events already written.</summary>
        public void Complete(Exception? error)
        {
            Error ??= error;
            Row.Abandon();
            Events.Writer.TryComplete();
        }

        public void Abandon() => Row.Abandon();
    }

    /// <summary>Requests decoded together: one batch on one adapter lease (both owned), its rows' jobs and the newcomers for its next turn.</summary>
    sealed class Lane(DecodeBatch batch, AdapterHost.AdapterLease lease) : IDisposable
    {
        public DecodeBatch Batch { get; } = batch;
        public AdapterHost.AdapterLease Lease { get; } = lease;
        public List<Job> Jobs { get; } = new();
        public List<Job> Newcomers { get; } = new();
        public int Size => Jobs.Count + Newcomers.Count;
        public bool IsEmpty => Size == 0;

        public void Dispose()
        {
            Batch.Dispose();
            Lease.Dispose();
        }
    }
}
