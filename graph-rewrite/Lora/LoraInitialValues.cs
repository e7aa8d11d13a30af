using OnnxLora.GraphRewrite.Numerics;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>Initial values of A; deterministic for (seed, module), independent of which other modules are adapted.</summary>
public static class LoraInitialValues
{
    /// <summary>
    /// A [in, r] row-major. Kaiming-uniform(a=√5) on fan-in = in gives U(−1/√in, 1/√in) (gain √(2/(1+5)) · √(3/in));
    /// gaussian is PEFT's N(0, σ = 1/r).
    /// </summary>
    public static double[] A(long inFeatures, int rank, LoraInit init, int seed, string module)
    {
        var a = new double[checked(inFeatures * rank)];
        switch (init)
        {
            case LoraInit.Kaiming:
                double bound = 1 / Math.Sqrt(inFeatures);
                var random = new Random(StreamSeed(seed, module));
                for (int i = 0; i < a.Length; i++) a[i] = (2 * random.NextDouble() - 1) * bound;
                break;
            case LoraInit.Gaussian:
                // SeededNormal, not Box–Muller over Math.Log/Math.Cos: those come from the platform's C library and
                // may differ in the last bit between machines
                double sigma = 1.0 / rank;
                var normal = new SeededNormal((ulong)seed, module);
                for (int i = 0; i < a.Length; i++) a[i] = sigma * normal.NextNormal();
                break;
            default: throw new ArgumentOutOfRangeException(nameof(init), init, null);
        }
        return a;
    }

    /// <summary>FNV-1a of the module path mixed with the seed: one stable stream per module.</summary>
    static int StreamSeed(int seed, string module)
    {
        uint h = 2166136261;
        foreach (char c in module) { h ^= c; h *= 16777619; }
        h ^= (uint)seed * 2654435761u;
        return (int)(h & 0x7FFFFFFF);
    }
}
