using OnnxLora.GraphRewrite.Artifacts;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Unicode;

namespace OnnxLora.Pipeline.Data;

/// <summary>Input file formats for `onnxlora train --format`.</summary>
public enum DataFormat
{
    /// <summary>Plain text, tokenized as one stream and packed into windows of --seq tokens.</summary>
    Text,
    /// <summary>JSON lines: {"prompt","completion"} (loss on the completion only) or {"text"}.</summary>
    Jsonl,
    /// <summary>JSON lines of pre-tokenized {"input_ids":[…], "labels"?:[…]}.</summary>
    Tokens,
    /// <summary>label&lt;TAB&gt;text (or label,text for .csv) lines for classification.</summary>
    Tsv,
}

/// <summary>Options for <see cref="DatasetLoader.Load"/>.</summary>
public sealed class DatasetOptions
{
    public required DataFormat Format { get; init; }
    public TrainingTask Task { get; init; } = TrainingTask.Lm;
    /// <summary>Longest sequence kept; longer examples are truncated and counted.</summary>
    public int SeqLength { get; init; } = 128;
    /// <summary>Model vocabulary size: token ids at or above it are refused with the line that has them.</summary>
    public int VocabSize { get; init; } = 50257;
    /// <summary>Skip malformed rows (and count them) instead of failing on the first one.</summary>
    public bool SkipBadRows { get; init; }
    /// <summary>For classification: the label names in class-index order; null = sorted distinct labels of the file.</summary>
    public IReadOnlyList<string>? ClassNames { get; init; }
    /// <summary>For classification from tokens: the number of classes (0 = unknown); a "label" at or above it is refused.</summary>
    public int ClassCount { get; init; }
    public TextTokenizer? Tokenizer { get; init; }
}

/// <summary>Reads training data files into tokenized examples. Errors name the file and the line.</summary>
public static class DatasetLoader
{
    public static Dataset Load(string path, DatasetOptions options)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such data file", path);
        if (options.SeqLength < 2) throw new ArgumentException($"--seq must be at least 2 (got {options.SeqLength})");
        var tokenizer = options.Tokenizer ?? (options.Format == DataFormat.Tokens ? null : TextTokenizer.Gpt2);
        if (options.Task == TrainingTask.Cls && options.Format != DataFormat.Tsv && options.Format != DataFormat.Tokens)
            throw new ArgumentException($"{path}: --task cls reads --format tsv (label<TAB>text) or tokens (with \"label\"), not {options.Format.ToString().ToLowerInvariant()}");
        var state = new LoadState(path, options);
        switch (options.Format)
        {
            case DataFormat.Text: LoadText(state, tokenizer!); break;
            case DataFormat.Jsonl: LoadJsonl(state, tokenizer!); break;
            case DataFormat.Tokens: LoadTokens(state); break;
            case DataFormat.Tsv: LoadTsv(state, tokenizer!); break;
        }
        if (state.Examples.Count == 0) throw new InvalidDataException($"{path}: no examples (empty file, or every row was skipped)");
        return new Dataset(state.Examples, options.Task, state.Truncated, state.Skipped, state.ClassNames);
    }

    sealed class LoadState(string path, DatasetOptions options)
    {
        public string Path { get; } = path;
        public DatasetOptions Options { get; } = options;
        public List<Example> Examples { get; } = new();
        public int Truncated;
        public int Skipped;
        public List<string> ClassNames { get; set; } = CheckUnique(options.ClassNames, "labels")?.ToList() ?? new();

        /// <summary>Truncates, checks ids against the vocabulary and keeps the example.</summary>
        public void Add(int[] ids, int[] labels, int line, int classLabel = -1)
        {
            if (ids.Length == 0) return;
            int bad = Array.FindIndex(ids, i => i < 0 || i >= Options.VocabSize);
            if (bad >= 0) throw new InvalidDataException($"{Path}:{line}: token id {ids[bad]} is outside the model's vocabulary (0..{Options.VocabSize - 1})");
            // −100 is the only negative label: any other would index the logits out of range or wrap to a real token
            bad = Array.FindIndex(labels, l => l != Example.Ignore && (l < 0 || l >= Options.VocabSize));
            if (bad >= 0) throw new InvalidDataException($"{Path}:{line}: label {labels[bad]} at position {bad} is neither {Example.Ignore} (ignored) nor a token id (0..{Options.VocabSize - 1})");
            int classes = ClassNames.Count > 0 ? ClassNames.Count : Options.ClassCount;
            if (classLabel < -1 || (Options.Task == TrainingTask.Cls && classes > 0 && classLabel >= classes))
                throw new InvalidDataException($"{Path}:{line}: class label {classLabel} is outside the {classes} classes (0..{classes - 1})");
            if (ids.Length > Options.SeqLength)
            {
                Truncated++;
                // classification reads the last position, so keep the end of the text; LM keeps the start
                if (Options.Task == TrainingTask.Cls) { ids = ids[^Options.SeqLength..]; labels = labels[^Options.SeqLength..]; }
                else { ids = ids[..Options.SeqLength]; labels = labels[..Options.SeqLength]; }
            }
            Examples.Add(new Example(ids, labels, classLabel));
        }

        public void Bad(int line, string why)
        {
            if (!Options.SkipBadRows) throw new InvalidDataException($"{Path}:{line}: {why} (use --skip-bad-rows to skip such rows)");
            Skipped++;
        }
    }

    static void LoadText(LoadState s, TextTokenizer tokenizer)
    {
        var ids = tokenizer.Encode(ReadText(s.Path));
        int seq = s.Options.SeqLength;
        for (int start = 0; start + 1 < ids.Length; start += seq)
        {
            var window = ids[start..Math.Min(ids.Length, start + seq)];
            if (window.Length < 2) break;
            s.Add(window, window, line: 1);
        }
    }

    static void LoadJsonl(LoadState s, TextTokenizer tokenizer)
    {
        foreach (var (line, doc) in JsonLines(s))
        {
            using (doc)
            {
                var root = doc.RootElement;
                if (root.ValueKind != JsonValueKind.Object) { s.Bad(line, $"expected a JSON object, got {Kind(root)}"); continue; }
                if (root.TryGetProperty("prompt", out var p) && root.TryGetProperty("completion", out var c)
                    && p.ValueKind == JsonValueKind.String && c.ValueKind == JsonValueKind.String)
                {
                    var prompt = tokenizer.Encode(p.GetString()!);
                    var completion = tokenizer.Encode(c.GetString()!).Append(tokenizer.EndOfText).ToArray();
                    var ids = prompt.Concat(completion).ToArray();
                    var labels = Enumerable.Repeat(Example.Ignore, prompt.Length).Concat(completion).ToArray();
                    s.Add(ids, labels, line);
                }
                else if (root.TryGetProperty("text", out var t) && t.ValueKind == JsonValueKind.String)
                {
                    var ids = tokenizer.Encode(t.GetString()!).Append(tokenizer.EndOfText).ToArray();
                    s.Add(ids, ids, line);
                }
                else s.Bad(line, "expected {\"prompt\",\"completion\"} or {\"text\"} with string values");
            }
        }
    }

    static void LoadTokens(LoadState s)
    {
        foreach (var (line, doc) in JsonLines(s))
        {
            using (doc)
            {
                var root = doc.RootElement;
                if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("input_ids", out var idsJson) || idsJson.ValueKind != JsonValueKind.Array)
                {
                    s.Bad(line, $"expected {{\"input_ids\":[…]}}, got {Kind(root)}");
                    continue;
                }
                if (Integers(s, line, idsJson, "input_ids") is not { } ids) continue;
                var labels = ids;
                if (root.TryGetProperty("labels", out var l))
                {
                    if (l.ValueKind != JsonValueKind.Array) { s.Bad(line, $"\"labels\" is {Kind(l)}, expected an array of integers"); continue; }
                    if (Integers(s, line, l, "labels") is not { } given) continue;
                    labels = given;
                    if (labels.Length != ids.Length) { s.Bad(line, $"labels has {labels.Length} entries, input_ids {ids.Length}"); continue; }
                }
                int cls = -1;
                if (s.Options.Task == TrainingTask.Cls)
                {
                    if (!root.TryGetProperty("label", out var c) || c.ValueKind != JsonValueKind.Number || !c.TryGetInt32(out cls) || cls < 0)
                    {
                        s.Bad(line, $"--task cls needs a non-negative integer \"label\"{(c.ValueKind == JsonValueKind.Undefined ? "" : $", got {c.GetRawText()}")}");
                        continue;
                    }
                }
                s.Add(ids, labels, line, cls);
            }
        }
    }

    static void LoadTsv(LoadState s, TextTokenizer tokenizer)
    {
        char separator = s.Path.EndsWith(".csv", StringComparison.OrdinalIgnoreCase) ? ',' : '\t';
        var rows = new List<(int Line, string Label, string Text)>();
        foreach (var (number, raw) in Lines(s.Path))
        {
            if (raw.Length == 0) continue;
            int cut = raw.IndexOf(separator);
            if (cut <= 0 || cut == raw.Length - 1) { s.Bad(number, $"expected label{(separator == '\t' ? "<TAB>" : ",")}text"); continue; }
            rows.Add((number, raw[..cut].Trim(), raw[(cut + 1)..]));
        }
        if (s.ClassNames.Count == 0) s.ClassNames = rows.Select(r => r.Label).Distinct().Order(StringComparer.Ordinal).ToList();
        var index = s.ClassNames.Select((name, i) => (name, i)).ToDictionary(x => x.name, x => x.i);
        foreach (var (line, label, text) in rows)
        {
            if (!index.TryGetValue(label, out var cls)) { s.Bad(line, $"label '{label}' is not one of {string.Join(", ", s.ClassNames)}"); continue; }
            var ids = tokenizer.Encode(text);
            s.Add(ids, ids, line, cls);
        }
    }

    /// <summary>The elements of a JSON array as int32 token ids or labels; null (the row reported bad) at the first that is not.</summary>
    static int[]? Integers(LoadState s, int line, JsonElement array, string field)
    {
        var values = new int[array.GetArrayLength()];
        int k = 0;
        foreach (var e in array.EnumerateArray())
        {
            if (e.ValueKind != JsonValueKind.Number || !e.TryGetInt32(out values[k]))
            {
                s.Bad(line, $"{field}[{k}] is {e.GetRawText()}, expected an integer token id");
                return null;
            }
            k++;
        }
        return values;
    }

    static string Kind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Object => "an object", JsonValueKind.Array => "an array", JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number", JsonValueKind.Null => "null", _ => e.ValueKind.ToString().ToLowerInvariant(),
    };

    static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>The whole file as text; invalid UTF-8 is refused with the line and byte offset where it starts.</summary>
    static string ReadText(string path)
    {
        var bytes = File.ReadAllBytes(path);
        var span = bytes.AsSpan();
        if (span.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF])) span = span[3..];
        if (!Utf8.IsValid(span))
        {
            int offset = 0;
            while (Rune.DecodeFromUtf8(span[offset..], out _, out int used) == System.Buffers.OperationStatus.Done) offset += used;
            int line = 1 + span[..offset].Count((byte)'\n');
            throw new InvalidDataException($"{path}:{line}: not valid UTF-8 (byte {offset + bytes.Length - span.Length}); save the file as UTF-8");
        }
        return StrictUtf8.GetString(span);
    }

    /// <summary>The file's lines, numbered from 1, after a strict UTF-8 check of the whole file.</summary>
    static IEnumerable<(int Line, string Text)> Lines(string path)
    {
        var text = ReadText(path);
        int number = 0;
        foreach (var raw in text.Split('\n'))
        {
            number++;
            yield return (number, raw.EndsWith('\r') ? raw[..^1] : raw);
        }
    }

    static IEnumerable<(int Line, JsonDocument Doc)> JsonLines(LoadState s)
    {
        foreach (var (number, raw) in Lines(s.Path))
        {
            if (string.IsNullOrWhiteSpace(raw)) continue;
            JsonDocument? doc = null;
            try { doc = JsonDocument.Parse(raw); }
            catch (JsonException e) { s.Bad(number, $"not valid JSON ({e.Message})"); }
            if (doc is not null) yield return (number, doc);
        }
    }

    /// <summary>Parses a --format / data.format name (text, jsonl, tokens, tsv or csv); the message names the accepted values.</summary>
    public static DataFormat ParseFormat(string name) => name.Trim().ToLowerInvariant() switch
    {
        "text" => DataFormat.Text, "jsonl" => DataFormat.Jsonl, "tokens" => DataFormat.Tokens, "tsv" or "csv" => DataFormat.Tsv,
        _ => throw new ArgumentException($"format must be text, jsonl, tokens or tsv (got '{name}')"),
    };

    /// <summary>Parses "spam,ham"-style label lists; a name given twice is refused (it would make two classes of one label).</summary>
    /// <param name="source">what the list came from, for the error (a flag such as <c>--labels</c>, or a config key)</param>
    public static IReadOnlyList<string>? ParseClassNames(string? list, string source = "labels") =>
        string.IsNullOrWhiteSpace(list) ? null : CheckUnique(list.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries), source);

    static IReadOnlyList<string>? CheckUnique(IReadOnlyList<string>? names, string source)
    {
        if (names?.GroupBy(n => n, StringComparer.Ordinal).FirstOrDefault(g => g.Count() > 1) is { } twice)
            throw new ArgumentException($"{source}: '{twice.Key}' is given {twice.Count()} times in {string.Join(",", names)}; each class needs its own label");
        return names;
    }

    internal static string Invariant(double v) => v.ToString("G6", CultureInfo.InvariantCulture);
}
