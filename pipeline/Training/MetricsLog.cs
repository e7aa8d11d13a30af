using System.Text.Json;
using System.Text.Json.Nodes;

namespace OnnxLora.Pipeline.Training;

/// <summary>One row of metrics.jsonl: a training step or an evaluation.</summary>
public sealed record MetricsRow(string Kind, int Step, int Epoch, double Loss, double Lr = 0, double TokensPerSecond = 0, double? Accuracy = null);

/// <summary>
/// RUN_DIR/metrics.jsonl: one JSON object per line, appended and flushed per row so a killed run keeps its
/// history. Reopening a run (resume) drops rows past the resumed step, so the file stays one clean curve.
/// </summary>
public sealed class MetricsLog : IDisposable
{
    readonly StreamWriter _writer;
    readonly List<MetricsRow> _rows = new();

    /// <summary>Opens <paramref name="path"/>; null keeps the rows in memory only (data-parallel ranks other than 0).</summary>
    public MetricsLog(string? path, int resumeFromStep = 0)
    {
        Path = path;
        if (path is null)
        {
            _writer = StreamWriter.Null;
            return;
        }
        if (File.Exists(path) && resumeFromStep > 0)
        {
            // a kill mid-append leaves a last line without its newline: that row was never complete, drop it
            var text = File.ReadAllText(path);
            var lines = text.Split('\n');
            for (int i = 0; i < lines.Length - 1; i++)
            {
                if (lines[i].Length == 0) continue;
                MetricsRow row;
                try { row = Parse(lines[i]); }
                catch (Exception e) when (e is JsonException or InvalidOperationException or NullReferenceException or FormatException)
                {
                    throw new InvalidDataException($"{path}: line {i + 1} is not a metrics row ({e.Message})", e);
                }
                if (row.Step <= resumeFromStep) _rows.Add(row);
            }
        }
        // rewrite the kept prefix atomically, then append
        OnnxLora.GraphRewrite.Graphs.AtomicFile.WriteAllText(path, string.Concat(_rows.Select(r => Format(r) + "\n")));
        _writer = new StreamWriter(new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read));
    }

    public string? Path { get; }
    public IReadOnlyList<MetricsRow> Rows => _rows;

    public void Add(MetricsRow row)
    {
        _rows.Add(row);
        _writer.WriteLine(Format(row));
        _writer.Flush();
    }

    static string Format(MetricsRow r)
    {
        var o = new JsonObject { ["kind"] = r.Kind, ["step"] = r.Step, ["epoch"] = r.Epoch, ["loss"] = r.Loss };
        if (r.Kind == "train") { o["lr"] = r.Lr; o["tokens_per_s"] = Math.Round(r.TokensPerSecond, 1); }
        if (r.Accuracy is double a) o["accuracy"] = a;
        return o.ToJsonString();
    }

    static MetricsRow Parse(string line)
    {
        var o = JsonNode.Parse(line)!.AsObject();
        return new MetricsRow((string)o["kind"]!, (int)o["step"]!, (int)o["epoch"]!, (double)o["loss"]!,
            (double?)o["lr"] ?? 0, (double?)o["tokens_per_s"] ?? 0, (double?)o["accuracy"]);
    }

    public void Dispose() => _writer.Dispose();
}
