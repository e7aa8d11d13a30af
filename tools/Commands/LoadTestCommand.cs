using System.ComponentModel;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Deployment.Chat;
using OnnxLora.Serving;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// `onnxlora loadtest --model DIR --adapter NAME=PATH … [--clients N] [--seconds T] [--max-requests R]`: starts
/// `serve` in this process on 127.0.0.1 (a free port; loopback only), runs N HTTP clients for T seconds (or R requests)
/// over a mix of prompts, adapters and seeds, and checks every answer against the same request generated alone
/// before the load (cross-talk). Reports throughput, latency percentiles, errors and the process's memory over time.
/// </summary>
public sealed class LoadTestCommand(IAnsiConsole console) : Command<LoadTestCommand.Settings>
{
    public const string Description = "Load-test 'serve' on loopback: N concurrent clients for T seconds over mixed adapters; throughput, p50/p99 latency, errors, cross-talk check, memory over time.";

    // short English prompts: any tokenizer splits them into a few tokens
    static readonly string[] Prompts =
    [
        "Once upon a time", "The weather today is", "In the beginning", "My favourite food is",
        "The meeting is about", "She opened the door and", "Numbers: 1, 2, 3,", "The best way to learn is",
    ];

    public sealed class Settings : ServeSettings
    {
        [CommandOption("--clients <N>")]
        [Description("Concurrent clients (default 8).")]
        public int Clients { get; init; } = 8;

        [CommandOption("--seconds <T>")]
        [Description("How long the load runs (default 20; at most 3600).")]
        public double Seconds { get; init; } = 20;

        [CommandOption("--max-requests <R>")]
        [Description("Stop after R requests even before T seconds (default 100000).")]
        public int MaxRequests { get; init; } = 100_000;

        [CommandOption("--max-tokens <N>")]
        [Description("max_tokens of every request (default 16).")]
        public int MaxTokens { get; init; } = 16;

        [CommandOption("--max-batch <N>")]
        [Description("The server's batch limit (default 8).")]
        public int MaxBatch { get; init; } = 8;

        [CommandOption("--queue <N>")]
        [Description("The server's queue limit (default 64); clients beyond batch + queue get 429s, counted as errors.")]
        public int Queue { get; init; } = 64;

        [CommandOption("--context <N>")]
        [Description("The model's context in tokens, when its metadata does not record it.")]
        public int? Context { get; init; }
    }

    sealed record Job(string Prompt, string Model, string? Adapter, int Seed, bool Stream);

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (s.Ids is not null) throw new ArgumentException("--ids does not apply to loadtest");
        if (s.Clients is < 1 or > 1024) throw new ArgumentException($"--clients must be in 1..1024 (got {s.Clients})");
        if (!double.IsFinite(s.Seconds) || s.Seconds is <= 0 or > 3600) throw new ArgumentException($"--seconds must be in (0, 3600] (got {s.Seconds})");
        if (s.MaxRequests < 1) throw new ArgumentException($"--max-requests must be ≥ 1 (got {s.MaxRequests})");
        if (s.MaxTokens is < 1 or > 4096) throw new ArgumentException($"--max-tokens must be in 1..4096 (got {s.MaxTokens})");
        ServeCommand.CheckScheduler(s.MaxBatch, s.Queue);
        var (host, runs) = s.OpenHost();
        LoraServer server;
        List<Job> jobs;
        Dictionary<Job, string> expected;
        try
        {
            var tokenizer = s.TokenizerFor(host, needed: true)!;
            // the answers each request gets alone, before any load: sampled with a seed, so a row that read another
            // row's logits, cache or adapter shows as a different text
            var generator = new TextGenerator(host, tokenizer.Inner);
            var adapters = runs.Where(r => r is not null).Cast<string>().ToList();
            const string baseName = "base";
            jobs = (from prompt in Prompts
                    from adapter in adapters.Cast<string?>().Prepend(null)
                    from seed in new[] { 1, 2 }
                    select new Job(prompt, adapter ?? baseName, adapter, seed, Stream: (prompt.Length + seed) % 3 == 0)).ToList();
            var clock = Stopwatch.StartNew();
            expected = jobs.ToDictionary(j => j, j => generator.Generate(tokenizer.Encode(j.Prompt), Options(j, s.MaxTokens, tokenizer.EndOfText), j.Adapter).Text ?? "");
            console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"references: {jobs.Count} requests (8 prompts × {adapters.Count + 1} models × 2 seeds) generated alone in {clock.Elapsed.TotalSeconds:F1} s"));
            server = new LoraServer(host, tokenizer, new ServerOptions
            {
                Host = "127.0.0.1", Port = 0, ServedModelName = baseName, ContextLength = s.Context, MaxTokens = Math.Max(s.MaxTokens, 16),
                Scheduler = new SchedulerOptions { MaxBatch = s.MaxBatch, QueueCapacity = s.Queue },
                ChatStopTokenIds = ServeCommand.ChatStopIdsOf(s.Tokenizer),
            }, ServeCommand.ChatTemplateOf(s.Tokenizer));
        }
        catch
        {
            host.Dispose();
            throw;
        }
        return Run(server, jobs, expected, s, cancellationToken).GetAwaiter().GetResult();
    }

    static GenerationOptions Options(Job job, int maxTokens, int endOfText) => new()
    {
        MaxNewTokens = maxTokens, Sampling = new SamplingOptions { Temperature = 0.8, Seed = job.Seed }, StopTokenIds = [endOfText],
    };

    async Task<int> Run(LoraServer server, List<Job> jobs, Dictionary<Job, string> expected, Settings s, CancellationToken cancellationToken)
    {
        await using (server)
        {
            using var stop = new StopSignals(cancellationToken);
            await server.StartAsync(stop.Token);
            using var http = new HttpClient(new SocketsHttpHandler { MaxConnectionsPerServer = s.Clients + 1 }) { BaseAddress = server.Address, Timeout = TimeSpan.FromMinutes(5) };
            foreach (var job in jobs.DistinctBy(j => j.Model)) await Send(http, job, s.MaxTokens, stop.Token);   // warm-up, not counted

            var latencies = new List<double>();
            var memory = new List<(double Seconds, long Bytes, long Managed)>();
            int requests = 0, errors = 0, mismatches = 0, tokens = 0;
            var firstError = new StringBuilder();
            var clock = Stopwatch.StartNew();
            using var end = CancellationTokenSource.CreateLinkedTokenSource(stop.Token);
            end.CancelAfter(TimeSpan.FromSeconds(s.Seconds));
            var sampler = Task.Run(async () =>
            {
                using var process = Process.GetCurrentProcess();
                while (!end.IsCancellationRequested)
                {
                    process.Refresh();
                    lock (memory) memory.Add((clock.Elapsed.TotalSeconds, process.WorkingSet64, GC.GetTotalMemory(forceFullCollection: false)));
                    try { await Task.Delay(500, end.Token); } catch (OperationCanceledException) { }
                }
            });
            var clients = Enumerable.Range(0, s.Clients).Select(c => Task.Run(async () =>
            {
                for (int k = 0; !end.IsCancellationRequested; k++)
                {
                    if (Interlocked.Increment(ref requests) > s.MaxRequests) { Interlocked.Decrement(ref requests); await end.CancelAsync(); break; }
                    var job = jobs[(c * 7 + k * 5) % jobs.Count];
                    var started = Stopwatch.GetTimestamp();
                    var (status, text, generated, error) = await Send(http, job, s.MaxTokens, CancellationToken.None);
                    double seconds = Stopwatch.GetElapsedTime(started).TotalSeconds;
                    lock (latencies) latencies.Add(seconds);
                    Interlocked.Add(ref tokens, generated);
                    if (status != 200) { Interlocked.Increment(ref errors); Note($"{job.Model}: HTTP {status}: {error}"); }
                    else if (text != expected[job]) { Interlocked.Increment(ref mismatches); Note($"{job.Model}, seed {job.Seed}, '{job.Prompt}': got '{text}', alone '{expected[job]}'"); }
                }
            })).ToArray();
            await Task.WhenAll(clients);
            double elapsed = clock.Elapsed.TotalSeconds;
            await end.CancelAsync();
            await sampler;
            Report(s, server, requests, errors, mismatches, tokens, elapsed, latencies, memory, firstError.ToString());
            return errors == 0 && mismatches == 0 ? 0 : 1;

            void Note(string message) { lock (firstError) if (firstError.Length == 0) firstError.Append(message); }
        }
    }

    /// <summary>One request as an OpenAI client sends it; a streamed answer's text is its chunks joined.</summary>
    static async Task<(int Status, string Text, int Tokens, string? Error)> Send(HttpClient http, Job job, int maxTokens, CancellationToken ct)
    {
        var body = new JsonObject { ["model"] = job.Model, ["prompt"] = job.Prompt, ["max_tokens"] = maxTokens, ["temperature"] = 0.8, ["seed"] = job.Seed, ["stream"] = job.Stream };
        if (job.Stream) body["stream_options"] = new JsonObject { ["include_usage"] = true };
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/completions") { Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json") };
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct);
        if (!response.IsSuccessStatusCode) return ((int)response.StatusCode, "", 0, await response.Content.ReadAsStringAsync(ct));
        if (!job.Stream)
        {
            var json = JsonNode.Parse(await response.Content.ReadAsStringAsync(ct))!;
            return (200, (string?)json["choices"]![0]!["text"] ?? "", (int)json["usage"]!["completion_tokens"]!, null);
        }
        var text = new StringBuilder();
        int generated = 0;
        bool done = false;
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync(ct));
        while (await reader.ReadLineAsync(ct) is { } line)
        {
            if (!line.StartsWith("data: ", StringComparison.Ordinal)) continue;
            var data = line["data: ".Length..];
            if (data == "[DONE]") { done = true; break; }
            var chunk = JsonNode.Parse(data)!;
            if (chunk["error"] is { } error) return (500, "", 0, error.ToJsonString());
            foreach (var choice in chunk["choices"]!.AsArray()) text.Append((string?)choice!["text"]);
            if (chunk["usage"] is JsonObject usage) generated = (int)usage["completion_tokens"]!;
        }
        return done ? (200, text.ToString(), generated, null) : (500, "", 0, "the stream ended without [DONE]");
    }

    void Report(Settings s, LoraServer server, int requests, int errors, int mismatches, int tokens, double elapsed,
                List<double> latencies, List<(double Seconds, long Bytes, long Managed)> memory, string firstError)
    {
        latencies.Sort();
        double P(double q) => latencies.Count == 0 ? double.NaN : latencies[Math.Min(latencies.Count - 1, (int)Math.Ceiling(q * latencies.Count) - 1)] * 1000;
        var inv = CultureInfo.InvariantCulture;
        var table = new Table().Title($"onnxlora loadtest: {s.Clients} clients, {elapsed:F1} s, max_tokens {s.MaxTokens}, loopback {server.Address}").AddColumns("measure", "value");
        table.AddRow("requests", requests.ToString("N0", inv));
        table.AddRow("errors (non-200)", errors.ToString(inv));
        table.AddRow("cross-talk (text ≠ alone)", mismatches.ToString(inv));
        table.AddRow("throughput", string.Create(inv, $"{requests / elapsed:F2} requests/s, {tokens / elapsed:F1} generated tokens/s"));
        table.AddRow("latency p50 / p90 / p99 / max", string.Create(inv, $"{P(0.5):F0} / {P(0.9):F0} / {P(0.99):F0} / {(latencies.Count == 0 ? double.NaN : latencies[^1] * 1000):F0} ms"));
        if (memory.Count > 0)
        {
            // the first third against the last: a leak grows with the requests served
            var first = memory.Take(Math.Max(1, memory.Count / 3)).Average(m => m.Bytes);
            var last = memory.Skip(memory.Count - Math.Max(1, memory.Count / 3)).Average(m => m.Bytes);
            table.AddRow("RSS first third → last third", string.Create(inv, $"{first / 1048576:F0} → {last / 1048576:F0} MiB ({(last - first) / first * 100:+0.0;-0.0} %), max {memory.Max(m => m.Bytes) / 1048576.0:F0} MiB"));
            int step = Math.Max(1, memory.Count / 10);
            table.AddRow("managed heap first third → last third", string.Create(inv, $"{memory.Take(Math.Max(1, memory.Count / 3)).Average(m => m.Managed) / 1048576:F0} → {memory.Skip(memory.Count - Math.Max(1, memory.Count / 3)).Average(m => m.Managed) / 1048576:F0} MiB"));
            table.AddRow("RSS over time (s: MiB)", string.Join("  ", memory.Where((_, i) => i % step == 0).Select(m => string.Create(inv, $"{m.Seconds:F0}: {m.Bytes / 1048576.0:F0}"))));
        }
        console.Write(table);
        if (firstError.Length > 0) console.WriteLine($"first failure: {firstError}");
    }
}
