using Microsoft.ML.OnnxRuntime;
using OnnxLora.Pipeline.Data;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>Causal-LM evaluation: mean cross-entropy of the counted next tokens and its perplexity.</summary>
public sealed record LanguageModelEvaluation(double MeanLoss, long Tokens)
{
    public double Perplexity => Math.Exp(MeanLoss);
}

/// <summary>Accuracy, per-class precision/recall/F1 and the confusion matrix of a classification run.</summary>
public sealed record ClassificationEvaluation(IReadOnlyList<string> Classes, long[,] Confusion)
{
    /// <summary>Examples counted.</summary>
    public long Count { get { long n = 0; foreach (var c in Confusion) n += c; return n; } }

    public double Accuracy => Count == 0 ? 0 : Enumerable.Range(0, Classes.Count).Sum(i => Confusion[i, i]) / (double)Count;

    /// <summary>Of the examples predicted as class <paramref name="c"/>, the share that are (0 when none was predicted).</summary>
    public double Precision(int c) { long p = Column(c); return p == 0 ? 0 : Confusion[c, c] / (double)p; }

    /// <summary>Of the examples of class <paramref name="c"/>, the share predicted so (0 when the class is absent).</summary>
    public double Recall(int c) { long t = Row(c); return t == 0 ? 0 : Confusion[c, c] / (double)t; }

    public double F1(int c) { double p = Precision(c), r = Recall(c); return p + r == 0 ? 0 : 2 * p * r / (p + r); }

    /// <summary>The unweighted mean of the per-class F1.</summary>
    public double MacroF1 => Classes.Count == 0 ? 0 : Enumerable.Range(0, Classes.Count).Average(F1);

    long Row(int c) { long s = 0; for (int j = 0; j < Classes.Count; j++) s += Confusion[c, j]; return s; }
    long Column(int c) { long s = 0; for (int i = 0; i < Classes.Count; i++) s += Confusion[i, c]; return s; }

    /// <summary>Builds the confusion matrix (rows = true class, columns = predicted).</summary>
    public static ClassificationEvaluation From(IReadOnlyList<int> truth, IReadOnlyList<int> predicted, IReadOnlyList<string> classes)
    {
        if (truth.Count != predicted.Count) throw new ArgumentException($"{truth.Count} true labels but {predicted.Count} predictions");
        var m = new long[classes.Count, classes.Count];
        for (int i = 0; i < truth.Count; i++)
        {
            if ((uint)truth[i] >= classes.Count || (uint)predicted[i] >= classes.Count)
                throw new ArgumentOutOfRangeException(nameof(truth), $"example {i}: class {truth[i]} → {predicted[i]} outside the {classes.Count} classes");
            m[truth[i], predicted[i]]++;
        }
        return new ClassificationEvaluation(classes, m);
    }
}

/// <summary>Evaluates a deployed model (with an adapter or none) on a dataset; batches of right-padded examples.</summary>
public static class Evaluator
{
    /// <summary>
    /// Mean next-token cross-entropy: logits at t predict the label at t+1 (labels aligned with the ids, −100 not
    /// counted), averaged over every counted position of the dataset.
    /// </summary>
    public static LanguageModelEvaluation LanguageModel(AdapterHost host, string? adapter, Dataset data, int batchSize = 8, int padId = 0)
    {
        ArgumentNullException.ThrowIfNull(host);
        ArgumentNullException.ThrowIfNull(data);
        var signature = ModelSignature.Of(host);
        if (signature.LogitsRank != 3) throw new InvalidDataException($"{host.ModelPath}: output '{signature.Logits}' is [batch, classes]; perplexity needs [batch, tokens, vocab]");
        double total = 0;
        long counted = 0;
        foreach (var chunk in data.Examples.Chunk(Math.Max(1, batchSize)))
        {
            int width = signature.FixedTokens ?? chunk.Max(e => e.Length);
            var feeds = signature.Feeds(chunk.Select(e => (IReadOnlyList<int>)e.InputIds).ToList(), width, padId);
            try
            {
                using var outputs = host.Run(adapter, feeds, [signature.Logits]);
                var logits = outputs[0].GetTensorDataAsSpan<float>();      // [batch, tokens, vocab]
                int vocab = (int)outputs[0].GetTensorTypeAndShape().Shape[2];
                for (int b = 0; b < chunk.Length; b++)
                {
                    var e = chunk[b];
                    for (int t = 0; t + 1 < e.Length; t++)
                    {
                        int target = e.Labels[t + 1];
                        if (target == Example.Ignore) continue;
                        var row = logits.Slice((b * width + t) * vocab, vocab);
                        total += LogSumExp(row) - row[target];
                        counted++;
                    }
                }
            }
            finally { foreach (var v in feeds.Values) v.Dispose(); }
        }
        if (counted == 0) throw new InvalidDataException("no counted tokens: every label is -100 or every example has one token");
        return new LanguageModelEvaluation(total / counted, counted);
    }

    /// <summary>Classifies every example (<see cref="Example.ClassLabel"/> is the truth) and tallies the confusion matrix.</summary>
    public static ClassificationEvaluation Classification(Classifier classifier, string? adapter, Dataset data, int batchSize = 8)
    {
        ArgumentNullException.ThrowIfNull(classifier);
        ArgumentNullException.ThrowIfNull(data);
        var truth = new List<int>();
        var predicted = new List<int>();
        int classes = 0;
        foreach (var chunk in data.Examples.Chunk(Math.Max(1, batchSize)))
        {
            var results = classifier.ClassifyBatch(chunk.Select(e => (IReadOnlyList<int>)e.InputIds).ToList(), adapter);
            classes = results[0].Probabilities.Count;
            truth.AddRange(chunk.Select(e => e.ClassLabel));
            predicted.AddRange(results.Select(r => r.Label));
        }
        var names = classifier.Options.Labels ?? (data.ClassNames.Count == classes ? data.ClassNames
            : Enumerable.Range(0, classes).Select(i => i.ToString(System.Globalization.CultureInfo.InvariantCulture)).ToList());
        return ClassificationEvaluation.From(truth, predicted, names);
    }

    static double LogSumExp(ReadOnlySpan<float> x)
    {
        double max = double.NegativeInfinity;
        foreach (var v in x) max = Math.Max(max, v);
        double sum = 0;
        foreach (var v in x) sum += Math.Exp(v - max);
        return max + Math.Log(sum);
    }
}
