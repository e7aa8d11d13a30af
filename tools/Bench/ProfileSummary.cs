using System.Text.Json;

namespace OnnxLora.Tools.Bench;

/// <summary>
/// Per-op totals of an ONNX Runtime profile (<c>bench --profile</c>): kernel time of the last run of the session,
/// grouped by op type and by forward vs backward (nodes the gradient builder added are named grad/…, loss_grad/…).
/// </summary>
public static class ProfileSummary
{
    public sealed record OpTotal(string Op, bool Backward, int Calls, double Seconds);

    /// <summary>The totals of the last <c>model_run</c> in <paramref name="path"/>, largest first, and that run's wall time.</summary>
    public static (List<OpTotal> Ops, double RunSeconds) Read(string path)
    {
        using var stream = File.OpenRead(path);
        using var doc = JsonDocument.Parse(stream);
        var events = doc.RootElement.EnumerateArray().ToList();
        var run = events.LastOrDefault(e => Str(e, "cat") == "Session" && Str(e, "name") == "model_run");
        if (run.ValueKind == JsonValueKind.Undefined) return ([], 0);
        long start = run.GetProperty("ts").GetInt64(), end = start + run.GetProperty("dur").GetInt64();
        var totals = new Dictionary<(string, bool), (int Calls, long Us)>();
        foreach (var e in events)
        {
            if (Str(e, "cat") != "Node" || Str(e, "name") is not { } name || !name.EndsWith("_kernel_time", StringComparison.Ordinal)) continue;
            long ts = e.GetProperty("ts").GetInt64();
            if (ts < start || ts > end) continue;
            var op = e.TryGetProperty("args", out var args) && args.TryGetProperty("op_name", out var o) ? o.GetString() ?? "?" : "?";
            var key = (op, name.StartsWith("grad/", StringComparison.Ordinal) || name.StartsWith("loss_grad/", StringComparison.Ordinal));
            var (calls, us) = totals.GetValueOrDefault(key);
            totals[key] = (calls + 1, us + e.GetProperty("dur").GetInt64());
        }
        return (totals.Select(kv => new OpTotal(kv.Key.Item1, kv.Key.Item2, kv.Value.Calls, kv.Value.Us / 1e6)).OrderByDescending(t => t.Seconds).ToList(),
                run.GetProperty("dur").GetInt64() / 1e6);
    }

    static string? Str(JsonElement e, string property) => e.TryGetProperty(property, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    /// <summary>Writes the top op totals of every profile <c>PREFIX_*.json</c> written since <paramref name="since"/>.</summary>
    public static void Print(string prefix, DateTime since, TextWriter output, int top = 15)
    {
        var dir = Path.GetDirectoryName(Path.GetFullPath(prefix))!;
        var files = Directory.GetFiles(dir, Path.GetFileName(prefix) + "_*.json").Where(f => File.GetLastWriteTimeUtc(f) >= since).Order(StringComparer.Ordinal);
        foreach (var file in files)
        {
            var (ops, run) = Read(file);
            if (ops.Count == 0) continue;
            double kernels = ops.Sum(o => o.Seconds), backward = ops.Where(o => o.Backward).Sum(o => o.Seconds);
            output.WriteLine($"profile {file}: last run {run:F3} s, kernels {kernels:F3} s (forward {kernels - backward:F3} s, backward {backward:F3} s)");
            foreach (var o in ops.Take(top))
                output.WriteLine($"  {o.Op,-24} {(o.Backward ? "backward" : "forward"),-8} {o.Seconds,8:F3} s {100 * o.Seconds / kernels,5:F1} % {o.Calls,6} calls");
        }
    }
}
