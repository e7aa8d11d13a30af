using System.Diagnostics;
using System.Net;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Deployment.Chat;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Serving;

/// <summary>
/// <c>onnxlora serve</c>: an OpenAI-compatible HTTP server (ASP.NET Core minimal APIs on Kestrel) over one deployable
/// model and its LoRA adapters, as vLLM serves them: an adapter's name is a model id, chosen per request.
/// Routes: <c>GET /v1/models</c>, <c>POST /v1/completions</c>, <c>POST /v1/chat/completions</c>,
/// <c>POST /v1/classify</c>, <c>POST /v1/load_lora_adapter</c>, <c>POST /v1/unload_lora_adapter</c>,
/// <c>GET /health</c>, <c>GET /metrics</c>. Generation goes through one <see cref="GenerationScheduler"/>.
/// </summary>
/// <remarks>
/// Ownership: the server owns the host, the classifiers and the scheduler it is given or makes, and releases them in
/// <see cref="DisposeAsync"/> after Kestrel has stopped (so no request still runs on them).
/// </remarks>
public sealed partial class LoraServer : IAsyncDisposable
{
    readonly AdapterHost _host;
    readonly TextGenerator _generator;
    readonly GenerationScheduler _scheduler;
    readonly TextTokenizer _tokenizer;
    readonly ChatTemplate? _chatTemplate;
    readonly (IReadOnlyList<int> TokenIds, string? Text) _chatEnd;   // where a chat answer ends besides end-of-text
    readonly IReadOnlyDictionary<string, ServedClassifier> _classifiers;
    readonly LoraManifest? _manifest;          // maps PEFT adapters loaded at run time
    readonly AdapterRoot? _adapterRoot;
    readonly ServerOptions _options;
    readonly int? _vocabulary;
    readonly long _started = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
    readonly WebApplication _app;
    readonly SemaphoreSlim _adapterChanges = new(1);   // one load or unload at a time, so a name check and its change agree
    readonly SemaphoreSlim _classifyRuns = new(1);     // classification runs one at a time (each uses every intra-op thread)

    /// <param name="host">the deployable model with its start-up adapters loaded (owned from now on)</param>
    /// <param name="tokenizer">the model's tokenizer</param>
    /// <param name="options">address and limits</param>
    /// <param name="chatTemplate">the model's chat template; null = /v1/chat/completions answers 400</param>
    /// <param name="classifiers">classifiers for /v1/classify (owned from now on)</param>
    public LoraServer(AdapterHost host, TextTokenizer tokenizer, ServerOptions? options = null, ChatTemplate? chatTemplate = null,
                      IReadOnlyList<ServedClassifier>? classifiers = null)
    {
        ArgumentNullException.ThrowIfNull(host);
        ArgumentNullException.ThrowIfNull(tokenizer);
        _options = options ?? new ServerOptions();
        _host = host;
        _tokenizer = tokenizer;
        _chatTemplate = chatTemplate;
        _chatEnd = chatTemplate?.EndOfAnswer(tokenizer.Inner, _options.ChatStopTokenIds) ?? ([], null);
        _generator = new TextGenerator(host, tokenizer.Inner);
        _scheduler = new GenerationScheduler(_generator, _options.Scheduler);
        _adapterRoot = _options.AdapterRoot is null ? null : new AdapterRoot(_options.AdapterRoot);
        var manifestPath = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(host.ModelPath))!, RunLayout.LoraConfig);
        _manifest = File.Exists(manifestPath) ? LoraManifest.Load(manifestPath) : null;
        var logits = host.Outputs.TryGetValue("logits", out var l) ? l : host.Outputs.Values.First();
        _vocabulary = logits.Dimensions.Length == 3 && logits.Dimensions[^1] > 0 ? logits.Dimensions[^1] : null;
        ContextLength = _options.ContextLength ?? RecordedContext(host);
        BaseModel = _options.ServedModelName ?? DefaultName(host.ModelPath);
        _classifiers = (classifiers ?? []).ToDictionary(c => c.Name, StringComparer.Ordinal);
        foreach (var name in _classifiers.Keys.Concat(host.AdapterNames))
            if (name == BaseModel) throw new ArgumentException($"'{name}' names both the base model and an adapter or classifier; give --served-model-name another name");
        var clash = _classifiers.Keys.Intersect(host.AdapterNames).FirstOrDefault();
        if (clash is not null) throw new ArgumentException($"'{clash}' names both an adapter and a classifier");
        _app = Build();
    }

    /// <summary>The base model's id.</summary>
    public string BaseModel { get; }

    public ServerMetrics Metrics { get; } = new();

    /// <summary>Most tokens a request may span, prompt and completion; null = unchecked.</summary>
    public int? ContextLength { get; }

    /// <summary>The address the server listens on (the real port when <see cref="ServerOptions.Port"/> was 0); set by <see cref="StartAsync"/>.</summary>
    public Uri? Address { get; private set; }

    /// <summary>The scheduler requests generate through.</summary>
    public GenerationScheduler Scheduler => _scheduler;

    // "deploy.onnx" in a rewrite or run folder says nothing: the folder's name does
    static string DefaultName(string modelPath)
    {
        var full = Path.GetFullPath(modelPath);
        return Path.GetFileName(full) == RunLayout.DeployableModel ? Path.GetFileName(Path.GetDirectoryName(full)!) : Path.GetFileNameWithoutExtension(full);
    }

    // the builders' config in the model's metadata (kept by rewrites): GPT-2's position table, Llama's max positions
    static int? RecordedContext(AdapterHost host)
    {
        foreach (var (key, field) in new[] { (GptBuilder.ConfigMetadataKey, "n_positions"), (LlamaBuilder.ConfigMetadataKey, "max_position_embeddings") })
        {
            if (!host.ModelMetadata.TryGetValue(key, out var json)) continue;
            try { if (JsonNode.Parse(json)?[field] is JsonValue v && v.TryGetValue<int>(out var n) && n > 0) return n; }
            catch (JsonException) { }   // unreadable metadata: no recorded context
        }
        return null;
    }

    WebApplication Build()
    {
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { ContentRootPath = AppContext.BaseDirectory });
        builder.Logging.ClearProviders();   // the gate reports server errors on stderr; a request log is the proxy's job
        builder.WebHost.UseKestrel(k =>
        {
            k.Limits.MaxRequestBodySize = _options.MaxBodyBytes;
            k.AddServerHeader = false;
            if (_options.Host == "localhost") k.ListenLocalhost(_options.Port);
            else if (IPAddress.TryParse(_options.Host, out var ip)) k.Listen(ip, _options.Port);
            else throw new ArgumentException($"--host '{_options.Host}' is not an IP address or localhost");
        });
        var app = builder.Build();
        app.Use(Gate);
        app.MapGet("/health", () => Results.Text("", "text/plain"));
        app.MapGet("/metrics", RenderMetrics);
        app.MapGet("/v1/models", Models);
        app.MapPost("/v1/completions", (HttpContext ctx) => Generate(ctx, chat: false));
        app.MapPost("/v1/chat/completions", (HttpContext ctx) => Generate(ctx, chat: true));
        app.MapPost("/v1/classify", Classify);
        app.MapPost("/v1/load_lora_adapter", LoadAdapter);
        app.MapPost("/v1/unload_lora_adapter", UnloadAdapter);
        app.MapFallback((HttpContext ctx) => throw new ApiException(StatusCodes.Status404NotFound, $"no route {ctx.Request.Method} {ctx.Request.Path}", code: "unknown_route"));
        return app;
    }

    /// <summary>Binds the address and starts answering; <see cref="Address"/> then holds the bound address.</summary>
    public async Task StartAsync(CancellationToken cancellationToken = default)
    {
        await _app.StartAsync(cancellationToken).ConfigureAwait(false);
        var addresses = _app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses;
        Address = new Uri(addresses.First());
    }

    /// <summary>Waits until <paramref name="cancellationToken"/> fires or the host shuts down.</summary>
    public Task WaitForShutdownAsync(CancellationToken cancellationToken) => _app.WaitForShutdownAsync(cancellationToken);

    /// <summary>Stops Kestrel (requests in flight are cancelled), then releases the scheduler, the host and the classifiers.</summary>
    public async ValueTask DisposeAsync()
    {
        try { await _app.StopAsync(CancellationToken.None).ConfigureAwait(false); }
        catch (InvalidOperationException) { }   // never started
        await _app.DisposeAsync().ConfigureAwait(false);
        await _scheduler.DisposeAsync().ConfigureAwait(false);
        _host.Dispose();
        foreach (var c in _classifiers.Values) c.Dispose();
        _adapterChanges.Dispose();
        _classifyRuns.Dispose();
    }

    /// <summary>
    /// The one failure gate: every refusal becomes OpenAI's error body with its status, a client that went away is
    /// counted as 499 (nginx's "client closed request"), and every request is counted and timed by route.
    /// </summary>
    async Task Gate(HttpContext ctx, RequestDelegate next)
    {
        var clock = Stopwatch.StartNew();
        int? status = null;   // what the metrics count when it is not the response's status (a stream that failed after its 200)
        try { await next(ctx).ConfigureAwait(false); }
        catch (Exception e) when (ctx.RequestAborted.IsCancellationRequested && e is OperationCanceledException or IOException or BadHttpRequestException)
        {
            status = 499;
        }
        catch (Exception e)
        {
            var error = e switch
            {
                ApiException api => api,
                BadHttpRequestException { StatusCode: StatusCodes.Status413PayloadTooLarge } => new ApiException(StatusCodes.Status413PayloadTooLarge,
                    $"the request body is larger than the server's limit ({_options.MaxBodyBytes:N0} bytes)", code: "body_too_large"),
                BadHttpRequestException bad => new ApiException(bad.StatusCode, bad.Message),
                QueueFullException full => new ApiException(StatusCodes.Status429TooManyRequests, full.Message, code: "queue_full"),
                KeyNotFoundException gone => new ApiException(StatusCodes.Status404NotFound, gone.Message, "model", "model_not_found"),   // an adapter unloaded meanwhile
                OperationCanceledException => new ApiException(StatusCodes.Status504GatewayTimeout,
                    $"the request ran past the server's time limit ({_options.RequestTimeout.TotalSeconds:0.#} s)", code: "timeout"),
                _ => null,
            };
            if (error is null) Console.Error.WriteLine($"error: {ctx.Request.Method} {ctx.Request.Path}: {e}");
            error ??= new ApiException(StatusCodes.Status500InternalServerError, $"internal error: {e.Message}");
            status = error.Status;
            if (ctx.Response.HasStarted) await StreamError(ctx, error).ConfigureAwait(false);
            else await WriteError(ctx, error).ConfigureAwait(false);
        }
        finally
        {
            // the fallback's catch-all pattern would put every unknown path in one label anyway: call it that
            var route = (ctx.GetEndpoint() as RouteEndpoint)?.RoutePattern.RawText is { } raw && !raw.StartsWith("{*", StringComparison.Ordinal) ? raw : "other";
            Metrics.Request(route, status ?? ctx.Response.StatusCode, clock.Elapsed.TotalSeconds);
        }
    }

    static async Task WriteError(HttpContext ctx, ApiException error)
    {
        ctx.Response.StatusCode = error.Status;
        if (error.Status == StatusCodes.Status429TooManyRequests) ctx.Response.Headers.RetryAfter = "1";
        await WriteJson(ctx, error.Body()).ConfigureAwait(false);
    }

    // a stream that already sent 200 ends with OpenAI's error event instead of [DONE]
    static async Task StreamError(HttpContext ctx, ApiException error)
    {
        try { await ctx.Response.WriteAsync($"data: {error.Body().ToJsonString(Json)}\n\n", CancellationToken.None).ConfigureAwait(false); }
        catch (IOException) { }   // the client is gone
    }

    /// <summary>JSON as OpenAI writes it: text stays readable (no \uXXXX for quotes or non-ASCII); never embedded in HTML.</summary>
    internal static readonly JsonSerializerOptions Json = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    internal static Task WriteJson(HttpContext ctx, JsonNode body)
    {
        ctx.Response.ContentType = "application/json";
        return ctx.Response.WriteAsync(body.ToJsonString(Json), ctx.RequestAborted);
    }

    Task RenderMetrics(HttpContext ctx)
    {
        ctx.Response.ContentType = "text/plain; version=0.0.4; charset=utf-8";
        return ctx.Response.WriteAsync(Metrics.Render(
        [
            ("onnxlora_queue_depth", "Generation requests waiting for a slot.", _scheduler.QueueDepth),
            ("onnxlora_requests_running", "Generation requests being decoded.", _scheduler.Running),
            ("onnxlora_adapters_loaded", "LoRA adapters loaded for generation.", _host.AdapterNames.Count),
        ]), ctx.RequestAborted);
    }

    /// <summary>vLLM's list: the base model, then every adapter (parent = the base), then the classifiers.</summary>
    Task Models(HttpContext ctx)
    {
        var data = new JsonArray(Model(BaseModel, null));
        foreach (var name in _host.AdapterNames) data.Add(Model(name, BaseModel));
        foreach (var c in _classifiers.Values.OrderBy(c => c.Name, StringComparer.Ordinal)) data.Add(Model(c.Name, null));
        return WriteJson(ctx, new JsonObject { ["object"] = "list", ["data"] = data });

        // root is the id, not a file path: clients learn nothing about the server's disk
        JsonObject Model(string id, string? parent) => new()
        {
            ["id"] = id, ["object"] = "model", ["created"] = _started, ["owned_by"] = "onnxlora", ["root"] = id, ["parent"] = parent,
        };
    }

    /// <summary>The adapter a model id selects (null = the base model); 404 for an id that is neither.</summary>
    string? AdapterFor(string model)
    {
        if (model == BaseModel) return null;
        var adapters = _host.AdapterNames;
        if (adapters.Contains(model, StringComparer.Ordinal)) return model;
        throw ApiException.UnknownModel(model, [BaseModel, .. adapters]);
    }

    /// <summary>vLLM's <c>{"lora_name", "lora_path"}</c>: reads only under <see cref="ServerOptions.AdapterRoot"/>.</summary>
    async Task LoadAdapter(HttpContext ctx)
    {
        var body = await RequestBody.ReadAsync(ctx.Request, ctx.RequestAborted).ConfigureAwait(false);
        var name = body.RequiredString("lora_name");
        var requested = body.RequiredString("lora_path");
        var root = _adapterRoot ?? throw new ApiException(StatusCodes.Status403Forbidden,
            "loading adapters at run time is off; start the server with --adapter-root DIR to allow loading from DIR", "lora_path", "loading_disabled");
        var path = root.Resolve(requested);
        if (name == BaseModel || _classifiers.ContainsKey(name)) throw ApiException.BadField("lora_name", $"'{name}' is the name of a served model");
        await _adapterChanges.WaitAsync(ctx.RequestAborted).ConfigureAwait(false);
        try
        {
            if (_host.AdapterNames.Contains(name, StringComparer.Ordinal))
                throw ApiException.BadField("lora_name", $"the adapter '{name}' is already loaded; unload it first");
            byte[] bytes;
            try { bytes = AdapterFiles.DeployableBytes(path, _manifest); }
            catch (Exception e) when (e is InvalidDataException or ArgumentException or IOException or FormatException)
            {
                throw ApiException.BadField("lora_path", e.Message.Replace(root.FullPath, "<adapter-root>", StringComparison.Ordinal));
            }
            catch (UnauthorizedAccessException)
            {
                throw new ApiException(StatusCodes.Status403Forbidden, $"'{requested}' is under the adapter root but the server may not read it", "lora_path", "forbidden");
            }
            try { _host.AddAdapter(name, bytes, requested); }
            catch (InvalidDataException e) { throw ApiException.BadField("lora_path", e.Message); }
        }
        finally { _adapterChanges.Release(); }
        ctx.Response.ContentType = "text/plain";
        await ctx.Response.WriteAsync($"Success: LoRA adapter '{name}' added successfully.", ctx.RequestAborted).ConfigureAwait(false);
    }

    /// <summary>vLLM's <c>{"lora_name"}</c>; requests already running with the adapter finish with it.</summary>
    async Task UnloadAdapter(HttpContext ctx)
    {
        var body = await RequestBody.ReadAsync(ctx.Request, ctx.RequestAborted).ConfigureAwait(false);
        var name = body.RequiredString("lora_name");
        await _adapterChanges.WaitAsync(ctx.RequestAborted).ConfigureAwait(false);
        try
        {
            if (!_host.RemoveAdapter(name))
                throw new ApiException(StatusCodes.Status404NotFound, $"The lora adapter '{name}' cannot be found.", "lora_name", "adapter_not_found");
        }
        finally { _adapterChanges.Release(); }
        ctx.Response.ContentType = "text/plain";
        await ctx.Response.WriteAsync($"Success: LoRA adapter '{name}' removed successfully.", ctx.RequestAborted).ConfigureAwait(false);
    }

    /// <summary>vLLM's <c>/classify</c>: <c>{"model", "input": text | [texts]}</c> → <c>data[{index, label, probs, num_classes}]</c>.</summary>
    async Task Classify(HttpContext ctx)
    {
        var body = await RequestBody.ReadAsync(ctx.Request, ctx.RequestAborted).ConfigureAwait(false);
        var model = body.RequiredString("model");
        if (!_classifiers.TryGetValue(model, out var classifier))
            throw ApiException.UnknownModel(model, _classifiers.Keys.Order(StringComparer.Ordinal).DefaultIfEmpty("no classifiers: start the server with --classifier NAME=RUN_DIR"));
        var inputs = body.Strings("input", _options.MaxChoices * 4);
        if (inputs.Count == 0) throw ApiException.BadField("input", "is required (a string or a list of strings)");
        var rows = inputs.Select((text, i) =>
        {
            var ids = classifier.Tokenizer.Encode(text);
            if (ids.Length == 0) throw ApiException.BadField($"input[{i}]", "has no tokens");
            if (ids.Length > _options.MaxPromptTokens) throw ApiException.BadField($"input[{i}]", $"has {ids.Length} tokens; the limit is {_options.MaxPromptTokens}");
            return (IReadOnlyList<int>)ids;
        }).ToList();
        // one classification run at a time, at most --max-batch rows each: memory stays bounded under concurrent requests
        var results = new List<ClassificationResult>(rows.Count);
        await _classifyRuns.WaitAsync(ctx.RequestAborted).ConfigureAwait(false);
        try
        {
            foreach (var chunk in rows.Chunk(_options.Scheduler.MaxBatch))
                results.AddRange(await Task.Run(() => classifier.Classifier.ClassifyBatch(chunk, classifier.Adapter), ctx.RequestAborted).ConfigureAwait(false));
        }
        catch (ArgumentException e) { throw ApiException.BadField("input", e.Message); }   // longer than a fixed-width model takes
        finally { _classifyRuns.Release(); }
        var data = new JsonArray();
        for (int i = 0; i < results.Count; i++)
            data.Add(new JsonObject
            {
                ["index"] = i, ["label"] = results[i].LabelName,
                ["probs"] = new JsonArray(results[i].Probabilities.Select(p => (JsonNode)JsonValue.Create(p)).ToArray()),
                ["num_classes"] = results[i].Probabilities.Count,
            });
        int tokens = rows.Sum(r => r.Count);
        await WriteJson(ctx, new JsonObject
        {
            ["id"] = "classify-" + Guid.NewGuid().ToString("N"), ["object"] = "list", ["created"] = DateTimeOffset.UtcNow.ToUnixTimeSeconds(),
            ["model"] = model, ["data"] = data,
            ["usage"] = new JsonObject { ["prompt_tokens"] = tokens, ["total_tokens"] = tokens, ["completion_tokens"] = 0 },
        }).ConfigureAwait(false);
    }
}
