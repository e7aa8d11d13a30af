using System.Globalization;
using System.Text.Json.Serialization;
using System.Text.RegularExpressions;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>An invalid <see cref="LoraConfig"/> value; <see cref="Field"/> names the property, the message says the rule and a fix.</summary>
public sealed class LoraConfigException(string field, string message, Exception? inner = null) : ArgumentException(message, inner)
{
    /// <summary>The LoraConfig property at fault (PEFT-style name, e.g. "Rank").</summary>
    public string Field { get; } = field;
}

/// <summary>How LoRA's A matrix starts (B always starts at zero, so the adapted model starts as the base).</summary>
[JsonConverter(typeof(JsonStringEnumConverter<LoraInit>))]
public enum LoraInit
{
    /// <summary>Kaiming-uniform with a = √5 on A's fan-in, as PEFT and torch.nn.Linear do: U(−1/√in, 1/√in).</summary>
    [JsonStringEnumMemberName("kaiming")] Kaiming,
    /// <summary>PEFT's "gaussian": N(0, σ = 1/r).</summary>
    [JsonStringEnumMemberName("gaussian")] Gaussian,
}

/// <summary>
/// A LoRA configuration with PEFT's field names (r → <see cref="Rank"/>, lora_alpha → <see cref="Alpha"/>,
/// target_modules, exclude_modules, layers_to_transform, rank_pattern, alpha_pattern, lora_dropout, use_rslora →
/// <see cref="Scaling"/>, init_lora_weights → <see cref="Init"/>). Every property checks its value when set, so an
/// instance (including one made with <c>with</c>) is always valid.
/// </summary>
public sealed record LoraConfig
{
    /// <summary>The target that selects every linear layer except the output head, as PEFT's "all-linear".</summary>
    public const string AllLinear = "all-linear";
    /// <summary>Prefix of a target pattern that is a regular expression matched against the whole module path.</summary>
    public const string RegexPrefix = "re:";

    /// <summary>Rank r of A [in, r] and B [r, out]; must be positive.</summary>
    public int Rank
    {
        get;
        init => field = value > 0 ? value : throw new LoraConfigException(nameof(Rank), $"{nameof(Rank)} (r) must be > 0, got {value}; typical values are 8 or 16.");
    } = 8;

    /// <summary>lora_alpha; the branch scale is derived from it by <see cref="Scaling"/>.</summary>
    public double Alpha
    {
        get;
        init => field = double.IsFinite(value) && value > 0 ? value : throw new LoraConfigException(nameof(Alpha), $"{nameof(Alpha)} must be a positive number, got {value}; PEFT commonly uses alpha = r or 2r.");
    } = 8;

    /// <summary>
    /// Which linear layers to adapt. Each entry matches a module path exactly or as a ".suffix" ("c_attn" matches
    /// "transformer.h.0.attn.c_attn"); "re:&lt;regex&gt;" must match the whole path; "all-linear" is every linear except the head.
    /// </summary>
    public IReadOnlyList<string> TargetModules
    {
        get;
        init => field = CheckPatterns(value, nameof(TargetModules), allowEmpty: false);
    } = [AllLinear];

    /// <summary>Modules to leave alone, matched like <see cref="TargetModules"/>.</summary>
    public IReadOnlyList<string> ExcludeModules
    {
        get;
        init => field = CheckPatterns(value, nameof(ExcludeModules), allowEmpty: true);
    } = [];

    /// <summary>Only adapt modules whose block index (first all-digit path segment) is listed; null = every module.</summary>
    public IReadOnlyList<int>? LayersToTransform
    {
        get;
        init => field = value is null || value.All(i => i >= 0) ? value
            : throw new LoraConfigException(nameof(LayersToTransform), $"{nameof(LayersToTransform)} must be block indices ≥ 0, got {string.Join(",", value)}.");
    }

    /// <summary>Per-module rank overrides: regex → rank; a key matches a module path at a '.' boundary, first key wins.</summary>
    public IReadOnlyDictionary<string, int> RankPattern
    {
        get;
        init => field = CheckPatternMap(value, nameof(RankPattern), r => r > 0);
    } = new Dictionary<string, int>();

    /// <summary>Per-module alpha overrides: regex → alpha, matched like <see cref="RankPattern"/>.</summary>
    public IReadOnlyDictionary<string, double> AlphaPattern
    {
        get;
        init => field = CheckPatternMap(value, nameof(AlphaPattern), a => double.IsFinite(a) && a > 0);
    } = new Dictionary<string, double>();

    /// <summary>lora_dropout: probability of zeroing the branch input during training; 0 = no Dropout node.</summary>
    public double Dropout
    {
        get;
        init => field = value is >= 0 and < 1 ? value : throw new LoraConfigException(nameof(Dropout), $"{nameof(Dropout)} must be in [0, 1), got {value}.");
    }

    /// <summary>How the scale follows from alpha and rank; PEFT's alpha/r by default.</summary>
    public LoraScaling Scaling { get; init; } = LoraScaling.Peft;

    /// <summary>How A starts.</summary>
    public LoraInit Init { get; init; } = LoraInit.Kaiming;

    /// <summary>Seed for A's initial values (each module draws from its own stream derived from this seed and its path).</summary>
    public int Seed { get; init; }

    /// <summary>The branch scale for a module with this rank and alpha.</summary>
    public double ScaleFor(int rank, double alpha) => LoraManifest.ScaleFor(Scaling, alpha, rank);

    static IReadOnlyList<string> CheckPatterns(IReadOnlyList<string> patterns, string field, bool allowEmpty)
    {
        ArgumentNullException.ThrowIfNull(patterns, field);
        if (!allowEmpty && patterns.Count == 0)
            throw new LoraConfigException(field, $"{field} is empty; name modules (e.g. c_attn,c_proj), a regex (re:.*attn.*) or {AllLinear}.");
        foreach (var p in patterns)
        {
            if (string.IsNullOrWhiteSpace(p)) throw new LoraConfigException(field, $"{field} has an empty entry.");
            if (p.StartsWith(RegexPrefix, StringComparison.Ordinal)) CheckRegex(p[RegexPrefix.Length..], field);
        }
        return patterns.ToArray();
    }

    static IReadOnlyDictionary<string, T> CheckPatternMap<T>(IReadOnlyDictionary<string, T> map, string field, Func<T, bool> valid)
    {
        ArgumentNullException.ThrowIfNull(map, field);
        foreach (var (key, value) in map)
        {
            CheckRegex(key, field);
            if (!valid(value)) throw new LoraConfigException(field, $"{field}['{key}'] = {value} is out of range (must be > 0).");
        }
        return new Dictionary<string, T>(map);
    }

    static void CheckRegex(string regex, string field)
    {
        try { _ = new Regex(regex); }
        catch (ArgumentException e) { throw new LoraConfigException(field, $"{field}: '{regex}' is not a valid regular expression ({e.Message}).", e); }
    }

    // ---- parsing of the command-line forms, shared by `onnxlora rewrite` and the pipeline runner (enums: WireNames.Parse) ----

    /// <summary>"a,b, c" → ["a", "b", "c"] (a "re:" entry may not contain commas; use one regex with alternation).</summary>
    public static IReadOnlyList<string> ParseList(string text) =>
        text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    /// <summary>"0,1,10-11" → [0, 1, 10, 11].</summary>
    /// <summary>The highest block index a layer list may name: far past any real model, low enough that a range cannot exhaust memory.</summary>
    const int MaxLayer = 65535;

    public static IReadOnlyList<int> ParseLayers(string text)
    {
        var layers = new SortedSet<int>();
        foreach (var part in ParseList(text))
        {
            var range = part.Split('-', StringSplitOptions.TrimEntries);
            if (range.Length == 1 && int.TryParse(range[0], NumberStyles.None, CultureInfo.InvariantCulture, out int one) && one <= MaxLayer) layers.Add(one);
            else if (range.Length == 2 && int.TryParse(range[0], NumberStyles.None, CultureInfo.InvariantCulture, out int lo)
                     && int.TryParse(range[1], NumberStyles.None, CultureInfo.InvariantCulture, out int hi) && lo <= hi && hi <= MaxLayer)
                for (int i = lo; i <= hi; i++) layers.Add(i);
            else throw new FormatException($"layers: '{part}' is not a block index or a range like 10-11 (indices up to {MaxLayer}).");
        }
        return layers.ToArray();
    }

    /// <summary>"re=val,re2=val2" → {re: val, re2: val2} (split at the last '=' of each entry).</summary>
    public static IReadOnlyDictionary<string, double> ParsePatternValues(string text, string what)
    {
        var map = new Dictionary<string, double>();
        foreach (var part in ParseList(text))
        {
            int eq = part.LastIndexOf('=');
            if (eq <= 0 || !double.TryParse(part[(eq + 1)..], NumberStyles.Float, CultureInfo.InvariantCulture, out double v))
                throw new FormatException($"{what}: '{part}' is not 'regex=value'.");
            map[part[..eq]] = v;
        }
        return map;
    }
}
