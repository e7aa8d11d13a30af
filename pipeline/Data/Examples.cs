using OnnxLora.GraphRewrite.Artifacts;
namespace OnnxLora.Pipeline.Data;

/// <summary>
/// One tokenized example. <see cref="Labels"/> is aligned with <see cref="InputIds"/> (Hugging Face's convention:
/// the loss shifts by one inside the graph); −100 marks positions that do not count (prompt, padding).
/// </summary>
public sealed record Example(int[] InputIds, int[] Labels, int ClassLabel = -1)
{
    public const int Ignore = -100;
    public int Length => InputIds.Length;
}

/// <summary>A tokenized dataset and what loading it had to drop or cut.</summary>
public sealed record Dataset(IReadOnlyList<Example> Examples, TrainingTask Task, int Truncated, int SkippedRows,
                             IReadOnlyList<string> ClassNames)
{
    public long TokenCount => Examples.Sum(e => (long)e.Length);
}

/// <summary>A padded batch as flat row-major arrays, ready to become tensors.</summary>
public sealed record Batch(int BatchSize, int SeqLength, long[] InputIds, long[] Labels, long[] Lengths, long[] ClassLabels)
{
    /// <summary>Tokens that count towards throughput (non-padding positions).</summary>
    public long TokenCount => Lengths.Sum();

    /// <summary>Positions an LM loss counts: t whose next label (t+1) is not ignored, as the train graph counts them.</summary>
    public long CountedTargets
    {
        get
        {
            long n = 0;
            for (int r = 0; r < BatchSize; r++)
                for (int t = 1; t < SeqLength; t++)
                    if (Labels[r * SeqLength + t] != Example.Ignore) n++;
            return n;
        }
    }
}
