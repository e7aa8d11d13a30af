using System.ComponentModel;
using System.Globalization;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Deployment.Chat;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.Serving;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>`onnxlora serve --model DIR [--adapter NAME=PATH …] [--classifier NAME=RUN_DIR …] [--host 127.0.0.1] [--port 8000]`.</summary>
public sealed class ServeCommand(IAnsiConsole console) : Command<ServeCommand.Settings>
{
    public const string Description = "Serve the deployable model and its adapters over an OpenAI-compatible HTTP API (completions, chat, classify, adapters loaded at run time, /metrics).";

    public sealed class Settings : ServeSettings
    {
        [CommandOption("--host <ADDRESS>")]
        [Description("Address to bind (default 127.0.0.1, this machine only); 0.0.0.0 exposes the server to the network.")]
        public string Host { get; init; } = "127.0.0.1";

        [CommandOption("--port <PORT>")]
        [Description("TCP port (default 8000; 0 = any free port, printed at start).")]
        public int Port { get; init; } = 8000;

        [CommandOption("--served-model-name <NAME>")]
        [Description("The base model's id in requests and /v1/models (default: the model's folder name).")]
        public string? ServedModelName { get; init; }

        [CommandOption("--classifier <NAME=PATH>")]
        [Description("A classifier for /v1/classify: a 'train --task cls' run folder (its deploy.onnx and adapter) or a merged classifier .onnx; repeatable.")]
        public string[] Classifiers { get; init; } = [];

        [CommandOption("--adapter-root <DIR>")]
        [Description("Allow POST /v1/load_lora_adapter to load adapters from DIR (relative lora_path from DIR; nothing outside it, no symbolic links). Without it, loading at run time is off.")]
        public string? AdapterRoot { get; init; }

        [CommandOption("--max-tokens <N>")]
        [Description("Largest max_tokens a request may ask for (default 1024).")]
        public int MaxTokens { get; init; } = 1024;

        [CommandOption("--context <N>")]
        [Description("The model's context in tokens (GPT-2: its position-table size): prompt + max_tokens beyond it is refused. Default: what the model's metadata records; unrecorded = unchecked.")]
        public int? Context { get; init; }

        [CommandOption("--max-prompt-tokens <N>")]
        [Description("Most tokens one prompt may have (default 4096).")]
        public int MaxPromptTokens { get; init; } = 4096;

        [CommandOption("--max-body-bytes <N>")]
        [Description("Largest request body (default 1048576); larger is answered 413.")]
        public long MaxBodyBytes { get; init; } = 1 << 20;

        [CommandOption("--max-batch <N>")]
        [Description("Requests decoded together at most (default 8).")]
        public int MaxBatch { get; init; } = 8;

        [CommandOption("--queue <N>")]
        [Description("Requests waiting for a slot at most (default 64); one more is answered 429.")]
        public int Queue { get; init; } = 64;

        [CommandOption("--timeout <SECONDS>")]
        [Description("Wall time one request may take (default 120); past it the work stops and the answer is 504.")]
        public double Timeout { get; init; } = 120;
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (s.Ids is not null) throw new ArgumentException("--ids does not apply to serve: requests carry their prompts");
        if (s.Port is < 0 or > 65535) throw new ArgumentException($"--port must be in 0..65535 (got {s.Port})");
        if (s.MaxTokens < 1) throw new ArgumentException($"--max-tokens must be ≥ 1 (got {s.MaxTokens})");
        if (s.Context is < 2) throw new ArgumentException($"--context must be ≥ 2 (got {s.Context})");
        if (s.MaxPromptTokens < 1) throw new ArgumentException($"--max-prompt-tokens must be ≥ 1 (got {s.MaxPromptTokens})");
        if (s.MaxBodyBytes < 1024) throw new ArgumentException($"--max-body-bytes must be ≥ 1024 (got {s.MaxBodyBytes})");
        CheckScheduler(s.MaxBatch, s.Queue);
        if (!double.IsFinite(s.Timeout) || s.Timeout <= 0) throw new ArgumentException($"--timeout must be a number of seconds > 0 (got {s.Timeout})");
        var (host, _) = s.OpenHost();
        var classifiers = new List<ServedClassifier>();
        LoraServer server;
        try
        {
            var tokenizer = s.TokenizerFor(host, needed: true)!;
            foreach (var spec in s.Classifiers)
            {
                int eq = spec.IndexOf('=');
                if (eq <= 0) throw new ArgumentException($"--classifier '{spec}': give NAME=PATH");
                classifiers.Add(ServedClassifier.Load(spec[..eq], spec[(eq + 1)..], tokenizer, ExecutionDevice.Parse(s.Device)));
            }
            server = new LoraServer(host, tokenizer, new ServerOptions
            {
                Host = s.Host, Port = s.Port, ServedModelName = s.ServedModelName, AdapterRoot = s.AdapterRoot,
                ContextLength = s.Context, MaxTokens = s.MaxTokens, MaxPromptTokens = s.MaxPromptTokens, MaxBodyBytes = s.MaxBodyBytes,
                RequestTimeout = TimeSpan.FromSeconds(s.Timeout),
                Scheduler = new SchedulerOptions { MaxBatch = s.MaxBatch, QueueCapacity = s.Queue },
                ChatStopTokenIds = ChatStopIdsOf(s.Tokenizer),
            }, ChatTemplateOf(s.Tokenizer), classifiers);
        }
        catch
        {
            host.Dispose();
            foreach (var c in classifiers) c.Dispose();
            throw;
        }
        return Serve(server, cancellationToken).GetAwaiter().GetResult();
    }

    async Task<int> Serve(LoraServer server, CancellationToken cancellationToken)
    {
        await using (server)
        {
            using var stop = new StopSignals(cancellationToken);
            await server.StartAsync(stop.Token);
            console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"serving '{server.BaseModel}' on {server.Address} (OpenAI API under /v1; Ctrl+C stops)"));
            try { await server.WaitForShutdownAsync(stop.Token); }
            catch (OperationCanceledException) { }
            console.WriteLine("stopped");
        }
        return 0;
    }

    /// <summary>The chat template of the tokenizer's folder (tokenizer_config.json's chat_template), or null.</summary>
    /// <summary>The scheduler flags of serve and loadtest.</summary>
    internal static void CheckScheduler(int maxBatch, int queue)
    {
        // the queue holds requests the decode loop has not admitted yet (it admits between steps): 0 would refuse all
        if (maxBatch < 1 || queue < 1) throw new ArgumentException($"--max-batch and --queue must be ≥ 1 (got {maxBatch}, {queue})");
    }

        internal static ChatTemplate? ChatTemplateOf(string? tokenizer) => tokenizer is null ? null : ChatTemplate.Load(FolderOf(tokenizer));

    /// <summary>The tokenizer folder's generation_config.json eos ids (where chat answers end besides eos_token), or none.</summary>
    internal static IReadOnlyList<int> ChatStopIdsOf(string? tokenizer) =>
        tokenizer is null ? [] : AdapterChatClientOptions.ForModel(FolderOf(tokenizer)).StopTokenIds;

    /// <summary>The tokenizer's folder (--tokenizer names a folder or a file in it).</summary>
    static string FolderOf(string tokenizer) => Directory.Exists(tokenizer) ? tokenizer : Path.GetDirectoryName(Path.GetFullPath(tokenizer))!;
}
