using OnnxLora.Pipeline.Deployment;

namespace OnnxLora.Serving;

/// <summary>Where <see cref="LoraServer"/> listens and the limits it puts on requests.</summary>
public sealed record ServerOptions
{
    /// <summary>The address to bind: an IP address or "localhost". Loopback by default; anything else exposes the server.</summary>
    public string Host { get; init; } = "127.0.0.1";

    /// <summary>The TCP port; 0 picks a free one (read it from <see cref="LoraServer.Address"/>).</summary>
    public int Port { get; init; } = 8000;

    /// <summary>The base model's id in /v1/models and in requests; default: the model's folder name.</summary>
    public string? ServedModelName { get; init; }

    /// <summary>Largest request body in bytes; a larger one is answered 413.</summary>
    public long MaxBodyBytes { get; init; } = 1 << 20;

    /// <summary>Most prompt tokens one prompt (or rendered chat) may have; more is a 400 naming the field.</summary>
    public int MaxPromptTokens { get; init; } = 4096;

    /// <summary>
    /// The model's context (its position table for GPT-2): prompt + max_tokens beyond it is a 400, as in vLLM. Default:
    /// what OnnxLora's builder recorded in the model (n_positions, max_position_embeddings); null and unrecorded = unchecked.
    /// </summary>
    public int? ContextLength { get; init; }

    /// <summary>Largest <c>max_tokens</c> a request may ask for; more is a 400.</summary>
    public int MaxTokens { get; init; } = 1024;

    /// <summary>Most choices (prompts × n) one request may ask for.</summary>
    public int MaxChoices { get; init; } = 16;

    /// <summary>Wall time a request may take; past it the work is cancelled and the answer is 504.</summary>
    public TimeSpan RequestTimeout { get; init; } = TimeSpan.FromMinutes(2);

    /// <summary>
    /// The one folder <c>POST /v1/load_lora_adapter</c> may read from (paths resolved, no symbolic links below it);
    /// null turns loading at run time off (403).
    /// </summary>
    public string? AdapterRoot { get; init; }

    /// <summary>
    /// Token ids that end a chat answer besides the template's eos_token (generation_config.json's eos_token_id list:
    /// e.g. Llama 3's end-of-turn, which is not its tokenizer's eos_token).
    /// </summary>
    public IReadOnlyList<int> ChatStopTokenIds { get; init; } = [];

    /// <summary>The longest stop sequence a request may give, in characters (a long one costs every decoding step).</summary>
    public int MaxStopLength { get; init; } = 256;

    /// <summary>Batch and queue limits of the generation scheduler (a full queue answers 429).</summary>
    public SchedulerOptions Scheduler { get; init; } = new();
}
