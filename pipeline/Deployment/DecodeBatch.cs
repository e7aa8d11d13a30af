using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Signature;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>
/// Rows decoded together with one adapter: one run per step for every row, each row choosing its own next token
/// (<see cref="GenerationRow"/>). Rows join between steps (<see cref="Admit"/>) and leave when they finish or are
/// abandoned. The step-level state under <see cref="TextGenerator.GenerateBatch"/> and <see cref="GenerationScheduler"/>.
/// </summary>
/// <remarks>
/// <para>Without a cache, every step re-runs each row's window (left-padded when the model takes an attention mask and
/// position ids, right-padded otherwise: a causal model never lets right padding reach a real token), so rows join and
/// leave freely.</para>
/// <para>With a cache, the batch holds one past value per cache input, [(2,) batch, kv_heads, width, head_dim], row b's
/// tokens in its last columns (left padding). Newcomers' prompts run together in one prefill run (left-padded, empty
/// pasts), choose their first token, and their present values are merged into the batch's cache; a step feeds each
/// row's last token with position = its cache length and a mask that is 0 on the row's padding columns. Rows that
/// leave are dropped from the cache, and columns no row uses any more are trimmed. Padding needs the model's
/// attention_mask and position_ids; without them (<see cref="Pads"/> false) rows share a cache only at equal lengths.</para>
/// <para>Ownership: the batch owns its cache values; the lease is the caller's and must outlive the batch.</para>
/// </remarks>
internal sealed class DecodeBatch : IDisposable
{
    readonly ModelSignature _signature;
    readonly AdapterHost.AdapterLease _lease;
    readonly List<SignatureEntry> _pasts;
    readonly List<string> _outputNames;
    List<GenerationRow> _rows = new();
    OrtValue[] _past = [];            // in _pasts order; [(2,) batch, kv_heads, _width, head_dim]
    IDisposable? _pastOwner;          // the run outputs or the repacked values that hold _past
    int _width;

    /// <param name="cached">use the model's cache (the caller checked that it has one and that the rows fit the context)</param>
    public DecodeBatch(ModelSignature signature, AdapterHost.AdapterLease lease, bool cached)
    {
        _signature = signature;
        _lease = lease;
        Cached = cached;
        _pasts = cached ? signature.Roles.Inputs.Where(i => i.Role.IsPast()).ToList() : [];
        _outputNames = [signature.Logits, .. _pasts.Select(p => PresentFor(signature, p)!)];
        Pads = !cached || (signature.AttentionMask is not null && signature.PositionIds is not null);
    }

    public bool Cached { get; }

    /// <summary>Rows of different lengths can share the batch (always without a cache; with one when the model takes a mask and positions).</summary>
    public bool Pads { get; }

    /// <summary>The rows in the batch, finished ones included until the next run drops them.</summary>
    public IReadOnlyList<GenerationRow> Rows => _rows;

    /// <summary>Runs made (prefills and steps).</summary>
    public int Runs { get; private set; }

    /// <summary>The present output that carries <paramref name="past"/>'s layer forward, or null.</summary>
    public static string? PresentFor(ModelSignature signature, SignatureEntry past)
    {
        var role = past.Role switch { IoRole.PastKey => IoRole.PresentKey, IoRole.PastValue => IoRole.PresentValue, _ => IoRole.PresentKeyValue };
        return signature.Roles.Outputs.FirstOrDefault(o => o.Role == role && o.Layer == past.Layer)?.Name;
    }

    /// <summary>Whether <paramref name="row"/> can join at the next <see cref="Admit"/> together with <paramref name="joining"/>.</summary>
    public bool CanJoin(GenerationRow row, IEnumerable<GenerationRow> joining)
    {
        if (Pads) return true;
        // no padding: every row's cache holds the same number of tokens
        var running = _rows.FirstOrDefault(r => !r.Done);
        int? length = running is not null ? running.All.Count - 1 : joining.Select(r => (int?)r.PromptLength).FirstOrDefault();
        return length is null || length == row.PromptLength;
    }

    /// <summary>
    /// Adds <paramref name="newcomers"/> (rows with no generated token yet). With a cache their prompts run now, in one
    /// prefill run, and each chooses its first token; without one they join the next <see cref="Step"/>.
    /// </summary>
    public void Admit(IReadOnlyList<GenerationRow> newcomers)
    {
        if (newcomers.Count == 0) return;
        if (!Cached) { _rows.AddRange(newcomers); return; }
        if (!Pads && newcomers.Any(r => !CanJoin(r, newcomers))) throw new InvalidOperationException($"{_signature.Roles.InputIds}: this cached model has no attention_mask/position_ids, so rows of different lengths cannot share a batch");
        DropDone();
        int width = newcomers.Max(r => r.All.Count);
        var feeds = _signature.Feeds(newcomers.Select(r => (IReadOnlyList<int>)r.All).ToList(), width, padId: 0, leftPad: true);
        IDisposableReadOnlyCollection<OrtValue> outputs;
        try { outputs = _lease.Run(feeds, _outputNames); }
        finally { foreach (var v in feeds.Values) v.Dispose(); }
        Runs++;
        var presents = outputs.Skip(1).ToArray();
        try
        {
            Choose(newcomers, outputs[0]);
            // Done is read once per row: a row may be abandoned from another thread meanwhile
            var joining = newcomers.Select((r, i) => (Source: presents, Index: i, Row: r)).Where(x => !x.Row.Done).ToList();
            if (joining.Count == 0) { outputs.Dispose(); return; }
            if (_rows.Count == 0 && joining.Count == newcomers.Count)
            {
                // nothing to merge with: the prefill's presents are the cache as they are
                Replace(newcomers.ToList(), presents, outputs, width);
                return;
            }
            Repack([.. _rows.Select((r, i) => (Source: _past, Index: i, Row: r)), .. joining]);
        }
        catch { outputs.Dispose(); throw; }
        outputs.Dispose();
    }

    /// <summary>Drops finished and abandoned rows, then one run gives every other row its next token.</summary>
    public void Step()
    {
        DropDone();
        if (_rows.Count == 0) return;
        if (!Cached) { UncachedStep(); return; }
        int batch = _rows.Count, total = _width + 1;
        var ids = new long[batch];
        var positions = new long[batch];
        var mask = new long[batch * total];                    // [batch, past + 1]: 0 on each row's left padding
        for (int b = 0; b < batch; b++)
        {
            var row = _rows[b];
            int length = row.All.Count - 1;                     // tokens in the cache; the last one is fed now
            ids[b] = row.All[^1];
            positions[b] = length;
            Array.Fill(mask, 1L, b * total + total - 1 - length, length + 1);
        }
        var feeds = new Dictionary<string, OrtValue>();
        var created = new List<OrtValue>();
        IDisposableReadOnlyCollection<OrtValue> outputs;
        try
        {
            foreach (var input in _signature.Roles.Inputs)
            {
                var value = input.Role switch
                {
                    IoRole.InputIds => SignatureFeeds.Create(input, ids, [batch, 1]),
                    IoRole.AttentionMask => SignatureFeeds.Create(input, mask, [batch, total]),
                    IoRole.PositionIds => SignatureFeeds.Create(input, positions, [batch, 1]),
                    IoRole.TokenTypeIds => SignatureFeeds.Create(input, new long[batch], [batch, 1]),
                    IoRole.CachePosition => SignatureFeeds.Create(input, [total - 1], [1]),
                    _ => null,
                };
                if (value is not null) created.Add(value);
                feeds[input.Name] = value ?? _past[_pasts.IndexOf(input)];
            }
            outputs = _lease.Run(feeds, _outputNames);
        }
        finally { foreach (var v in created) v.Dispose(); }
        Runs++;
        Replace(_rows, outputs.Skip(1).ToArray(), outputs, total);   // fed back as they are, no copy
        Choose(_rows, outputs[0]);
    }

    void UncachedStep()
    {
        var windows = _rows.Select(r => (IReadOnlyList<int>)r.Window()).ToList();
        int width = _signature.FixedTokens ?? windows.Max(w => w.Count);
        // left padding needs the mask (padding must not be attended) and position_ids (a graph that counts positions
        // itself would number the padding); otherwise right padding
        bool left = _signature.AttentionMask is not null && _signature.PositionIds is not null;
        var feeds = _signature.Feeds(windows, width, padId: 0, leftPad: left);
        try
        {
            using var outputs = _lease.Run(feeds, [_signature.Logits]);
            Runs++;
            Choose(_rows, outputs[0], b => left ? width - 1 : windows[b].Count - 1);
        }
        finally { foreach (var v in feeds.Values) v.Dispose(); }
    }

    /// <summary>Each row chooses from its logits [rows, tokens, vocab] at <paramref name="column"/> (default: the last).</summary>
    static void Choose(IReadOnlyList<GenerationRow> rows, OrtValue logits, Func<int, int>? column = null)
    {
        var shape = logits.GetTensorTypeAndShape().Shape;
        int columns = (int)shape[1], vocab = (int)shape[2];
        var data = logits.GetTensorDataAsSpan<float>();
        for (int b = 0; b < rows.Count; b++)
            rows[b].Choose(data.Slice((b * columns + (column?.Invoke(b) ?? columns - 1)) * vocab, vocab));
    }

    void DropDone()
    {
        var kept = _rows.Select((r, i) => (Source: _past, Index: i, Row: r)).Where(x => !x.Row.Done).ToList();
        if (kept.Count == _rows.Count) return;
        if (kept.Count == 0) Replace([], [], null, 0);
        else if (Cached) Repack(kept);
        else _rows = kept.Select(x => x.Row).ToList();
    }

    /// <summary>
    /// Builds the cache of <paramref name="rows"/>, each taken from a row of a source cache (the batch's or a prefill's):
    /// as wide as the longest row, each row's tokens copied to its last columns, zeros (masked) before them.
    /// </summary>
    void Repack(List<(OrtValue[] Source, int Index, GenerationRow Row)> rows)
    {
        int width = rows.Max(r => r.Row.All.Count - 1);
        var values = new OrtValue[_pasts.Count];
        try
        {
            for (int p = 0; p < _pasts.Count; p++)
                values[p] = Gather(rows.Select(r => (r.Source[p], r.Index, r.Row.All.Count - 1)).ToList(), width);
        }
        catch
        {
            foreach (var v in values) v?.Dispose();
            throw;
        }
        Replace(rows.Select(r => r.Row).ToList(), values, new OwnedValues(values), width);
    }

    void Replace(List<GenerationRow> rows, OrtValue[] past, IDisposable? owner, int width)
    {
        if (!ReferenceEquals(owner, _pastOwner)) _pastOwner?.Dispose();
        _rows = rows;
        _past = past;
        _pastOwner = owner;
        _width = width;
    }

    /// <summary>A new cache value [(2,) rows, kv_heads, width, head_dim] with each row's last Length tokens from its source row.</summary>
    static OrtValue Gather(IReadOnlyList<(OrtValue Source, int Row, int Length)> rows, int width)
    {
        var info = rows[0].Source.GetTensorTypeAndShape();
        var shape = (long[])info.Shape.Clone();
        int rank = shape.Length;                                  // [(2,) batch, kv_heads, tokens, head_dim]
        long outer = rank == 5 ? shape[0] : 1, heads = shape[rank - 3], headDim = shape[rank - 1];
        shape[rank - 4] = rows.Count;
        shape[rank - 2] = width;
        var result = OrtValue.CreateAllocatedTensorValue(OrtAllocator.DefaultInstance, info.ElementDataType, shape);
        var target = result.GetTensorMutableRawData();
        target.Clear();
        long elementSize = target.Length / (outer * rows.Count * heads * width * headDim);
        for (int b = 0; b < rows.Count; b++)
        {
            var (source, row, length) = rows[b];
            var sourceShape = source.GetTensorTypeAndShape().Shape;
            long sourceBatch = sourceShape[rank - 4], sourceWidth = sourceShape[rank - 2];
            var from = source.GetTensorMutableRawData();
            int bytes = checked((int)(length * headDim * elementSize));
            for (long o = 0; o < outer; o++)
                for (long h = 0; h < heads; h++)
                {
                    long sourceAt = (((o * sourceBatch + row) * heads + h) * sourceWidth + sourceWidth - length) * headDim * elementSize;
                    long targetAt = (((o * rows.Count + b) * heads + h) * width + width - length) * headDim * elementSize;
                    from.Slice(checked((int)sourceAt), bytes).CopyTo(target.Slice(checked((int)targetAt), bytes));
                }
        }
        return result;
    }

    /// <summary>Frees the cache.</summary>
    public void Dispose() => Replace([], [], null, 0);

    sealed class OwnedValues(OrtValue[] values) : IDisposable
    {
        public void Dispose() { foreach (var v in values) v.Dispose(); }
    }
}
