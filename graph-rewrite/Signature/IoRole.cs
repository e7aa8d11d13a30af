using System.Text.Json;
using System.Text.Json.Serialization;

namespace OnnxLora.GraphRewrite.Signature;

/// <summary>
/// What a model input or output is for: the one vocabulary shared by the role decision (<see cref="SignatureRoles"/>),
/// artifacts.json, the training session and every deployment reader. Written in JSON and on the command line in
/// snake_case (<c>past_key</c>, <c>attention_mask</c>).
/// </summary>
[JsonConverter(typeof(IoRoleJsonConverter))]
public enum IoRole
{
    // ── a decoder's inputs (Optimum's signature) ──
    /// <summary>Token ids [batch, tokens], int64 or int32.</summary>
    InputIds,
    /// <summary>1 on real tokens, 0 on padding: [batch, past + tokens].</summary>
    AttentionMask,
    /// <summary>Position of each token [batch, tokens]: real tokens count 0..len−1.</summary>
    PositionIds,
    /// <summary>Segment ids [batch, tokens]; fed as zeros.</summary>
    TokenTypeIds,
    /// <summary>Cached keys of one layer [batch, kv_heads, past, head_dim] (past_key_values.{i}.key).</summary>
    PastKey,
    /// <summary>Cached values of one layer [batch, kv_heads, past, head_dim] (past_key_values.{i}.value).</summary>
    PastValue,
    /// <summary>Keys and values of one layer stacked [2, batch, heads, past, head_dim] (older past_key_values.{i}, past.{i}).</summary>
    PastKeyValue,
    /// <summary>Absolute positions of the new tokens [tokens] (past .. past + tokens − 1).</summary>
    CachePosition,
    /// <summary>Each row's adapter slot [batch] (int64) in a mixed-adapter model (BuildMixedDeployable); 0 = the base model. Decided by its name only (not an --input-role).</summary>
    AdapterIndex,

    // ── a decoder's outputs ──
    /// <summary>[batch, tokens, vocab] (or [batch, classes] for a classifier).</summary>
    Logits,
    /// <summary>present.{i}.key: the cache after this step.</summary>
    PresentKey,
    /// <summary>present.{i}.value.</summary>
    PresentValue,
    /// <summary>present.{i}: keys and values stacked (older exports).</summary>
    PresentKeyValue,
    /// <summary>An output nobody reads (hidden states, attentions). Never an input's role.</summary>
    Other,

    // ── training artifacts (graph-rewrite/Artifacts/README.md) ──
    Labels,
    Lengths,
    DropoutTrainingMode,
    Param,
    GradIn,
    ResetGrad,
    Loss,
    Grad,
    UpdatedParam,
    Moment,
    UpdatedMoment,
    LearningRate,
    Step,
    WeightDecay,
    GradScale,
    MaxGradNorm,
    GradNorm,
}

/// <summary>The one JSON form of <see cref="IoRole"/>: snake_case names, no numbers.</summary>
public sealed class IoRoleJsonConverter() : JsonStringEnumConverter<IoRole>(JsonNamingPolicy.SnakeCaseLower, allowIntegerValues: false);

/// <summary>Names of <see cref="IoRole"/> as users write them.</summary>
public static class IoRoles
{
    /// <summary>The snake_case name (<c>past_key</c>).</summary>
    public static string Name(this IoRole role) => JsonNamingPolicy.SnakeCaseLower.ConvertName(role.ToString());

    /// <summary>The roles a user may give an input with <c>--input-role</c>.</summary>
    public static IReadOnlyList<IoRole> InputRoles { get; } =
        [IoRole.InputIds, IoRole.AttentionMask, IoRole.PositionIds, IoRole.TokenTypeIds, IoRole.PastKey, IoRole.PastValue, IoRole.PastKeyValue, IoRole.CachePosition];

    public static bool IsPast(this IoRole role) => role is IoRole.PastKey or IoRole.PastValue or IoRole.PastKeyValue;

    public static bool IsPresent(this IoRole role) => role is IoRole.PresentKey or IoRole.PresentValue or IoRole.PresentKeyValue;

    /// <summary>Parses an input role name; the error lists the valid ones.</summary>
    public static IoRole ParseInputRole(string text, string what)
    {
        foreach (var r in InputRoles)
            if (string.Equals(r.Name(), text, StringComparison.OrdinalIgnoreCase)) return r;
        throw new ArgumentException($"{what}: '{text}' is not an input role (one of: {string.Join(", ", InputRoles.Select(r => r.Name()))})");
    }
}
