using OnnxLora.GraphRewrite.Numerics;
namespace OnnxLora.Pipeline.Data;

/// <summary>
/// Splits a dataset into padded batches in a deterministic order: a seeded shuffle per epoch (or file order with
/// shuffling off), each batch padded (on the right) to its longest example. The order depends only on
/// (seed, epoch), so a resumed run sees the same batches.
/// </summary>
public sealed class Batcher(Dataset dataset, int batchSize, int padTokenId, bool shuffle, ulong seed)
{
    public int BatchesPerEpoch => (dataset.Examples.Count + batchSize - 1) / batchSize;

    /// <summary>The example order of one epoch.</summary>
    public int[] Order(int epoch)
    {
        var order = Enumerable.Range(0, dataset.Examples.Count).ToArray();
        if (!shuffle) return order;
        var rng = new SplitMix64(seed ^ (0x9E3779B97F4A7C15UL * (ulong)(epoch + 1)));
        for (int i = order.Length - 1; i > 0; i--)
        {
            int j = (int)(rng.Next() % (ulong)(i + 1));
            (order[i], order[j]) = (order[j], order[i]);
        }
        return order;
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
