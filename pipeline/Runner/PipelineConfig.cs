using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using YamlDotNet.RepresentationModel;
using OnnxLora.GraphRewrite.Numerics;

namespace OnnxLora.Pipeline.Runner;

/// <summary>
/// The `onnxlora run` configuration: sections model, lora, data, train, export, evaluate (YAML or JSON). Every key is
/// checked against the schema below before any work starts, so a typo fails at once with the key's path.
/// </summary>
public sealed class PipelineConfig
{
    /// <summary>Every known key, by section, with its default (null = required or absent). Values are strings as written.</summary>
    static readonly Dictionary<string, Dictionary<string, string?>> Schema = new()
    {
        [""] = new() { ["run_dir"] = "runs/default" },
        ["model"] = new() { ["path"] = null, ["preset"] = null, ["arch"] = "gpt2", ["weights"] = null, ["from"] = null, ["seed"] = "0", ["input_roles"] = null },
        ["lora"] = new() { ["targets"] = "all-linear", ["exclude"] = null, ["layers"] = null, ["rank"] = "8", ["alpha"] = null, ["scaling"] = "peft", ["dropout"] = "0", ["init"] = "kaiming", ["seed"] = "0" },
        ["data"] = new() { ["train"] = null, ["eval"] = null, ["format"] = null, ["task"] = "lm", ["classes"] = "0", ["labels"] = null, ["seq"] = "128", ["skip_bad_rows"] = "false", ["pack"] = "false", ["generate"] = null, ["tokenizer"] = null },
        ["train"] = new()
        {
            ["optimizer"] = "adamw", ["lr"] = "2e-4", ["weight_decay"] = "0.01", ["warmup"] = "0", ["schedule"] = "linear", ["epochs"] = "1", ["max_steps"] = "0",
            ["batch"] = "8", ["grad_accum"] = "1", ["clip"] = "0", ["device"] = "cpu", ["threads"] = "0", ["seed"] = "42", ["shuffle"] = "true",
            ["eval_every"] = "0", ["early_stopping"] = "0", ["head"] = "full", ["pooling"] = "last", ["checkpoint_every"] = "50", ["init_adapter"] = null,
        },
        ["export"] = new() { ["formats"] = "onnx-adapter,peft,merged" },
        ["evaluate"] = new() { ["examples"] = "6" },
    };

    readonly Dictionary<string, string> _values = new(StringComparer.Ordinal);

    PipelineConfig(string source) => Source = source;

    /// <summary>Where the configuration came from (a file path or "built-in default"), for messages.</summary>
    public string Source { get; }

    /// <summary>Folder that relative paths in the file are resolved against.</summary>
    public string BaseDir { get; private init; } = Directory.GetCurrentDirectory();

    /// <summary>A config is a few dozen keys two levels deep; these bounds leave room and stop a hostile file early.</summary>
    const int MaxBytes = 1 << 20, MaxDepth = 16;

    public static PipelineConfig Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such config file", path);
        if (new FileInfo(path).Length > MaxBytes) throw new InvalidDataException($"{path}: {new FileInfo(path).Length:N0} bytes is too large for a config (at most {MaxBytes:N0})");
        return Parse(File.ReadAllText(path), path, System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!);
    }

    public static PipelineConfig Parse(string text, string source, string baseDir)
    {
        var config = new PipelineConfig(source) { BaseDir = baseDir };
        if (text.Length > MaxBytes) throw new InvalidDataException($"{source}: {text.Length:N0} characters is too large for a config (at most {MaxBytes:N0})");
        var yaml = new YamlStream();
        try
        {
            CheckDepth(text, source);
            yaml.Load(new StringReader(text));
        }
        catch (YamlDotNet.Core.YamlException e) { throw new InvalidDataException($"{source}: not valid YAML at line {e.Start.Line}: {e.Message}", e); }
        // YamlDotNet throws these instead of a YamlException on some truncated flow collections and stray bytes (found by fuzzing)
        catch (Exception e) when (e is InvalidOperationException or ArgumentException)
        {
            throw new InvalidDataException($"{source}: not valid YAML (the parser stopped: {e.Message}); check for an unclosed [ or {{ and for bytes that are not text", e);
        }
        if (yaml.Documents.Count == 0) return config;
        if (yaml.Documents[0].RootNode is not YamlMappingNode root) throw new InvalidDataException($"{source}: the top level must be a mapping of sections");
        foreach (var (keyNode, value) in root.Children)
        {
            var key = Key(keyNode, source);
            if (Schema[""].ContainsKey(key)) { config.Set(key, value); continue; }
            if (!Schema.TryGetValue(key, out var section)) throw Unknown(source, key, Schema.Keys.Where(k => k != "").Concat(Schema[""].Keys));
            if (value is not YamlMappingNode map) throw new InvalidDataException($"{source}: section '{key}' must be a mapping");
            foreach (var (innerKey, innerValue) in map.Children)
            {
                var name = Key(innerKey, source);
                if (!section.ContainsKey(name)) throw Unknown(source, $"{key}.{name}", section.Keys.Select(k => $"{key}.{k}"));
                config.Set($"{key}.{name}", innerValue);
            }
        }
        return config;
    }

    /// <summary>
    /// Walks the parser's events (an iterative state machine) before the recursive document builder runs, so 20,000
    /// nested brackets end in an error at the first level past <see cref="MaxDepth"/>, not in a stack overflow.
    /// </summary>
    static void CheckDepth(string text, string source)
    {
        var parser = new YamlDotNet.Core.Parser(new StringReader(text));
        int depth = 0;
        while (parser.MoveNext())
        {
            switch (parser.Current)
            {
                case YamlDotNet.Core.Events.MappingStart or YamlDotNet.Core.Events.SequenceStart:
                    if (++depth > MaxDepth)
                        throw new InvalidDataException($"{source}: nesting deeper than {MaxDepth} levels at line {parser.Current.Start.Line}; a config is sections of keys");
                    break;
                case YamlDotNet.Core.Events.MappingEnd or YamlDotNet.Core.Events.SequenceEnd:
                    depth--;
                    break;
            }
        }
    }

    /// <summary>A mapping key: a plain scalar (a complex key such as "? [a, b]" is refused with its line).</summary>
    static string Key(YamlNode node, string source) => node is YamlScalarNode s ? s.Value ?? ""
        : throw new InvalidDataException($"{source}: line {node.Start.Line}: a key must be a plain name, not a {(node is YamlSequenceNode ? "list" : "mapping")}");

    static InvalidDataException Unknown(string source, string key, IEnumerable<string> known)
    {
        var nearest = known.OrderBy(k => EditDistance.Levenshtein(k, key)).First();
        return new InvalidDataException($"{source}: unknown key '{key}' (did you mean '{nearest}'?)");
    }

    void Set(string key, YamlNode value) => _values[key] = value switch
    {
        YamlScalarNode s => s.Value ?? "",
        YamlSequenceNode seq => string.Join(",", seq.Children.Select(c => (c as YamlScalarNode)?.Value ?? throw new InvalidDataException($"{Source}: '{key}' must be a list of plain values"))),
        _ => throw new InvalidDataException($"{Source}: '{key}' must be a value or a list, not a mapping"),
    };

    /// <summary>Applies `--set section.key=value` overrides, with the same key checks as the file.</summary>
    public void Override(string assignment)
    {
        int eq = assignment.IndexOf('=');
        if (eq <= 0) throw new ArgumentException($"--set '{assignment}' is not key=value (e.g. train.lr=1e-4)");
        var key = assignment[..eq].Trim();
        var (section, name) = key.Contains('.') ? (key[..key.IndexOf('.')], key[(key.IndexOf('.') + 1)..]) : ("", key);
        if (!Schema.TryGetValue(section, out var keys) || !keys.ContainsKey(name))
            throw Unknown("--set", key, Schema.SelectMany(s => s.Value.Keys.Select(k => s.Key == "" ? k : $"{s.Key}.{k}")));
        _values[key] = assignment[(eq + 1)..].Trim();
    }

    string? Raw(string key)
    {
        if (_values.TryGetValue(key, out var v)) return v;
        var (section, name) = key.Contains('.') ? (key[..key.IndexOf('.')], key[(key.IndexOf('.') + 1)..]) : ("", key);
        return Schema[section][name];
    }

    public string? String(string key) => Raw(key) is { Length: > 0 } v ? v : null;

    public string Required(string key) => String(key) ?? throw new InvalidDataException($"{Source}: '{key}' is required");

    public int Int(string key) => int.TryParse(Raw(key), NumberStyles.Integer, CultureInfo.InvariantCulture, out var v) ? v
        : throw new InvalidDataException($"{Source}: '{key}' must be an integer (got '{Raw(key)}')");

    public double Double(string key) => double.TryParse(Raw(key), NumberStyles.Float, CultureInfo.InvariantCulture, out var v) ? v
        : throw new InvalidDataException($"{Source}: '{key}' must be a number (got '{Raw(key)}')");

    public bool Bool(string key) => Raw(key)?.ToLowerInvariant() switch
    {
        "true" or "yes" or "1" => true,
        "false" or "no" or "0" or "" or null => false,
        var other => throw new InvalidDataException($"{Source}: '{key}' must be true or false (got '{other}')"),
    };

    public IReadOnlyList<string> List(string key) => String(key)?.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries) ?? [];

    /// <summary>A path from the config, resolved against the config file's folder.</summary>
    public string? Path(string key) => String(key) is { } p ? System.IO.Path.GetFullPath(System.IO.Path.Combine(BaseDir, p)) : null;

    /// <summary>A hash of the keys of the given sections (defaults included), for skipping a stage whose inputs are unchanged.</summary>
    public string Hash(params string[] sections)
    {
        var sb = new StringBuilder();
        foreach (var section in sections)
            foreach (var name in Schema[section].Keys.Order(StringComparer.Ordinal))
            {
                var key = section == "" ? name : $"{section}.{name}";
                sb.Append(key).Append('=').Append(Raw(key)).Append('\n');
            }
        return Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(sb.ToString())))[..16].ToLowerInvariant();
    }
}
