using System.Collections.Concurrent;
using System.Text.RegularExpressions;
using OnnxLora.GraphRewrite.Numerics;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>A linear layer chosen for LoRA, with its resolved rank, alpha and scale.</summary>
public sealed record LoraSelection(LinearLayer Layer, int Rank, double Alpha, double Scale)
{
    /// <summary>Name of A [in, r]: "&lt;module&gt;.lora_A.weight".</summary>
    public string LoraA => Layer.Module + ".lora_A.weight";
    /// <summary>Name of B [r, out]: "&lt;module&gt;.lora_B.weight".</summary>
    public string LoraB => Layer.Module + ".lora_B.weight";
    /// <summary>r·(in + out).</summary>
    public long Parameters => Layer.LoraParameters(Rank);

    /// <summary>The manifest entry for this target.</summary>
    public LoraTarget ToTarget() => new()
    {
        Module = Layer.Module, Nodes = Layer.Nodes, Weight = Layer.Weight, WeightTransposed = Layer.WeightTransposed,
        In = Layer.In, Out = Layer.Out, Rank = Rank, Alpha = Alpha, Scale = Scale, LoraA = LoraA, LoraB = LoraB,
        DataType = Layer.ComputeType,
    };
}

/// <summary>Target matching with PEFT's semantics, as pure functions over module paths.</summary>
public static class LoraTargeting
{
    /// <summary>
    /// Whether one pattern selects a layer: "all-linear" = any layer but the head; "re:&lt;regex&gt;" = full match of the path;
    /// otherwise the path equals the pattern or ends with "." + pattern. A shared layer also matches through its <see cref="LinearLayer.Aliases"/>.
    /// </summary>
    public static bool Matches(string pattern, LinearLayer layer) =>
        pattern == LoraConfig.AllLinear ? !layer.IsHead : Matches(pattern, layer.Module) || layer.Aliases.Any(a => Matches(pattern, a));

    /// <summary>Whether a name/suffix/"re:" pattern matches a module path (no "all-linear" here: it needs the layer).</summary>
    public static bool Matches(string pattern, string module)
    {
        if (pattern.StartsWith(LoraConfig.RegexPrefix, StringComparison.Ordinal))
            return FullMatch($"^(?:{pattern[LoraConfig.RegexPrefix.Length..]})$", pattern).IsMatch(module);
        return module == pattern || module.EndsWith("." + pattern, StringComparison.Ordinal);
    }

    /// <summary>
    /// PEFT's rank_pattern/alpha_pattern key match: the regex matches the path, or a suffix after a '.'. The one
    /// matcher for these keys: the rewrite and the PEFT importer both call it.
    /// </summary>
    /// <exception cref="ArgumentException">The key is not a regex .NET's non-backtracking engine accepts (the message names it).</exception>
    public static bool MatchesPatternKey(string key, string module) => FullMatch($"^(?:.*\\.)?(?:{key})$", key).IsMatch(module);

    static readonly ConcurrentDictionary<string, Regex> Compiled = new(StringComparer.Ordinal);

    /// <summary>
    /// Patterns come from users' configs and strangers' adapter_config.json: the non-backtracking engine matches in time
    /// linear in the module path, so a key like "(.|.)*Z" cannot hang the tool. It has no backreferences or lookarounds;
    /// such a key is refused with its text.
    /// </summary>
    static Regex FullMatch(string regex, string source) => Compiled.GetOrAdd(regex, r =>
    {
        try { return new Regex(r, RegexOptions.NonBacktracking | RegexOptions.CultureInvariant); }
        catch (NotSupportedException e) { throw new ArgumentException($"pattern '{source}' uses a regex feature OnnxLora does not run (backreferences, lookarounds, atomic groups): {e.Message}", e); }
        catch (ArgumentException e) { throw new ArgumentException($"pattern '{source}' is not a valid regex: {e.Message}", e); }
    });

    /// <summary>
    /// Chooses the layers <paramref name="config"/> targets, in discovery order: matched by a target, not by an exclude,
    /// inside the listed blocks; each with its rank and alpha (first matching pattern key wins) and scale.
    /// </summary>
    /// <exception cref="ArgumentException">No layers, a target that matches nothing (the message lists the nearest
    /// module names), everything filtered away, or a rank larger than min(in, out) (the message names the module).</exception>
    public static IReadOnlyList<LoraSelection> Select(IReadOnlyList<LinearLayer> layers, LoraConfig config)
    {
        ArgumentNullException.ThrowIfNull(layers);
        ArgumentNullException.ThrowIfNull(config);
        if (layers.Count == 0)
            throw new ArgumentException("the model has no LoRA-able weight MatMul/Gemm (no MatMul/Gemm multiplies an activation by a constant weight initializer); nothing to adapt");
        foreach (var pattern in config.TargetModules)
            if (!layers.Any(l => Matches(pattern, l)))
                throw new ArgumentException($"target '{pattern}' matches no linear module; nearest: {Nearest(pattern, layers)}. Run 'onnxlora inspect' for the full list.");

        var chosen = layers.Where(l => config.TargetModules.Any(p => Matches(p, l)) && !config.ExcludeModules.Any(p => Matches(p, l))).ToList();
        if (config.LayersToTransform is { } blocks) chosen = chosen.Where(l => l.BlockIndex is int b && blocks.Contains(b)).ToList();
        if (chosen.Count == 0)
            throw new ArgumentException($"targets {string.Join(",", config.TargetModules)} match modules, but the excluded modules"
                + $"{(config.LayersToTransform is null ? "" : " and the layer filter " + string.Join(",", config.LayersToTransform))} remove all of them");

        var result = new List<LoraSelection>();
        foreach (var layer in chosen)
        {
            int rank = config.RankPattern.FirstOrDefault(kv => MatchesPatternKey(kv.Key, layer.Module)) is { Key: not null } r ? r.Value : config.Rank;
            double alpha = config.AlphaPattern.FirstOrDefault(kv => MatchesPatternKey(kv.Key, layer.Module)) is { Key: not null } a ? a.Value : config.Alpha;
            if (rank > Math.Min(layer.In, layer.Out))
                throw new ArgumentException($"rank {rank} for module '{layer.Module}' exceeds min(in, out) = min({layer.In}, {layer.Out}); lower --rank or exclude the module");
            result.Add(new LoraSelection(layer, rank, alpha, config.ScaleFor(rank, alpha)));
        }
        return result;
    }

    /// <summary>Distinct module names (last path segments first) ordered by edit distance to the pattern.</summary>
    static string Nearest(string pattern, IReadOnlyList<LinearLayer> layers)
    {
        var p = pattern.StartsWith(LoraConfig.RegexPrefix, StringComparison.Ordinal) ? pattern[LoraConfig.RegexPrefix.Length..] : pattern;
        var names = layers.SelectMany(l => l.Aliases.Prepend(l.Module)).ToList();
        var candidates = names.Select(m => m.Split('.')[^1]).Concat(names).Distinct()
            .OrderBy(c => EditDistance.Levenshtein(p, c)).ThenBy(c => c.Length).Take(8).ToList();
        return string.Join(", ", candidates) + $" ({layers.Count} modules in all)";
    }
}
