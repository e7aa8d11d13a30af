using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Http;

namespace OnnxLora.Serving;

/// <summary>
/// A request the server refuses, answered with OpenAI's error body
/// <c>{"error":{"message","type","param","code"}}</c> and <see cref="Status"/>. Thrown by the routes, written by the one
/// failure gate (<see cref="LoraServer"/>'s middleware).
/// </summary>
public sealed class ApiException(int status, string message, string? param = null, string? code = null, string? type = null) : Exception(message)
{
    public int Status { get; } = status;

    /// <summary>The request field at fault (OpenAI's <c>param</c>), or null.</summary>
    public string? Param { get; } = param;

    public string? Code { get; } = code;

    /// <summary>OpenAI's error type: invalid_request_error for 4xx by default.</summary>
    public string Type { get; } = type ?? DefaultType(status);

    /// <summary>400 naming the field.</summary>
    public static ApiException BadField(string field, string message) => new(StatusCodes.Status400BadRequest, $"{field}: {message}", field, "invalid_value");

    /// <summary>404 for a model id that is neither the base model nor a loaded adapter.</summary>
    public static ApiException UnknownModel(string model, IEnumerable<string> known, string field = "model") =>
        new(StatusCodes.Status404NotFound, $"The model '{model}' does not exist (served: {string.Join(", ", known)})", field, "model_not_found");

    static string DefaultType(int status) => status switch
    {
        StatusCodes.Status401Unauthorized => "authentication_error",
        StatusCodes.Status403Forbidden => "permission_error",
        StatusCodes.Status404NotFound => "not_found_error",
        StatusCodes.Status429TooManyRequests => "rate_limit_error",
        StatusCodes.Status504GatewayTimeout => "timeout_error",
        >= 500 => "server_error",
        _ => "invalid_request_error",
    };

    /// <summary>The error body OpenAI's clients parse.</summary>
    public JsonObject Body() => ErrorBody(Message, Type, Param, Code);

    internal static JsonObject ErrorBody(string message, string type, string? param, string? code) => new()
    {
        ["error"] = new JsonObject { ["message"] = message, ["type"] = type, ["param"] = param, ["code"] = code },
    };
}
