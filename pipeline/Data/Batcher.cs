using OnnxLora.GraphRewrite.Numerics;
namespace OnnxLora.Pipeline.Data;

/// <summary>
/// Splits a dataset into padded batches in a deterministic order: a seeded shuffle per epoch (or file order with
/// shuffling off), each batch padded (on the right) to its longest example. The order depends only on
/// (seed, epoch), so a resumed run sees the same batches.
/// With <paramref name="bucketByLength"/>, examples of similar length share a batch, so a batch of short messages is
/// not padded to one long one: the epoch's order is cut into windows of <see cref="BucketWindow"/> batches, each
/// window sorted by length (longest first, ties in shuffled order), cut into batches, and the full batches of the
/// epoch are then shuffled among themselves (the one partial batch stays last). Still a function of (seed, epoch).
/// </summary>
public sealed class Batcher(Dataset dataset, int batchSize, int padTokenId, bool shuffle, ulong seed, bool bucketByLength = false)
{
    /// <summary>Batches per sorted window: wide enough to find similar lengths, narrow enough to keep epochs mixed.</summary>
    public const int BucketWindow = 50;

    public int BatchesPerEpoch => (dataset.Examples.Count + batchSize - 1) / batchSize;

    /// <summary>The example order of one epoch: batch b is order[b·batchSize …].</summary>
    public int[] Order(int epoch)
    {
        var order = Enumerable.Range(0, dataset.Examples.Count).ToArray();
        var rng = new SplitMix64(seed ^ (0x9E3779B97F4A7C15UL * (ulong)(epoch + 1)));
        if (shuffle) Shuffle(order, ref rng);
        if (!bucketByLength) return order;

        int window = batchSize * BucketWindow;
        for (int start = 0; start < order.Length; start += window)
        {
            int count = Math.Min(window, order.Length - start);
            // stable: equal lengths keep their shuffled (or file) order
            var sorted = order.AsSpan(start, count).ToArray().OrderByDescending(i => dataset.Examples[i].Length).ToArray();
            sorted.CopyTo(order, start);
        }
        var batches = Enumerable.Range(0, order.Length / batchSize).ToArray();
        if (shuffle) Shuffle(batches, ref rng);
        return batches.SelectMany(b => order.AsSpan(b * batchSize, batchSize).ToArray())
                      .Concat(order.Skip(batches.Length * batchSize)).ToArray();
    }

    internal static void Shuffle(int[] items, ref SplitMix64 rng)
    {
        for (int i = items.Length - 1; i > 0; i--)
        {
            int j = (int)(rng.Next() % (ulong)(i + 1));
            (items[i], items[j]) = (items[j], items[i]);
        }
    }

    /// <summary>Batch <paramref name="index"/> of <paramref name="epoch"/>.</summary>
    public Batch Get(int epoch, int index, int[]? order = null) => Pad(Members(epoch, index, order), padTokenId);

    /// <summary>
    /// Rank <paramref name="rank"/>'s slice of batch <paramref name="index"/> when <paramref name="ranks"/> processes share
    /// it (data parallelism): rows [r·n/R, (r+1)·n/R) of its n rows, padded on their own; null when the slice is empty.
    /// </summary>
    public Batch? GetShard(int epoch, int index, int[]? order, int rank, int ranks)
    {
        var members = Members(epoch, index, order);
        int start = (int)((long)members.Count * rank / ranks), end = (int)((long)members.Count * (rank + 1) / ranks);
        return end > start ? Pad(members.GetRange(start, end - start), padTokenId) : null;
    }

    List<Example> Members(int epoch, int index, int[]? order)
    {
        order ??= Order(epoch);
        var members = order.Skip(index * batchSize).Take(batchSize).Select(i => dataset.Examples[i]).ToList();
        if (members.Count == 0) throw new ArgumentOutOfRangeException(nameof(index), $"batch {index} is past the end of epoch {epoch}");
        return members;
    }

    /// <summary>Pads examples to the longest one: pad id for inputs, −100 for labels.</summary>
    public static Batch Pad(IReadOnlyList<Example> members, int padTokenId)
    {
        int rows = members.Count, seq = members.Max(e => e.Length);
        var ids = new long[rows * seq];
        var labels = new long[rows * seq];
        Array.Fill(ids, padTokenId);
        Array.Fill(labels, Example.Ignore);
        for (int r = 0; r < rows; r++)
        {
            var e = members[r];
            for (int t = 0; t < e.Length; t++) { ids[r * seq + t] = e.InputIds[t]; labels[r * seq + t] = e.Labels[t]; }
        }
        return new Batch(rows, seq, ids, labels, members.Select(e => (long)e.Length).ToArray(), members.Select(e => (long)e.ClassLabel).ToArray());
    }
}
