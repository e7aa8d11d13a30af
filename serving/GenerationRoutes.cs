using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using System.Threading.Channels;
using Microsoft.AspNetCore.Http;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Deployment.Chat;

namespace OnnxLora.Serving;

/// <summary><c>POST /v1/completions</c> and <c>POST /v1/chat/completions</c>: parse, generate through the scheduler, answer or stream.</summary>
public sealed partial class LoraServer
{
    // fields OpenAI defines that this server does not implement: refused unless they hold their no-op value
    static readonly string[] UnsupportedCompletionFields = ["logprobs", "echo", "best_of", "suffix", "presence_penalty", "frequency_penalty", "logit_bias"];
    static readonly string[] UnsupportedChatFields = ["logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "tools", "functions", "response_format"];

    /// <summary>OpenAI's default for the legacy completions route; chat defaults to the server's limit.</summary>
    const int DefaultCompletionTokens = 16;

    async Task Generate(HttpContext ctx, bool chat)
    {
        var clock = Stopwatch.StartNew();
        var body = await RequestBody.ReadAsync(ctx.Request, ctx.RequestAborted).ConfigureAwait(false);
        var model = body.RequiredString("model");
        var adapter = AdapterFor(model);
        body.Unsupported(chat ? UnsupportedChatFields : UnsupportedCompletionFields);
        var prompts = chat ? [ChatPrompt(body, model)] : Prompts(body);
        var options = Options(body, chat, prompts.Max(p => p.Count));
        int n = body.Int("n", 1, _options.MaxChoices) ?? 1;
        if (prompts.Count * n > _options.MaxChoices)
            throw ApiException.BadField("n", $"{prompts.Count} prompts × n = {n} asks for {prompts.Count * n} completions; the limit is {_options.MaxChoices}");
        bool stream = body.Bool("stream");
        bool includeUsage = stream && body.Json["stream_options"] is JsonObject so && so["include_usage"] is JsonValue v && v.TryGetValue<bool>(out var u) && u;
        // choice i·n + j is prompt i's j-th sample; a seed gives each choice its own stream (seed + j)
        var requests = prompts.SelectMany(p => Enumerable.Range(0, n).Select(j => new GenerationRequest(p,
            options.Sampling.Seed is int seed && j > 0 ? options with { Sampling = options.Sampling with { Seed = unchecked(seed + j) } } : options, adapter))).ToList();

        var reply = new Reply(ctx, chat, model, stream, requests.Count);
        // the client's connection and the time limit; disposed when the last choice has ended, which may be after the answer
        var cts = CancellationTokenSource.CreateLinkedTokenSource(ctx.RequestAborted);
        cts.CancelAfter(_options.RequestTimeout);
        var cancel = cts.Token;   // outlives cts: read after the last choice has ended and disposed it
        var events = Channel.CreateUnbounded<(int Choice, GeneratedToken Token)>(new UnboundedChannelOptions { SingleReader = true });
        var errors = new List<Exception>();
        var pumps = new List<Task>(requests.Count);
        try
        {
            for (int i = 0; i < requests.Count; i++) pumps.Add(Pump(_scheduler.Generate(requests[i], cancel), i));
        }
        catch (Exception e)
        {
            // the queue refused one, or the scheduler refused its prompt (ArgumentException: the request's, not the
            // server's fault): the others started must still run down (their enumeration frees their queue places)
            lock (errors) errors.Add(e is ArgumentException and not ArgumentNullException ? ApiException.BadField(chat ? "messages" : "prompt", e.Message) : e);
            await cts.CancelAsync().ConfigureAwait(false);
        }
        var finished = Task.WhenAll(pumps).ContinueWith(_ => { events.Writer.TryComplete(); cts.Dispose(); }, TaskScheduler.Default);
        bool first = true, drained = false;
        try
        {
            // reading stops at the time limit or the client's exit even while a step is still running: the answer (504,
            // or nothing for a client that left) does not wait for an engine that finishes its step later
            await foreach (var (choice, token) in events.Reader.ReadAllAsync(cancel).ConfigureAwait(false))
            {
                if (Failed()) continue;   // drain: a failed request answers with its error, not half its choices
                if (first && token.TokenId >= 0) { Metrics.FirstToken(model, clock.Elapsed.TotalSeconds); first = false; }
                await reply.Add(choice, token).ConfigureAwait(false);
            }
            drained = true;
        }
        catch (OperationCanceledException) when (!ctx.RequestAborted.IsCancellationRequested && Failed()) { }   // a choice failed or was refused: its error below
        finally
        {
            // a write that failed (the client went away) or a time-out leaves choices running: stop them
            if (!drained)
            {
                try { await cts.CancelAsync().ConfigureAwait(false); }
                catch (ObjectDisposedException) { }   // they had all ended
            }
        }
        if (drained) await finished.ConfigureAwait(false);
        if (Failed()) throw errors.FirstOrDefault(e => e is not OperationCanceledException) ?? errors[0];
        Metrics.Tokens(model, prompts.Sum(p => p.Count), reply.GeneratedTokens);
        await reply.Finish(prompts.Sum(p => p.Count), includeUsage).ConfigureAwait(false);

        bool Failed() { lock (errors) return errors.Count > 0; }

        async Task Pump(IAsyncEnumerable<GeneratedToken> tokens, int index)
        {
            try
            {
                await foreach (var token in tokens.WithCancellation(cancel).ConfigureAwait(false))
                    await events.Writer.WriteAsync((index, token), CancellationToken.None).ConfigureAwait(false);
            }
            catch (Exception e)
            {
                lock (errors) errors.Add(e);
                await cts.CancelAsync().ConfigureAwait(false);   // the request has failed: stop its other choices (cts lives until every pump ends)
            }
        }
    }

    /// <summary><c>prompt</c>: a string, a list of strings, a list of token ids, or a list of such lists.</summary>
    List<IReadOnlyList<int>> Prompts(RequestBody body)
    {
        var node = body.Json["prompt"] ?? throw ApiException.BadField("prompt", "is required");
        var prompts = new List<IReadOnlyList<int>>();
        switch (node)
        {
            case JsonValue:
                prompts.Add(Encode(body.String("prompt")!, "prompt"));
                break;
            case JsonArray { Count: > 0 } list when list.All(x => x is JsonValue v && v.TryGetValue<double>(out _)):
                prompts.Add(Ids(list, "prompt"));
                break;
            case JsonArray { Count: > 0 } list:
                for (int i = 0; i < list.Count; i++)
                    prompts.Add(list[i] switch
                    {
                        JsonValue v when v.TryGetValue<string>(out var text) => Encode(text, $"prompt[{i}]"),
                        JsonArray ids => Ids(ids, $"prompt[{i}]"),
                        _ => throw ApiException.BadField($"prompt[{i}]", "must be a string or a list of token ids"),
                    });
                break;
            default:
                throw ApiException.BadField("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists (not empty)");
        }
        return prompts;
    }

    IReadOnlyList<int> Encode(string text, string field) => CheckPrompt(_tokenizer.Encode(text), field);

    IReadOnlyList<int> Ids(JsonArray list, string field) => CheckPrompt(list.Select((x, i) =>
        x is JsonValue v && v.TryGetValue<double>(out var d) && d == Math.Floor(d) && d >= 0 && d < (_vocabulary ?? int.MaxValue) ? (int)d
            : throw ApiException.BadField($"{field}[{i}]", $"must be a token id in [0, {_vocabulary?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "∞"})")).ToList(), field);

    IReadOnlyList<int> CheckPrompt(IReadOnlyList<int> ids, string field)
    {
        if (ids.Count == 0) throw ApiException.BadField(field, "has no tokens");
        if (ids.Count > _options.MaxPromptTokens) throw ApiException.BadField(field, $"has {ids.Count} tokens; the limit is {_options.MaxPromptTokens}");
        return ids;
    }

    /// <summary><c>messages</c> rendered by the model's chat template with the generation prompt, then tokenized.</summary>
    IReadOnlyList<int> ChatPrompt(RequestBody body, string model)
    {
        var template = _chatTemplate ?? throw ApiException.BadField("model",
            $"'{model}' has no chat template (tokenizer_config.json's chat_template); use /v1/completions, or start the server with a tokenizer folder that has one");
        if (body.Json["messages"] is not JsonArray { Count: > 0 } messages) throw ApiException.BadField("messages", "is required (a non-empty list)");
        var turns = new List<ChatTurn>(messages.Count);
        for (int i = 0; i < messages.Count; i++)
        {
            if (messages[i] is not JsonObject m) throw ApiException.BadField($"messages[{i}]", "must be an object with role and content");
            var turn = new RequestBody(m);
            var role = turn.RequiredString("role") switch
            {
                "system" or "developer" => "system",      // OpenAI's newer name for the system message
                "user" => "user",
                "assistant" => "assistant",
                var other => throw ApiException.BadField($"messages[{i}].role", $"'{other}' is not supported (system, developer, user, assistant)"),
            };
            var content = m["content"] switch
            {
                JsonValue c when c.TryGetValue<string>(out var text) => text,
                // content parts: only text parts, joined as OpenAI's models see them
                JsonArray parts => string.Concat(parts.Select((p, j) => p is JsonObject o && (string?)o["type"] == "text" && o["text"] is JsonValue t && t.TryGetValue<string>(out var s) ? s
                    : throw ApiException.BadField($"messages[{i}].content[{j}]", "only {\"type\": \"text\", \"text\": …} parts are supported"))),
                _ => throw ApiException.BadField($"messages[{i}].content", "must be a string or a list of text parts"),
            };
            turns.Add(new ChatTurn(role, content));
        }
        string rendered;
        try { rendered = template.Render(turns, addGenerationPrompt: true); }
        // the template's own raise_exception (e.g. roles that do not alternate) judges the messages; any other template error is the server's
        catch (ChatTemplateException e) when (e.RaisedByTemplate) { throw ApiException.BadField("messages", $"the chat template refused them: {e.Message}"); }
        return Encode(rendered, "messages");
    }

    GenerationOptions Options(RequestBody body, bool chat, int longestPrompt)
    {
        var maxField = chat && body.Has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
        int? asked = body.Int(maxField, 1, _options.MaxTokens);
        int room = ContextLength is int context ? context - longestPrompt : int.MaxValue;
        if (room <= 0)
            throw ApiException.BadField(chat ? "messages" : "prompt", $"has {longestPrompt} tokens; the model's context is {ContextLength} tokens, which leaves no room for an answer");
        if (asked > room)
            throw ApiException.BadField(maxField, $"the model's context is {ContextLength} tokens; the request asks for {longestPrompt} prompt tokens + {asked} new ones");
        // absent, the answer may use what the context leaves (as vLLM does), up to the server's limit
        int maxTokens = asked ?? Math.Min(room, chat ? _options.MaxTokens : Math.Min(DefaultCompletionTokens, _options.MaxTokens));
        var sampling = new SamplingOptions
        {
            Temperature = body.Number("temperature", 0, 2) ?? 1.0,      // OpenAI's default: sampling
            TopP = body.Number("top_p", double.Epsilon, 1) ?? 1.0,
            TopK = Math.Max(0, body.Int("top_k", -1, int.MaxValue) ?? 0),   // vLLM's extension; -1 (its "off") and 0 are off
            Seed = body.Int("seed", int.MinValue, int.MaxValue),
        };
        var stops = body.Strings("stop", 4, _options.MaxStopLength);
        return new GenerationOptions
        {
            MaxNewTokens = maxTokens,
            Sampling = sampling,
            StopSequences = chat && _chatEnd.Text is { } eosText ? [.. stops, eosText] : stops,
            StopTokenIds = chat ? [_tokenizer.EndOfText, .. _chatEnd.TokenIds] : [_tokenizer.EndOfText],
        };
    }

    /// <summary>One response being built: a JSON answer at the end, or server-sent events as tokens arrive.</summary>
    sealed class Reply(HttpContext ctx, bool chat, string model, bool stream, int choices)
    {
        readonly string _id = (chat ? "chatcmpl-" : "cmpl-") + Guid.NewGuid().ToString("N");
        readonly long _created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        readonly StringBuilder[] _text = Enumerable.Range(0, choices).Select(_ => new StringBuilder()).ToArray();
        readonly int[] _tokens = new int[choices];
        readonly string?[] _finish = new string?[choices];
        readonly bool[] _roleSent = new bool[choices];
        bool _started;

        public int GeneratedTokens => _tokens.Sum();

        public async Task Add(int choice, GeneratedToken token)
        {
            if (token.TokenId >= 0) _tokens[choice]++;
            if (token.FinishReason is not null) _finish[choice] = token.FinishReason;
            var delta = token.TextDelta ?? "";
            if (!stream) { _text[choice].Append(delta); return; }
            if (delta.Length == 0 && token.FinishReason is null && (!chat || _roleSent[choice])) return;
            await Send(Chunk(choice, delta, token.FinishReason)).ConfigureAwait(false);
        }

        public async Task Finish(int promptTokens, bool includeUsage)
        {
            var usage = new JsonObject { ["prompt_tokens"] = promptTokens, ["completion_tokens"] = GeneratedTokens, ["total_tokens"] = promptTokens + GeneratedTokens };
            if (!stream)
            {
                var list = new JsonArray();
                for (int i = 0; i < choices; i++)
                    list.Add(chat
                        ? new JsonObject { ["index"] = i, ["message"] = new JsonObject { ["role"] = "assistant", ["content"] = _text[i].ToString() }, ["logprobs"] = null, ["finish_reason"] = _finish[i] ?? "stop" }
                        : new JsonObject { ["index"] = i, ["text"] = _text[i].ToString(), ["logprobs"] = null, ["finish_reason"] = _finish[i] ?? "stop" });
                await WriteJson(ctx, Envelope(list, usage)).ConfigureAwait(false);
                return;
            }
            if (includeUsage) await Send(Envelope([], usage)).ConfigureAwait(false);
            await Start().ConfigureAwait(false);
            await ctx.Response.WriteAsync("data: [DONE]\n\n", ctx.RequestAborted).ConfigureAwait(false);
            await ctx.Response.Body.FlushAsync(ctx.RequestAborted).ConfigureAwait(false);
        }

        JsonObject Chunk(int choice, string delta, string? finish)
        {
            JsonObject c;
            if (chat)
            {
                var d = new JsonObject();
                if (!_roleSent[choice]) { d["role"] = "assistant"; _roleSent[choice] = true; }
                if (delta.Length > 0 || d.Count > 0) d["content"] = delta;
                c = new JsonObject { ["index"] = choice, ["delta"] = d, ["logprobs"] = null, ["finish_reason"] = finish };
            }
            else c = new JsonObject { ["index"] = choice, ["text"] = delta, ["logprobs"] = null, ["finish_reason"] = finish };
            return Envelope([c], null);
        }

        JsonObject Envelope(JsonArray list, JsonObject? usage) => new()
        {
            ["id"] = _id,
            ["object"] = chat ? (stream ? "chat.completion.chunk" : "chat.completion") : "text_completion",
            ["created"] = _created, ["model"] = model, ["system_fingerprint"] = null, ["choices"] = list, ["usage"] = usage,
        };

        async Task Send(JsonObject chunk)
        {
            await Start().ConfigureAwait(false);
            await ctx.Response.WriteAsync($"data: {chunk.ToJsonString(Json)}\n\n", ctx.RequestAborted).ConfigureAwait(false);
            await ctx.Response.Body.FlushAsync(ctx.RequestAborted).ConfigureAwait(false);
        }

        // headers go with the first event, so a request refused before it (queue full) still gets its status
        Task Start()
        {
            if (_started) return Task.CompletedTask;
            _started = true;
            ctx.Response.ContentType = "text/event-stream";
            ctx.Response.Headers.CacheControl = "no-cache";
            ctx.Response.Headers["X-Accel-Buffering"] = "no";
            return ctx.Response.StartAsync(ctx.RequestAborted);
        }
    }
}
