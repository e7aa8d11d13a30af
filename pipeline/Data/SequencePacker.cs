using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Numerics;
namespace OnnxLora.Pipeline.Data;

/// <summary>
/// Sequence packing for LM training: short examples are concatenated into rows of up to <c>seq</c> tokens, so a batch
/// of short instruction examples is not mostly padding. Examples are taken in a seeded shuffled order (file order
/// with shuffling off) and each goes, whole, into the fullest row it still fits (best fit), else a new row; rows are
/// padded only at their end (by <see cref="Batcher"/>). An example already as long as a row keeps a row of its own,
/// so text cut into full windows is unchanged.
/// <para>Each packed example's first label becomes −100: the graph scores label t from position t−1, which in a
/// packed row is the previous example's last token, a target the unpacked data never had. Every other label, and
/// every token, appears exactly once. Caveat: the batch's attention mask is 1 across the row, so a token attends to
/// the earlier examples of its row (the graphs take a 2-D mask, not a block-diagonal one), and position ids run on
/// across the row rather than restarting per example.</para>
/// </summary>
public static class SequencePacker
{
    public static Dataset Pack(Dataset dataset, int seqLength, ulong seed, bool shuffle)
    {
        if (dataset.Task != TrainingTask.Lm)
            throw new ArgumentException("--pack concatenates language-model examples: it does not apply to --task cls");
        if (seqLength < 1) throw new ArgumentOutOfRangeException(nameof(seqLength), $"--seq must be ≥ 1 (got {seqLength})");
        var order = Enumerable.Range(0, dataset.Examples.Count).ToArray();
        var rng = new SplitMix64(seed ^ 0x5EC9ACCE5EC9ACCEUL);
        if (shuffle) Batcher.Shuffle(order, ref rng);

        var rows = new List<List<Example>>();
        var used = new List<int>();
        // open rows by free space: open[f] holds rows with exactly f tokens free, so best fit scans at most seq lists
        var open = new Stack<int>[seqLength + 1];
        for (int f = 0; f <= seqLength; f++) open[f] = new Stack<int>();
        foreach (int i in order)
        {
            var e = dataset.Examples[i];
            int row = -1;
            for (int f = e.Length; f < seqLength && row < 0; f++)
                if (open[f].Count > 0) row = open[f].Pop();
            if (row < 0) { row = rows.Count; rows.Add([]); used.Add(0); }
            rows[row].Add(e);
            used[row] += e.Length;
            if (used[row] < seqLength) open[seqLength - used[row]].Push(row);
        }
        return dataset with { Examples = rows.Select(Concat).ToList() };
    }

    static Example Concat(List<Example> members)
    {
        if (members.Count == 1) return members[0];
        var ids = new int[members.Sum(e => e.Length)];
        var labels = new int[ids.Length];
        int at = 0;
        foreach (var e in members)
        {
            e.InputIds.CopyTo(ids, at);
            e.Labels.CopyTo(labels, at);
            if (at > 0) labels[at] = Example.Ignore;   // not predicted from the previous example's last token
            at += e.Length;
        }
        return new Example(ids, labels);
    }
}
