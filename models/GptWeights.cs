using System.Text.RegularExpressions;
using OnnxLora.GraphRewrite.Numerics;

namespace OnnxLora.Models;

/// <summary>One float32 weight: its shape and row-major values.</summary>
public sealed record WeightTensor(long[] Shape, float[] Values)
{
    public override string ToString() => $"[{string.Join(", ", Shape)}]";
}

/// <summary>
/// The weights of a GPT-2, named as Hugging Face names them (<c>transformer.h.0.attn.c_attn.weight</c>) in Conv1D
/// layout (<c>[in, out]</c>); see <see cref="GptLayout"/> for the full list. Make one with <see cref="Random"/> or
/// <see cref="FromSafeTensors"/>; both check every name and shape against <see cref="Config"/>.
/// </summary>
public sealed partial class GptWeights
{
    readonly Dictionary<string, WeightTensor> _tensors;

    GptWeights(GptConfig config, Dictionary<string, WeightTensor> tensors)
    {
        Config = config;
        _tensors = tensors;
        Names = GptLayout.Tensors(config).Select(t => t.Name).ToArray();
    }

    /// <summary>The shape these weights have (for imported weights: inferred from the file).</summary>
    public GptConfig Config { get; }

    /// <summary>Tensor names in Hugging Face state-dict order.</summary>
    public IReadOnlyList<string> Names { get; }

    /// <summary>Whether there is a tensor called <paramref name="name"/>.</summary>
    public bool Contains(string name) => _tensors.ContainsKey(name);

    /// <summary>The tensor called <paramref name="name"/> (full name, with the <c>transformer.</c> prefix).</summary>
    public WeightTensor this[string name] =>
        _tensors.TryGetValue(name, out var t) ? t : throw new KeyNotFoundException($"GPT weights have no tensor '{name}' ({Config})");

    /// <summary>Total number of weights (the tied embedding/head counted once).</summary>
    public long ParameterCount => _tensors.Values.Sum(t => (long)t.Values.Length);

    /// <summary>
    /// Wraps existing tensors after checking that every tensor of <paramref name="config"/> is there with its
    /// shape and no other. The arrays are used, not copied.
    /// </summary>
    public static GptWeights Create(GptConfig config, IReadOnlyDictionary<string, WeightTensor> tensors, string what = "GPT weights")
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(tensors);
        config.Validate();
        var layout = GptLayout.Tensors(config);
        var result = new Dictionary<string, WeightTensor>(layout.Count, StringComparer.Ordinal);
        foreach (var (name, shape) in layout)
        {
            if (!tensors.TryGetValue(name, out var t)) throw new ArgumentException($"{what}: missing tensor '{name}' {Show(shape)} for {config}");
            if (!t.Shape.SequenceEqual(shape)) throw new ArgumentException($"{what}: tensor '{name}' has shape {Show(t.Shape)}, {config} needs {Show(shape)}");
            if (t.Values.LongLength != shape.Aggregate(1L, (a, b) => a * b))
                throw new ArgumentException($"{what}: tensor '{name}' {Show(shape)} holds {t.Values.LongLength} values");
            result[name] = t;
        }
        var extra = tensors.Keys.Where(k => !result.ContainsKey(k)).ToList();
        if (extra.Count > 0) throw new ArgumentException($"{what}: unexpected tensor(s) for {config}: {string.Join(", ", extra.Take(5))}{(extra.Count > 5 ? ", …" : "")}");
        return new GptWeights(config, result);
    }

    /// <summary>
    /// GPT-2's initialisation from <paramref name="seed"/>: N(0, 0.02) for embeddings and projections, the residual
    /// output projections (<see cref="GptLayout.ResidualProjections"/>) N(0, 0.02/√(2·layers)), biases 0,
    /// LayerNorm scale 1 and shift 0. The same seed gives the same bits on every run, machine and thread count
    /// (each tensor, in chunks of 2¹⁸ values, has its own <see cref="SeededNormal"/> stream).
    /// </summary>
    public static GptWeights Random(GptConfig config, long seed = 0)
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        const double std = 0.02;
        double residualStd = std / Math.Sqrt(2.0 * config.Layers);
        var tensors = new Dictionary<string, WeightTensor>(StringComparer.Ordinal);
        var random = new List<(string Name, float[] Values, double Std)>();
        foreach (var (name, shape) in GptLayout.Tensors(config))
        {
            var values = new float[checked((int)shape.Aggregate(1L, (a, b) => a * b))];
            tensors[name] = new WeightTensor(shape, values);
            bool isLayerNorm = name.Contains(".ln_", StringComparison.Ordinal);
            if (name.EndsWith(".bias", StringComparison.Ordinal)) continue;               // biases and LN shifts: 0
            if (isLayerNorm) { values.AsSpan().Fill(1f); continue; }                    // LN scales: 1
            random.Add((name, values, GptLayout.ResidualProjections.Any(p => name.EndsWith("." + p, StringComparison.Ordinal)) ? residualStd : std));
        }
        SeededNormal.FillAll(random, seed);
        return new GptWeights(config, tensors);
    }

    /// <summary>
    /// Writes the weights as a Hugging Face GPT2LMHeadModel <c>model.safetensors</c> would hold them (F32,
    /// <c>transformer.</c> names, Conv1D layout, the tied <c>lm_head.weight</c> left out as <c>save_pretrained</c> does).
    /// </summary>
    public void SaveSafeTensors(string path, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var tensors = GptLayout.Tensors(Config).Select(t =>
            KeyValuePair.Create(t.Name, SafeTensor.FromFloats(t.Shape, _tensors[t.Name].Values)));
        SafeTensorsFile.Write(path, tensors, metadata ?? new Dictionary<string, string> { ["format"] = "pt" });
    }

    internal static string Show(long[] shape) => $"[{string.Join(", ", shape)}]";

    [GeneratedRegex(@"^h\.(\d+)\.(.+)$")]
    private static partial Regex BlockName();
}
