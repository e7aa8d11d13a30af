using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.Tokenizers;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>Options for <see cref="Classifier"/>.</summary>
public sealed record ClassifierOptions
{
    /// <summary>Class names, in the order of the classifier's outputs; default "0", "1", ….</summary>
    public IReadOnlyList<string>? Labels { get; init; }

    /// <summary>
    /// For a language-model head: the token ids whose logits are the classes (e.g. the ids of " no" and " yes").
    /// Null for a classification head ([batch, classes] or [batch, tokens, classes]).
    /// </summary>
    public IReadOnlyList<int>? LabelTokenIds { get; init; }

    /// <summary>
    /// Id used to pad a batch or a model with a fixed token count. Padding sits right of every row and the mask (or
    /// causal attention) keeps it from the pooled token, so any id in the vocabulary works: 0 is in every one.
    /// </summary>
    public int PadTokenId { get; init; }
}

/// <summary>A predicted class and the probabilities of all classes.</summary>
public sealed record ClassificationResult(int Label, string LabelName, IReadOnlyList<float> Probabilities);

/// <summary>
/// Classification on an <see cref="AdapterHost"/>: the logits at the last real (non-padding) token, or the model's
/// [batch, classes] output, softmaxed. Thread-safe.
/// </summary>
public sealed class Classifier
{
    readonly AdapterHost _host;
    readonly ModelSignature _signature;

    /// <param name="host">the host (not owned)</param>
    /// <param name="tokenizer">for text input; null = token ids only</param>
    public Classifier(AdapterHost host, Tokenizer? tokenizer = null, ClassifierOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(host);
        _host = host;
        Tokenizer = tokenizer;
        Options = options ?? new ClassifierOptions();
        _signature = ModelSignature.Of(host);
        if (Options.LabelTokenIds is { } ids)
        {
            if (_signature.LogitsRank != 3) throw new ArgumentException($"{host.ModelPath}: LabelTokenIds restrict language-model logits, but '{_signature.Logits}' is [batch, classes]");
            _signature.CheckIds(ids, nameof(ClassifierOptions.LabelTokenIds));
        }
        int? classes = Options.LabelTokenIds?.Count ?? _signature.LogitsWidth;
        if (Options.Labels is { } labels && classes is int n && labels.Count != n)
            throw new ArgumentException($"{labels.Count} labels given ({string.Join(", ", labels)}), the model has {n} classes");
    }

    public Tokenizer? Tokenizer { get; }
    public ClassifierOptions Options { get; }

    public ClassificationResult Classify(string text, string? adapter = null)
    {
        var tokenizer = Tokenizer ?? throw new InvalidOperationException("this classifier has no tokenizer; pass token ids");
        return Classify(tokenizer.EncodeToIds(text), adapter);
    }

    public ClassificationResult Classify(IReadOnlyList<int> ids, string? adapter = null) => ClassifyBatch([ids], adapter)[0];

    /// <summary>Classifies a batch in one run: rows are right-padded with <see cref="ClassifierOptions.PadTokenId"/>.</summary>
    public IReadOnlyList<ClassificationResult> ClassifyBatch(IReadOnlyList<IReadOnlyList<int>> rows, string? adapter = null)
    {
        ArgumentNullException.ThrowIfNull(rows);
        if (rows.Count == 0) return [];
        int longest = rows.Max(r => r.Count);
        if (rows.Any(r => r.Count == 0)) throw new ArgumentException("an input has no tokens");
        // Gather wraps a negative id around to a real token (ids past the vocabulary fail in ONNX Runtime; the logits'
        // width here may be the class count, not the vocabulary, so it cannot bound them)
        if (rows.SelectMany(r => r).FirstOrDefault(id => id < 0, 0) is < 0 and var negative)
            throw new ArgumentException($"token id {negative} is negative; token ids are ≥ 0");
        int width = _signature.FixedTokens ?? longest;
        if (longest > width) throw new ArgumentException($"an input has {longest} tokens, the model takes {width}; shorten it");
        var feeds = _signature.Feeds(rows, width, Options.PadTokenId);
        try
        {
            using var outputs = _host.Run(adapter, feeds, [_signature.Logits]);
            var shape = outputs[0].GetTensorTypeAndShape().Shape;     // [batch, classes] or [batch, tokens, C]
            var data = outputs[0].GetTensorDataAsSpan<float>();
            int c = (int)shape[^1];
            var results = new List<ClassificationResult>(rows.Count);
            for (int b = 0; b < rows.Count; b++)
            {
                int offset = shape.Length == 2 ? b * c : (b * (int)shape[1] + rows[b].Count - 1) * c;   // last real token
                var row = data.Slice(offset, c).ToArray();
                float[] logits = Options.LabelTokenIds is { } ids ? ids.Select(i => row[i]).ToArray() : row;
                results.Add(Result(logits));
            }
            return results;
        }
        finally { foreach (var v in feeds.Values) v.Dispose(); }
    }

    ClassificationResult Result(float[] logits)
    {
        double max = logits.Max();
        var e = logits.Select(l => Math.Exp(l - max)).ToArray();
        double sum = e.Sum();
        var p = e.Select(x => (float)(x / sum)).ToArray();
        int label = Sampler.ArgMax(logits);
        return new ClassificationResult(label, Options.Labels?[label] ?? label.ToString(System.Globalization.CultureInfo.InvariantCulture), p);
    }
}
