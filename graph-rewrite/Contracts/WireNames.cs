using System.Reflection;
using System.Text.Json.Serialization;

namespace OnnxLora.GraphRewrite.Contracts;

/// <summary>
/// The one spelling of an enum that crosses a boundary (artifacts.json, train_config.json, lora_manifest.json, a flag
/// or a pipeline config key: <see cref="Artifacts.TrainingTask"/>, <see cref="Artifacts.HeadMode"/>,
/// <see cref="Artifacts.Pooling"/>, <see cref="Autodiff.OptimizerKind"/>, <see cref="Lora.LoraScaling"/>,
/// <see cref="Lora.LoraInit"/>, the learning-rate schedule): each member's <see cref="JsonStringEnumMemberNameAttribute"/>.
/// JSON reads and writes it through <see cref="JsonStringEnumConverter{TEnum}"/>, which honours the same attribute;
/// <see cref="Parse{T}"/> is the one parser for text, <see cref="WireName{T}"/> the one writer.
/// </summary>
public static class WireNames
{
    /// <summary>The member named <paramref name="text"/> (any case, trimmed); the message names <paramref name="what"/> and the accepted values.</summary>
    public static T Parse<T>(string text, string what) where T : struct, Enum
    {
        ArgumentNullException.ThrowIfNull(text);
        foreach (var (value, name) in Names<T>.All)
            if (string.Equals(name, text.Trim(), StringComparison.OrdinalIgnoreCase)) return value;
        throw new ArgumentException($"{what} must be {Names<T>.Choices} (got '{text}')");
    }

    /// <summary>How <paramref name="value"/> is written in artifacts.json, train_config.json and on the command line.</summary>
    public static string WireName<T>(this T value) where T : struct, Enum =>
        Names<T>.All.FirstOrDefault(n => n.Value.Equals(value)).Name ?? throw new ArgumentOutOfRangeException(nameof(value), value, $"not a {typeof(T).Name}");

    static class Names<T> where T : struct, Enum
    {
        public static readonly (T Value, string Name)[] All = typeof(T).GetFields(BindingFlags.Public | BindingFlags.Static)
            .Select(f => ((T)f.GetValue(null)!, f.GetCustomAttribute<JsonStringEnumMemberNameAttribute>()?.Name
                ?? throw new InvalidOperationException($"{typeof(T).Name}.{f.Name} has no [JsonStringEnumMemberName]: its wire name would differ between JSON and text")))
            .ToArray();

        public static readonly string Choices = All.Length == 2 ? $"{All[0].Name} or {All[1].Name}"
            : string.Join(", ", All[..^1].Select(n => n.Name)) + " or " + All[^1].Name;
    }
}
