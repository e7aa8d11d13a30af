namespace OnnxLora.GraphRewrite.Numerics;

/// <summary>
/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, fast, seedable generator whose sequence is fixed by its few lines
/// of integer arithmetic, so it never changes across .NET versions or platforms (System.Random's may).
/// </summary>
public struct SplitMix64(ulong seed)
{
    ulong _state = seed;

    public ulong State => _state;

    /// <summary>The next 64 random bits.</summary>
    public ulong Next()
    {
        _state += 0x9E3779B97F4A7C15UL;
        return Mix(_state);
    }

    /// <summary>Uniform in [0, 1), from the top 53 bits.</summary>
    public double NextDouble() => (Next() >> 11) * (1.0 / (1UL << 53));

    /// <summary>SplitMix64's finalizer: a bijective avalanche of 64 bits (also used to derive seeds).</summary>
    public static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}

/// <summary>
/// A small seeded generator of N(0, 1) samples that gives the same bits on every run, thread count and platform:
/// SplitMix64 for uniforms and the polar form of Box-Muller (Marsaglia) for normals, with the log written here from
/// +, ×, ÷ and √ only (IEEE-754 rounds those exactly; <see cref="Math.Log(double)"/> comes from the platform's C
/// library and may differ in the last bit between platforms).
/// </summary>
public struct SeededNormal
{
    SplitMix64 _bits;
    double _spare;
    bool _hasSpare;

    /// <summary>A stream for one (seed, name, chunk) triple; different names or chunks give independent streams.</summary>
    public SeededNormal(ulong seed, string name = "", long chunk = 0)
    {
        _bits = new SplitMix64(SplitMix64.Mix(SplitMix64.Mix(SplitMix64.Mix(seed) ^ Fnv1a(name)) ^ (ulong)chunk));
        _spare = 0;
        _hasSpare = false;
    }

    /// <summary>The next 64 random bits (SplitMix64).</summary>
    public ulong NextUInt64() => _bits.Next();

    /// <summary>A sample of N(0, 1).</summary>
    public double NextNormal()
    {
        if (_hasSpare)
        {
            _hasSpare = false;
            return _spare;
        }
        double u, v, s;
        do
        {
            // uniform in (−1, 1) from 53 bits; keep points strictly inside the unit circle, away from 0
            u = (long)(NextUInt64() >> 11) * (2.0 / (1UL << 53)) - 1;
            v = (long)(NextUInt64() >> 11) * (2.0 / (1UL << 53)) - 1;
            s = u * u + v * v;
        } while (s >= 1 || s < 1e-300);
        double factor = Math.Sqrt(-2 * DeterministicMath.Log(s) / s);
        _spare = v * factor;
        _hasSpare = true;
        return u * factor;
    }

    /// <summary>Fills <paramref name="values"/> with N(0, <paramref name="std"/>) samples rounded to float.</summary>
    public void Fill(Span<float> values, double std)
    {
        for (int i = 0; i < values.Length; i++) values[i] = (float)(std * NextNormal());
    }

    /// <summary>
    /// Fills each tensor with N(0, std) samples from <paramref name="seed"/>: each tensor, in chunks of 2¹⁸ values, has
    /// its own stream (named by the tensor), so the bits do not depend on the thread count or the order of the list.
    /// </summary>
    public static void FillAll(IReadOnlyList<(string Name, float[] Values, double Std)> tensors, long seed)
    {
        const int chunk = 1 << 18;
        var work = new List<(string Name, float[] Values, double Std, int Chunk)>();
        foreach (var (name, values, std) in tensors)
            for (int c = 0; c * (long)chunk < values.Length; c++) work.Add((name, values, std, c));
        Parallel.ForEach(work, w =>
        {
            int start = w.Chunk * chunk, count = Math.Min(chunk, w.Values.Length - start);
            new SeededNormal((ulong)seed, w.Name, w.Chunk).Fill(w.Values.AsSpan(start, count), w.Std);
        });
    }

    static ulong Fnv1a(string s)
    {
        ulong h = 0xCBF29CE484222325UL;
        foreach (char c in s) h = (h ^ c) * 0x100000001B3UL;
        return h;
    }
}

/// <summary>
/// A natural log from basic IEEE operations only, so its result is bit-identical everywhere; accurate to a few ulps,
/// far below the float32 rounding the weights get.
/// </summary>
public static class DeterministicMath
{
    const double Ln2 = 0.693147180559945309417232121458;
    const double Sqrt2 = 1.41421356237309504880168872421;

    /// <summary>Natural log of a positive, normal, finite <paramref name="x"/>.</summary>
    public static double Log(double x)
    {
        if (!double.IsNormal(x) || x < 0) throw new ArgumentOutOfRangeException(nameof(x), x, "Log needs a positive, normal, finite number");
        // x = m · 2^e with m in [√½, √2), then log m = 2·atanh(s), s = (m−1)/(m+1), |s| ≤ 0.172
        long bits = BitConverter.DoubleToInt64Bits(x);
        int e = (int)((bits >> 52) & 0x7FF) - 1023;
        double m = BitConverter.Int64BitsToDouble((bits & 0x000FFFFFFFFFFFFFL) | 0x3FF0000000000000L);
        if (m > Sqrt2) { m *= 0.5; e++; }
        double s = (m - 1) / (m + 1), s2 = s * s;
        // atanh(s)/s = 1 + s²/3 + s⁴/5 + … + s¹⁸/19 (the next term is below 1e-17); the compiler folds 1.0/k exactly
        double p = 1.0 / 19;
        p = p * s2 + 1.0 / 17;
        p = p * s2 + 1.0 / 15;
        p = p * s2 + 1.0 / 13;
        p = p * s2 + 1.0 / 11;
        p = p * s2 + 1.0 / 9;
        p = p * s2 + 1.0 / 7;
        p = p * s2 + 1.0 / 5;
        p = p * s2 + 1.0 / 3;
        p = p * s2 + 1.0;
        return e * Ln2 + 2 * s * p;
    }
}
