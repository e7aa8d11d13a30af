using System.Runtime.CompilerServices;
using System.Text.Json.Nodes;
using Microsoft.Extensions.AI;
using Microsoft.ML.Tokenizers;

namespace OnnxLora.Pipeline.Deployment.Chat;

/// <summary>Settings of an <see cref="AdapterChatClient"/>.</summary>
public sealed record AdapterChatClientOptions
{
    /// <summary>The model id that means the base model (as a server lists it); a null ModelId means it too.</summary>
    public string BaseModelId { get; init; } = "base";

    /// <summary>Tokens generated when a request gives no <see cref="ChatOptions.MaxOutputTokens"/>.</summary>
    public int DefaultMaxOutputTokens
    {
        get;
        init => field = value > 0 ? value : throw new ArgumentOutOfRangeException(nameof(DefaultMaxOutputTokens), value, "DefaultMaxOutputTokens must be greater than zero.");
    } = 256;

    /// <summary>
    /// Token ids that end an answer besides the template's eos_token (e.g. generation_config.json's eos_token_id list,
    /// which can name an end-of-turn token the tokenizer's eos_token is not).
    /// </summary>
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];

    /// <summary>
    /// Options for a Hugging Face model folder: its generation_config.json's eos_token_id (one id or a list, e.g. Llama
    /// 3's end-of-text and end-of-turn) as <see cref="StopTokenIds"/>; the defaults when the file is absent.
    /// </summary>
    /// <exception cref="InvalidDataException">generation_config.json is not JSON, or eos_token_id is not token ids; the message names the file.</exception>
    public static AdapterChatClientOptions ForModel(string modelDir)
    {
        ArgumentNullException.ThrowIfNull(modelDir);
        var path = Path.Combine(modelDir, "generation_config.json");
        if (!File.Exists(path)) return new AdapterChatClientOptions();
        var eos = Data.TextTokenizer.ReadObject(path)["eos_token_id"];
        var ids = (eos is JsonArray list ? list.ToList() : eos is null ? [] : [eos]).Select(node =>
            node is JsonValue v && v.TryGetValue<int>(out var id) && id >= 0 ? id
                : throw new InvalidDataException($"{path}: eos_token_id must be a token id or a list of them, got {eos!.ToJsonString()}")).ToList();
        return new AdapterChatClientOptions { StopTokenIds = ids };
    }
}

/// <summary>
/// A Microsoft.Extensions.AI <see cref="IChatClient"/> over a <see cref="GenerationScheduler"/>: the messages are
/// rendered with the model's <see cref="ChatTemplate"/> (with the generation prompt), tokenized with the generator's
/// tokenizer, and generated until the template's eos_token, a stop sequence or the token limit.
/// <see cref="ChatOptions.ModelId"/> chooses the adapter (null or <see cref="AdapterChatClientOptions.BaseModelId"/> =
/// the base model); MaxOutputTokens, Temperature, TopP, TopK, Seed, StopSequences and Instructions (a system turn
/// first) apply per request; penalties, ResponseFormat and ConversationId are ignored (each request stands alone).
/// Text only: images and tool calls are refused (<see cref="NotSupportedException"/>). An unknown ModelId fails with
/// <see cref="KeyNotFoundException"/>, a full queue with <see cref="QueueFullException"/>, messages the template
/// refuses with <see cref="ChatTemplateException"/>. Thread-safe; the scheduler is not owned.
/// </summary>
public sealed class AdapterChatClient : IChatClient
{
    /// <summary>The provider name in <see cref="ChatClientMetadata"/>.</summary>
    public const string ProviderName = "onnxlora";

    readonly GenerationScheduler _scheduler;
    readonly ChatTemplate _template;
    readonly Tokenizer _tokenizer;
    readonly AdapterChatClientOptions _options;
    readonly IReadOnlyList<int> _stopTokenIds;
    readonly string? _eosText;          // the eos_token when it is not one token: stopped at as text
    readonly ChatClientMetadata _metadata;

    /// <param name="scheduler">serves the requests (not owned); its generator must have a tokenizer</param>
    /// <param name="template">the model's chat template (<see cref="ChatTemplate.Load"/>)</param>
    /// <param name="options">null = defaults</param>
    public AdapterChatClient(GenerationScheduler scheduler, ChatTemplate template, AdapterChatClientOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(scheduler);
        ArgumentNullException.ThrowIfNull(template);
        _scheduler = scheduler;
        _template = template;
        _tokenizer = scheduler.Generator.Tokenizer
            ?? throw new ArgumentException("the scheduler's TextGenerator has no tokenizer; a chat client turns text into tokens and back", nameof(scheduler));
        _options = options ?? new AdapterChatClientOptions();
        (_stopTokenIds, _eosText) = template.EndOfAnswer(_tokenizer, _options.StopTokenIds);
        _metadata = new ChatClientMetadata(ProviderName, defaultModelId: _options.BaseModelId);
    }

    /// <inheritdoc/>
    public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var updates = new List<ChatResponseUpdate>();
        await foreach (var update in GetStreamingResponseAsync(messages, options, cancellationToken).ConfigureAwait(false)) updates.Add(update);
        return updates.ToChatResponse();
    }

    /// <inheritdoc/>
    public async IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var (request, modelId) = Request(messages, options);
        string responseId = Guid.NewGuid().ToString("N"), messageId = Guid.NewGuid().ToString("N");
        var created = DateTimeOffset.UtcNow;
        int outputTokens = 0;
        await foreach (var token in _scheduler.Generate(request, cancellationToken).WithCancellation(cancellationToken).ConfigureAwait(false))
        {
            if (token.TokenId >= 0) outputTokens++;
            bool final = token.FinishReason is not null;
            if (string.IsNullOrEmpty(token.TextDelta) && !final) continue;
            var update = new ChatResponseUpdate(ChatRole.Assistant, token.TextDelta ?? "")
            {
                ResponseId = responseId, MessageId = messageId, ModelId = modelId, CreatedAt = created,
            };
            if (final)
            {
                update.FinishReason = token.FinishReason == "length" ? ChatFinishReason.Length : ChatFinishReason.Stop;
                update.Contents.Add(new UsageContent(new UsageDetails
                {
                    InputTokenCount = request.PromptIds.Count, OutputTokenCount = outputTokens, TotalTokenCount = request.PromptIds.Count + outputTokens,
                }));
            }
            yield return update;
        }
    }

    /// <summary>The generation request for <paramref name="messages"/>: the rendered, tokenized prompt with the options mapped.</summary>
    (GenerationRequest Request, string ModelId) Request(IEnumerable<ChatMessage> messages, ChatOptions? options)
    {
        ArgumentNullException.ThrowIfNull(messages);
        if (options?.Tools is { Count: > 0 }) throw new NotSupportedException("AdapterChatClient does not call tools; remove ChatOptions.Tools");
        var turns = new List<ChatTurn>();
        if (!string.IsNullOrEmpty(options?.Instructions)) turns.Add(new ChatTurn("system", options.Instructions));
        int index = 0;
        foreach (var message in messages)
        {
            ArgumentNullException.ThrowIfNull(message, nameof(messages));
            var other = message.Contents.FirstOrDefault(c => c is not TextContent and not TextReasoningContent);
            if (other is not null) throw new NotSupportedException($"message {index} ({message.Role}) holds {other.GetType().Name}; AdapterChatClient takes text only");
            turns.Add(new ChatTurn(message.Role.Value, message.Text));
            index++;
        }
        if (turns.Count == 0) throw new ArgumentException("no messages", nameof(messages));
        var prompt = _template.Render(turns, addGenerationPrompt: true);
        var ids = _tokenizer.EncodeToIds(prompt);
        if (ids.Count == 0) throw new ArgumentException("the rendered prompt has no tokens", nameof(messages));

        string? adapter = options?.ModelId is { } id && id != _options.BaseModelId ? id : null;
        var stopSequences = (options?.StopSequences ?? []).Where(s => !string.IsNullOrEmpty(s)).ToList();
        if (_eosText is not null) stopSequences.Add(_eosText);
        var generation = new GenerationOptions
        {
            MaxNewTokens = options?.MaxOutputTokens ?? _options.DefaultMaxOutputTokens,
            Sampling = Sampling(options),
            StopSequences = stopSequences,
            StopTokenIds = _stopTokenIds,
        };
        return (new GenerationRequest(ids, generation, adapter), adapter ?? _options.BaseModelId);
    }

    // greedy unless the request asks for sampling (a temperature above 0, or top-p/top-k at temperature 1)
    static SamplingOptions Sampling(ChatOptions? options)
    {
        if (options is null) return SamplingOptions.Greedy;
        bool truncates = options.TopP is not null || options.TopK is not null;
        double temperature = options.Temperature ?? (truncates ? 1.0 : 0.0);
        return new SamplingOptions
        {
            Temperature = temperature,
            TopP = options.TopP ?? 1.0,
            TopK = options.TopK ?? 0,
            // the sampler takes a 32-bit seed: fold a 64-bit one so that every bit counts
            Seed = options.Seed is long seed ? unchecked((int)seed ^ (int)(seed >> 32)) : null,
        };
    }

    /// <inheritdoc/>
    public object? GetService(Type serviceType, object? serviceKey = null)
    {
        ArgumentNullException.ThrowIfNull(serviceType);
        if (serviceKey is not null) return null;
        if (serviceType == typeof(ChatClientMetadata)) return _metadata;
        if (serviceType == typeof(ChatTemplate)) return _template;
        if (serviceType == typeof(GenerationScheduler)) return _scheduler;
        return serviceType.IsInstanceOfType(this) ? this : null;
    }

    /// <summary>Nothing to release: the scheduler belongs to the caller.</summary>
    public void Dispose() { }
}
