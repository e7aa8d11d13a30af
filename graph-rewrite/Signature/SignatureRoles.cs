using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;
using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Signature;

/// <summary>One graph input or output as the role decision sees it: name, element type and dims (null = unknown rank).</summary>
public sealed record IoDescription(string Name, DataType ElemType, IReadOnlyList<Dim>? Dims);

/// <summary>A decided input or output: its role and, for a cache tensor, the layer it belongs to.</summary>
public sealed record SignatureEntry(string Name, IoRole Role, int? Layer, DataType ElemType, IReadOnlyList<Dim>? Dims)
{
    public override string ToString() => Layer is int l ? $"{Role.Name()}[{l}]" : Role.Name();
}

/// <summary>A role the user gives an input by name (<c>--input-role NAME=ROLE[:LAYER]</c>).</summary>
public sealed record RoleOverride(IoRole Role, int? Layer)
{
    /// <summary>Parses <c>NAME=ROLE</c> or <c>NAME=ROLE:LAYER</c> (the layer for past_key/past_value/past_key_value).</summary>
    public static KeyValuePair<string, RoleOverride> Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        int eq = text.IndexOf('=', StringComparison.Ordinal);
        if (eq <= 0 || eq == text.Length - 1) throw new ArgumentException($"--input-role '{text}': expected NAME=ROLE (e.g. mask=attention_mask, kv_0_k=past_key:0)");
        var name = text[..eq];
        var rhs = text[(eq + 1)..].Split(':');
        var role = IoRoles.ParseInputRole(rhs[0], $"--input-role {name}");
        int? layer = null;
        if (rhs.Length == 2 && int.TryParse(rhs[1], NumberStyles.None, CultureInfo.InvariantCulture, out var l)) layer = l;
        else if (rhs.Length >= 2) throw new ArgumentException($"--input-role '{text}': the layer after ':' must be a non-negative integer");
        if (role.IsPast() != layer.HasValue)
            throw new ArgumentException(role.IsPast()
                ? $"--input-role '{text}': {role.Name()} needs its layer, e.g. {name}={role.Name()}:0"
                : $"--input-role '{text}': only past roles take a layer");
        return KeyValuePair.Create(name, new RoleOverride(role, layer));
    }

    /// <summary>Parses several NAME=ROLE[:LAYER] flags; a name given twice is an error.</summary>
    public static Dictionary<string, RoleOverride> ParseAll(IEnumerable<string> flags)
    {
        var result = new Dictionary<string, RoleOverride>(StringComparer.Ordinal);
        foreach (var f in flags)
        {
            var (name, role) = Parse(f);
            if (!result.TryAdd(name, role)) throw new ArgumentException($"--input-role: '{name}' is given twice");
        }
        return result;
    }

    public override string ToString() => Layer is int l ? $"{Role.Name()}:{l}" : Role.Name();
}

/// <summary>The decided roles of a model's inputs (those a caller feeds) and outputs.</summary>
public sealed class ModelRoles(IReadOnlyList<SignatureEntry> inputs, IReadOnlyList<SignatureEntry> outputs)
{
    public IReadOnlyList<SignatureEntry> Inputs { get; } = inputs;
    public IReadOnlyList<SignatureEntry> Outputs { get; } = outputs;

    /// <summary>The token-ids input (every decoder has exactly one).</summary>
    public string InputIds => Inputs.First(i => i.Role == IoRole.InputIds).Name;

    /// <summary>The logits output.</summary>
    public string Logits => Outputs.First(o => o.Role == IoRole.Logits).Name;

    /// <summary>The input with <paramref name="role"/>, or null.</summary>
    public string? Input(IoRole role) => Inputs.FirstOrDefault(i => i.Role == role)?.Name;

    /// <summary>True when the model takes a KV cache.</summary>
    public bool HasPast => Inputs.Any(i => i.Role.IsPast());

    public SignatureEntry? RoleOf(string name) => Inputs.Concat(Outputs).FirstOrDefault(e => e.Name == name);
}

/// <summary>
/// Decides each graph input's and output's role from its name, element type and shape, by one table of rules
/// (Optimum's decoder names first, then the older cache forms); user overrides win. An input no rule claims is an
/// error that names it and says how to map it. Overrides travel with a rewrite in the models' metadata
/// (<see cref="MetadataKey"/>), so train, eval and deployment decide the same roles from model.onnx and deploy.onnx.
/// </summary>
public static class SignatureRoles
{
    /// <summary>metadata_props key holding the user's overrides as JSON {name: "role[:layer]"}.</summary>
    public const string MetadataKey = "onnxlora.input_roles";

    enum Kind { Integer, Mask, Float }

    sealed record Rule(Regex Name, IoRole Role, Kind Type, int[] Ranks, string Shape);

    static Rule R(string pattern, IoRole role, Kind type, string shape, params int[] ranks) =>
        new(new Regex("^" + pattern + "$", RegexOptions.CultureInvariant), role, type, ranks, shape);

    // Every input name we know, one line each; a (\d+) group is the layer.
    static readonly Rule[] InputRules =
    [
        R("input_ids", IoRole.InputIds, Kind.Integer, "[batch, tokens]", 2),
        R("attention_mask", IoRole.AttentionMask, Kind.Mask, "[batch, past + tokens]", 2),
        R("position_ids", IoRole.PositionIds, Kind.Integer, "[batch, tokens]", 2),
        R("token_type_ids", IoRole.TokenTypeIds, Kind.Integer, "[batch, tokens]", 2),
        R("cache_position", IoRole.CachePosition, Kind.Integer, "[tokens]", 1),
        R("adapter_index", IoRole.AdapterIndex, Kind.Integer, "[batch]", 1),
        R(@"past_key_values\.(\d+)\.key", IoRole.PastKey, Kind.Float, "[batch, kv_heads, past, head_dim]", 4),
        R(@"past_key_values\.(\d+)\.value", IoRole.PastValue, Kind.Float, "[batch, kv_heads, past, head_dim]", 4),
        R(@"past_key_values\.(\d+)", IoRole.PastKeyValue, Kind.Float, "[2, batch, heads, past, head_dim]", 5),
        R(@"past\.(\d+)", IoRole.PastKeyValue, Kind.Float, "[2, batch, heads, past, head_dim]", 5),
    ];

    static readonly Rule[] OutputRules =
    [
        R("logits", IoRole.Logits, Kind.Float, "[batch, tokens, vocab]", 2, 3),
        R(@"present(?:_key_values)?\.(\d+)\.key", IoRole.PresentKey, Kind.Float, "[batch, kv_heads, total, head_dim]", 4),
        R(@"present(?:_key_values)?\.(\d+)\.value", IoRole.PresentValue, Kind.Float, "[batch, kv_heads, total, head_dim]", 4),
        R(@"present(?:_key_values)?\.(\d+)", IoRole.PresentKeyValue, Kind.Float, "[2, batch, heads, total, head_dim]", 5),
    ];

    /// <summary>
    /// Roles of <paramref name="model"/>'s fed inputs (graph inputs without an initializer) and outputs; overrides from
    /// its metadata, then <paramref name="overrides"/>, win over the table.
    /// </summary>
    public static ModelRoles Decide(ModelProto model, IReadOnlyDictionary<string, RoleOverride>? overrides = null, string? source = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        var initialized = model.Graph.Initializer.Select(t => t.Name).ToHashSet(StringComparer.Ordinal);
        var inputs = model.Graph.Input.Where(i => !initialized.Contains(i.Name)).Select(Describe).ToList();
        var outputs = model.Graph.Output.Select(Describe).ToList();
        return Decide(inputs, outputs, Merge(FromMetadata(model.MetadataProps.Select(p => KeyValuePair.Create(p.Key, p.Value)), source), overrides), source ?? model.Graph.Name);
    }

    /// <summary>True when a fed input is integer-typed: a token model (a float-input model such as an MLP has no roles to decide).</summary>
    public static bool TakesTokens(ModelProto model)
    {
        var initialized = model.Graph.Initializer.Select(t => t.Name).ToHashSet(StringComparer.Ordinal);
        return model.Graph.Input.Any(i => !initialized.Contains(i.Name) && (DataType)ValueInfos.ElemType(i) is DataType.Int64 or DataType.Int32);
    }

    public static IoDescription Describe(ValueInfoProto v) => new(v.Name, (DataType)ValueInfos.ElemType(v), ValueInfos.Dims(v));

    /// <summary>The decision on plain descriptions (ONNX Runtime's metadata in deployment, a graph's value infos at rewrite).</summary>
    public static ModelRoles Decide(IReadOnlyList<IoDescription> inputs, IReadOnlyList<IoDescription> outputs,
                                    IReadOnlyDictionary<string, RoleOverride>? overrides, string source)
    {
        overrides ??= new Dictionary<string, RoleOverride>();
        foreach (var name in overrides.Keys)
            if (inputs.All(i => i.Name != name))
                throw new ArgumentException($"{source}: --input-role names '{name}', which is not an input of the model (inputs: {string.Join(", ", inputs.Select(i => i.Name))})");
        var decidedInputs = new List<SignatureEntry>();
        var unknown = new List<IoDescription>();
        foreach (var io in inputs)
        {
            if (overrides.TryGetValue(io.Name, out var o)) decidedInputs.Add(Checked(io, InputRules.First(r => r.Role == o.Role), o.Role, o.Layer, source));
            else if (Match(InputRules, io, source) is { } e) decidedInputs.Add(e);
            else unknown.Add(io);
        }
        // an export that calls its token ids something else: the one integer [batch, tokens] input nobody claimed
        if (decidedInputs.All(e => e.Role != IoRole.InputIds) && unknown.Count(IsTokenLike) == 1)
        {
            var ids = unknown.First(IsTokenLike);
            unknown.Remove(ids);
            decidedInputs.Add(new SignatureEntry(ids.Name, IoRole.InputIds, null, ids.ElemType, ids.Dims));
        }
        if (unknown.Count > 0)
        {
            var u = unknown[0];
            throw new ArgumentException($"{source}: cannot tell what input '{u.Name}' ({Show(u)}) is for; map it with --input-role {u.Name}=ROLE " +
                $"(ROLE: {string.Join(", ", IoRoles.InputRoles.Select(r => r.Name()))}; past roles take the layer, e.g. past_key:0)");
        }
        foreach (var role in new[] { IoRole.InputIds, IoRole.AttentionMask, IoRole.PositionIds, IoRole.TokenTypeIds, IoRole.CachePosition, IoRole.AdapterIndex })
        {
            var same = decidedInputs.Where(e => e.Role == role).ToList();
            if (same.Count > 1) throw new ArgumentException($"{source}: inputs {string.Join(" and ", same.Select(e => $"'{e.Name}'"))} both have role {role.Name()}; give one another with --input-role");
        }
        if (decidedInputs.All(e => e.Role != IoRole.InputIds))
            throw new ArgumentException($"{source}: no token-ids input (expected 'input_ids' [batch, tokens]; inputs: {string.Join(", ", inputs.Select(i => i.Name))}); map one with --input-role NAME=input_ids");
        CheckPastPairs(decidedInputs, source);

        var decidedOutputs = outputs.Select(io => Match(OutputRules, io, source) ?? new SignatureEntry(io.Name, IoRole.Other, null, io.ElemType, io.Dims)).ToList();
        if (decidedOutputs.All(e => e.Role != IoRole.Logits))
        {
            // an export whose logits output has another name: the first float output of rank 2 or 3
            int i = decidedOutputs.FindIndex(e => e.Role == IoRole.Other && IsFloat(e.ElemType) && e.Dims?.Count is 2 or 3);
            if (i < 0) throw new ArgumentException($"{source}: no logits output (expected 'logits' [batch, tokens, vocab]; outputs: {string.Join(", ", outputs.Select(o => o.Name))})");
            decidedOutputs[i] = decidedOutputs[i] with { Role = IoRole.Logits };
        }
        return new ModelRoles(decidedInputs, decidedOutputs);
    }

    /// <summary>Overrides read from a model's metadata_props (written by <see cref="WriteMetadata"/>).</summary>
    public static Dictionary<string, RoleOverride> FromMetadata(IEnumerable<KeyValuePair<string, string>> metadata, string? source = null)
    {
        var result = new Dictionary<string, RoleOverride>(StringComparer.Ordinal);
        var json = metadata.FirstOrDefault(kv => kv.Key == MetadataKey).Value;
        if (json is null) return result;
        Dictionary<string, string>? map;
        try { map = JsonSerializer.Deserialize<Dictionary<string, string>>(json); }
        catch (JsonException e) { throw new InvalidDataException($"{source}: metadata '{MetadataKey}' is not a JSON object of name → role ({e.Message})", e); }
        foreach (var (name, role) in map ?? [])
        {
            var kv = RoleOverride.Parse($"{name}={role}");
            result[kv.Key] = kv.Value;
        }
        return result;
    }

    /// <summary>Records <paramref name="overrides"/> in <paramref name="model"/>'s metadata (replacing earlier ones); nothing when empty.</summary>
    public static void WriteMetadata(ModelProto model, IReadOnlyDictionary<string, RoleOverride> overrides)
    {
        ArgumentNullException.ThrowIfNull(model);
        var old = model.MetadataProps.Where(p => p.Key == MetadataKey).ToList();
        foreach (var p in old) model.MetadataProps.Remove(p);
        if (overrides.Count == 0) return;
        var json = JsonSerializer.Serialize(overrides.OrderBy(kv => kv.Key, StringComparer.Ordinal).ToDictionary(kv => kv.Key, kv => kv.Value.ToString()));
        model.MetadataProps.Add(new StringStringEntryProto { Key = MetadataKey, Value = json });
    }

    /// <summary><paramref name="first"/> with <paramref name="then"/>'s entries on top.</summary>
    public static IReadOnlyDictionary<string, RoleOverride> Merge(IReadOnlyDictionary<string, RoleOverride> first, IReadOnlyDictionary<string, RoleOverride>? then)
    {
        var d = new Dictionary<string, RoleOverride>(first, StringComparer.Ordinal);
        foreach (var (k, v) in then ?? new Dictionary<string, RoleOverride>()) d[k] = v;
        return d;
    }

    /// <summary>
    /// The zero-length cache tensor's shape for a past input: its dims with batch = <paramref name="batch"/> and the past
    /// length = 0; heads and head size must be numbers in the graph (they are in Optimum's and torch's exports).
    /// </summary>
    public static long[] EmptyPastShape(SignatureEntry past, long batch)
    {
        if (!past.Role.IsPast()) throw new ArgumentException($"'{past.Name}' is {past.Role.Name()}, not a past input");
        var dims = past.Dims ?? throw new InvalidDataException($"input '{past.Name}' has no declared shape; its heads and head size are needed for an empty cache");
        int rank = dims.Count;                       // [(2,) batch, heads, past, head_dim]
        var shape = new long[rank];
        for (int i = 0; i < rank; i++)
        {
            if (i == rank - 4) shape[i] = batch;
            else if (i == rank - 2) shape[i] = 0;
            else shape[i] = dims[i].Value ?? (rank == 5 && i == 0 ? 2
                : throw new InvalidDataException($"input '{past.Name}' {Show(dims)}: dim {i} is symbolic ('{dims[i].Param}'); an empty cache needs the number of heads and the head size in the graph"));
        }
        return shape;
    }

    static SignatureEntry? Match(Rule[] rules, IoDescription io, string source)
    {
        foreach (var rule in rules)
        {
            var m = rule.Name.Match(io.Name);
            if (!m.Success) continue;
            int? layer = m.Groups.Count > 1 ? int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture) : null;
            return Checked(io, rule, rule.Role, layer, source);
        }
        return null;
    }

    static SignatureEntry Checked(IoDescription io, Rule rule, IoRole role, int? layer, string source)
    {
        bool typeOk = rule.Type switch
        {
            Kind.Integer => io.ElemType is DataType.Int64 or DataType.Int32,
            Kind.Mask => io.ElemType is DataType.Int64 or DataType.Int32 or DataType.Float or DataType.Bool,
            _ => IsFloat(io.ElemType),
        };
        if (!typeOk)
            throw new ArgumentException($"{source}: '{io.Name}' looks like {role.Name()} but is {io.ElemType.ToString().ToLowerInvariant()}; {role.Name()} is {TypeText(rule.Type)} {rule.Shape}");
        if (io.Dims is { } d && !rule.Ranks.Contains(d.Count))
            throw new ArgumentException($"{source}: '{io.Name}' looks like {role.Name()} but has shape {Show(d)}; {role.Name()} is {rule.Shape}");
        return new SignatureEntry(io.Name, role, layer, io.ElemType, io.Dims);
    }

    static void CheckPastPairs(List<SignatureEntry> inputs, string source)
    {
        foreach (var layer in inputs.Where(e => e.Role.IsPast()).GroupBy(e => e.Layer))
        {
            var roles = layer.Select(e => e.Role).Order().ToList();
            bool ok = roles.SequenceEqual([IoRole.PastKey, IoRole.PastValue]) || roles.SequenceEqual([IoRole.PastKeyValue]);
            if (!ok) throw new ArgumentException($"{source}: layer {layer.Key} has cache inputs {string.Join(", ", layer.Select(e => $"'{e.Name}' ({e.Role.Name()})"))}; expected one past_key and one past_value, or one past_key_value");
        }
    }

    static bool IsTokenLike(IoDescription io) => io.ElemType is DataType.Int64 or DataType.Int32 && io.Dims?.Count == 2;

    static bool IsFloat(DataType t) => t is DataType.Float or DataType.Float16 or DataType.Bfloat16 or DataType.Double;

    static string TypeText(Kind k) => k switch { Kind.Integer => "int64/int32", Kind.Mask => "int64/int32/float/bool", _ => "floating-point" };

    static string Show(IoDescription io) => $"{io.ElemType.ToString().ToLowerInvariant()} {(io.Dims is null ? "[?]" : Show(io.Dims))}";

    static string Show(IReadOnlyList<Dim> dims) => "[" + string.Join(", ", dims.Select(d => d.ToString())) + "]";
}
