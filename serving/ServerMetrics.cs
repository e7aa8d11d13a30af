using System.Collections.Concurrent;
using System.Globalization;
using System.Text;

namespace OnnxLora.Serving;

/// <summary>
/// The server's counters and latency histograms, written in Prometheus' text exposition format (version 0.0.4) for
/// <c>GET /metrics</c>. Label values come from the server (routes, statuses, served model ids), never from free text.
/// </summary>
public sealed class ServerMetrics
{
    /// <summary>Upper bounds of the latency buckets, in seconds (5 ms … about 82 s, doubling).</summary>
    public static readonly IReadOnlyList<double> LatencyBuckets = Enumerable.Range(0, 15).Select(i => 0.005 * Math.Pow(2, i)).ToArray();

    readonly ConcurrentDictionary<(string Route, int Status), long[]> _requests = new();
    readonly ConcurrentDictionary<string, Histogram> _latency = new(StringComparer.Ordinal);
    readonly ConcurrentDictionary<string, Histogram> _firstToken = new(StringComparer.Ordinal);
    readonly ConcurrentDictionary<string, long[]> _promptTokens = new(StringComparer.Ordinal);
    readonly ConcurrentDictionary<string, long[]> _generatedTokens = new(StringComparer.Ordinal);

    /// <summary>One answered request: its route pattern, status and wall time.</summary>
    public void Request(string route, int status, double seconds)
    {
        Interlocked.Increment(ref _requests.GetOrAdd((route, status), _ => new long[1])[0]);
        _latency.GetOrAdd(route, _ => new Histogram()).Observe(seconds);
    }

    /// <summary>Tokens of one request for <paramref name="model"/> (the base model's id or an adapter's).</summary>
    public void Tokens(string model, int prompt, int generated)
    {
        Interlocked.Add(ref _promptTokens.GetOrAdd(model, _ => new long[1])[0], prompt);
        Interlocked.Add(ref _generatedTokens.GetOrAdd(model, _ => new long[1])[0], generated);
    }

    /// <summary>Seconds from a request's arrival to its first generated token.</summary>
    public void FirstToken(string model, double seconds) => _firstToken.GetOrAdd(model, _ => new Histogram()).Observe(seconds);

    /// <summary>Requests answered so far with <paramref name="status"/> on <paramref name="route"/>.</summary>
    public long RequestCount(string route, int status) => _requests.TryGetValue((route, status), out var c) ? Interlocked.Read(ref c[0]) : 0;

    /// <summary>The exposition text; <paramref name="gauges"/> are sampled now (name, help, value).</summary>
    public string Render(IEnumerable<(string Name, string Help, double Value)> gauges)
    {
        var s = new StringBuilder();
        Header(s, "onnxlora_requests_total", "HTTP requests answered, by route and status.", "counter");
        foreach (var ((route, status), c) in _requests.OrderBy(kv => kv.Key.Route, StringComparer.Ordinal).ThenBy(kv => kv.Key.Status))
            s.Append(CultureInfo.InvariantCulture, $"onnxlora_requests_total{{route=\"{Escape(route)}\",status=\"{status}\"}} {Interlocked.Read(ref c[0])}\n");
        Counters(s, "onnxlora_prompt_tokens_total", "Prompt tokens of finished generation requests, by model.", _promptTokens);
        Counters(s, "onnxlora_generation_tokens_total", "Generated tokens of finished generation requests, by model.", _generatedTokens);
        Histograms(s, "onnxlora_request_duration_seconds", "Request latency from arrival to the last byte, by route.", "route", _latency);
        Histograms(s, "onnxlora_time_to_first_token_seconds", "Time from a generation request's arrival to its first token, by model.", "model", _firstToken);
        foreach (var (name, help, value) in gauges)
        {
            Header(s, name, help, "gauge");
            s.Append(CultureInfo.InvariantCulture, $"{name} {value}\n");
        }
        return s.ToString();
    }

    static void Header(StringBuilder s, string name, string help, string type) => s.Append($"# HELP {name} {help}\n# TYPE {name} {type}\n");

    static void Counters(StringBuilder s, string name, string help, ConcurrentDictionary<string, long[]> byModel)
    {
        Header(s, name, help, "counter");
        foreach (var (model, c) in byModel.OrderBy(kv => kv.Key, StringComparer.Ordinal))
            s.Append(CultureInfo.InvariantCulture, $"{name}{{model=\"{Escape(model)}\"}} {Interlocked.Read(ref c[0])}\n");
    }

    static void Histograms(StringBuilder s, string name, string help, string label, ConcurrentDictionary<string, Histogram> byLabel)
    {
        Header(s, name, help, "histogram");
        foreach (var (key, h) in byLabel.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            var (buckets, sum, count) = h.Snapshot();
            var l = $"{label}=\"{Escape(key)}\"";
            long cumulative = 0;
            for (int i = 0; i < LatencyBuckets.Count; i++)
            {
                cumulative += buckets[i];
                s.Append(CultureInfo.InvariantCulture, $"{name}_bucket{{{l},le=\"{LatencyBuckets[i]:R}\"}} {cumulative}\n");
            }
            s.Append(CultureInfo.InvariantCulture, $"{name}_bucket{{{l},le=\"+Inf\"}} {count}\n");
            s.Append(CultureInfo.InvariantCulture, $"{name}_sum{{{l}}} {sum:R}\n{name}_count{{{l}}} {count}\n");
        }
    }

    // the text format's escapes for label values: backslash, double quote, line feed
    static string Escape(string value) => value.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\"", "\\\"", StringComparison.Ordinal).Replace("\n", "\\n", StringComparison.Ordinal);

    /// <summary>Counts per bucket (not cumulative; the last slot is past every bound), sum and count; locked, as observations are rare next to a run.</summary>
    sealed class Histogram
    {
        readonly long[] _buckets = new long[LatencyBuckets.Count + 1];
        double _sum;
        long _count;

        public void Observe(double seconds)
        {
            int i = 0;
            while (i < LatencyBuckets.Count && seconds > LatencyBuckets[i]) i++;
            lock (_buckets) { _buckets[i]++; _sum += seconds; _count++; }
        }

        public (long[] Buckets, double Sum, long Count) Snapshot()
        {
            lock (_buckets) return ((long[])_buckets.Clone(), _sum, _count);
        }
    }
}
