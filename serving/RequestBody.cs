using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Http;

namespace OnnxLora.Serving;

/// <summary>
/// A request's JSON body with typed, checked field reads: a missing or mistyped field is a 400 naming it. Fields the
/// server does not know are ignored (clients send their own defaults); fields it knows but does not implement are
/// refused when set to anything but their no-op value (<see cref="Unsupported"/>).
/// </summary>
sealed class RequestBody(JsonObject json)
{
    public JsonObject Json { get; } = json;

    /// <summary>Reads the body (bounded by Kestrel's body-size limit, which answers 413) as a JSON object.</summary>
    public static async Task<RequestBody> ReadAsync(HttpRequest request, CancellationToken ct)
    {
        JsonNode? node;
        try { node = await JsonNode.ParseAsync(request.Body, cancellationToken: ct).ConfigureAwait(false); }
        catch (JsonException e) { throw new ApiException(StatusCodes.Status400BadRequest, $"the body is not valid JSON: {e.Message}", code: "invalid_json"); }
        return node is JsonObject o ? new RequestBody(o) : throw new ApiException(StatusCodes.Status400BadRequest, "the body must be a JSON object", code: "invalid_json");
    }

    public bool Has(string field) => Json[field] is not null;

    public string RequiredString(string field) =>
        String(field) is { } s && !string.IsNullOrWhiteSpace(s) ? s : throw ApiException.BadField(field, "is required (a non-empty string)");

    public string? String(string field) => Json[field] switch
    {
        null => null,
        JsonValue v when v.TryGetValue<string>(out var s) => s,
        _ => throw ApiException.BadField(field, "must be a string"),
    };

    public int? Int(string field, int min, int max)
    {
        if (Json[field] is null) return null;
        if (Json[field] is not JsonValue v || !v.TryGetValue<double>(out var d) || d != Math.Floor(d))
            throw ApiException.BadField(field, "must be an integer");
        if (d < min || d > max) throw ApiException.BadField(field, $"must be in {min}..{max} (got {d})");
        return (int)d;
    }

    public double? Number(string field, double min, double max)
    {
        if (Json[field] is null) return null;
        if (Json[field] is not JsonValue v || !v.TryGetValue<double>(out var d) || !double.IsFinite(d)) throw ApiException.BadField(field, "must be a number");
        if (d < min || d > max) throw ApiException.BadField(field, $"must be in [{min}, {max}] (got {d})");
        return d;
    }

    public bool Bool(string field) => Json[field] switch
    {
        null => false,
        JsonValue v when v.TryGetValue<bool>(out var b) => b,
        _ => throw ApiException.BadField(field, "must be true or false"),
    };

    /// <summary><c>stop</c>: a string or up to <paramref name="max"/> strings, none empty.</summary>
    public IReadOnlyList<string> Strings(string field, int max, int maxLength = int.MaxValue)
    {
        var node = Json[field];
        if (node is null) return [];
        if (node is JsonValue) return [String(field) is { Length: > 0 } one ? Checked(one, field) : throw ApiException.BadField(field, "must not be empty")];
        if (node is not JsonArray list || list.Count > max) throw ApiException.BadField(field, $"must be a string or a list of at most {max} strings");
        return list.Select((s, i) => s is JsonValue v && v.TryGetValue<string>(out var text) && text.Length > 0 ? Checked(text, $"{field}[{i}]")
            : throw ApiException.BadField($"{field}[{i}]", "must be a non-empty string")).ToList();

        string Checked(string text, string name) =>
            text.Length <= maxLength ? text : throw ApiException.BadField(name, $"has {text.Length} characters; the limit is {maxLength}");
    }

    /// <summary>Refuses a field the server does not implement unless it holds its no-op value (null, false, 0, 1, empty).</summary>
    public void Unsupported(params string[] fields)
    {
        foreach (var field in fields)
        {
            bool noOp = Json[field] switch
            {
                null => true,
                JsonValue v when v.TryGetValue<bool>(out var b) => !b,
                JsonValue v when v.TryGetValue<double>(out var d) => d == 0 || (field is "best_of" && d == 1),
                JsonObject o => o.Count == 0 || (field == "response_format" && (string?)o["type"] == "text"),
                JsonArray a => a.Count == 0,
                _ => false,
            };
            if (!noOp) throw ApiException.BadField(field, "is not supported by this server");
        }
    }
}
