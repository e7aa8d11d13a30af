namespace OnnxLora.Pipeline.Deployment;

/// <summary>How the next token is chosen from the logits. Temperature 0 is greedy (argmax).</summary>
public sealed record SamplingOptions
{
    /// <summary>0 = greedy (deterministic argmax, lowest id on ties); &gt; 0 divides the logits before the softmax.</summary>
    public double Temperature
    {
        get;
        init => field = double.IsFinite(value) && value >= 0 ? value : throw new ArgumentOutOfRangeException(nameof(Temperature), value, "Temperature must be ≥ 0 (0 = greedy).");
    }

    /// <summary>Keep only the k most likely tokens (0 = all).</summary>
    public int TopK
    {
        get;
        init => field = value >= 0 ? value : throw new ArgumentOutOfRangeException(nameof(TopK), value, "TopK must be ≥ 0 (0 = off).");
    }

    /// <summary>Keep the smallest set of most likely tokens whose probability reaches p (1 = all).</summary>
    public double TopP
    {
        get;
        init => field = value is > 0 and <= 1 ? value : throw new ArgumentOutOfRangeException(nameof(TopP), value, "TopP must be in (0, 1] (1 = off).");
    } = 1.0;

    /// <summary>Seed of the sampler's random generator; the same seed, model and prompt give the same text. Null = random.</summary>
    public int? Seed { get; init; }

    public bool IsGreedy => Temperature == 0;

    public static SamplingOptions Greedy { get; } = new();
}

/// <summary>Picks tokens from logits: greedy, or sampled with temperature, top-k and top-p. Not thread-safe (one per request).</summary>
public sealed class Sampler(SamplingOptions options)
{
    readonly Random _random = options.Seed is int seed ? new Random(seed) : new Random();

    public SamplingOptions Options { get; } = options;

    /// <summary>The next token id for <paramref name="logits"/> [vocab].</summary>
    public int Next(ReadOnlySpan<float> logits)
    {
        if (Options.IsGreedy) return ArgMax(logits);
        var p = Distribution(logits, Options);
        double u = _random.NextDouble(), sum = 0;
        int last = -1;
        for (int i = 0; i < p.Length; i++)
        {
            if (p[i] == 0) continue;
            last = i;
            sum += p[i];
            if (u < sum) return i;
        }
        return last;       // rounding: u ≥ the summed probabilities
    }

    /// <summary>Index of the largest logit (the lowest index on ties).</summary>
    public static int ArgMax(ReadOnlySpan<float> logits)
    {
        if (logits.IsEmpty) throw new ArgumentException("no logits");
        int best = 0;
        for (int i = 1; i < logits.Length; i++) if (logits[i] > logits[best]) best = i;
        return best;
    }

    /// <summary>
    /// The distribution a token is drawn from: softmax(logits / temperature), restricted to the top-k tokens, then to the
    /// top-p nucleus, renormalised. Greedy gives a one-hot on the argmax. Tokens outside the support have probability 0.
    /// </summary>
    public static double[] Distribution(ReadOnlySpan<float> logits, SamplingOptions options)
    {
        var p = new double[logits.Length];
        if (options.IsGreedy) { p[ArgMax(logits)] = 1; return p; }
        double max = double.NegativeInfinity;
        foreach (var l in logits) max = Math.Max(max, l);
        double total = 0;
        for (int i = 0; i < p.Length; i++) total += p[i] = Math.Exp((logits[i] - max) / options.Temperature);
        for (int i = 0; i < p.Length; i++) p[i] /= total;

        // most likely first; ties by id so the support is deterministic
        var order = Enumerable.Range(0, p.Length).OrderByDescending(i => p[i]).ThenBy(i => i).ToArray();
        int keep = options.TopK > 0 ? Math.Min(options.TopK, p.Length) : p.Length;
        if (options.TopP < 1)
        {
            double cumulative = 0;
            for (int n = 0; n < keep; n++)
            {
                cumulative += p[order[n]];
                if (cumulative >= options.TopP) { keep = n + 1; break; }
            }
        }
        for (int n = keep; n < order.Length; n++) p[order[n]] = 0;
        double kept = p.Sum();
        for (int i = 0; i < p.Length; i++) p[i] /= kept;
        return p;
    }
}
