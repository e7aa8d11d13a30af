using Microsoft.ML.OnnxRuntime;
using OnnxLora.Pipeline.Data;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>Causal-LM evaluation: mean cross-entropy of the counted next tokens and its perplexity.</summary>
public sealed record LanguageModelEvaluation(double MeanLoss, long Tokens)
{
    public double Perplexity => Math.Exp(MeanLoss);
}

/// <summary>
/// The one running tally of a loss over batches: each batch's mean loss weighted by what it averaged over (counted
/// target tokens for a language model, rows for a classifier), so that the total is the mean over the whole dataset
/// whatever the batching. The trainer's eval, the runner and <see cref="Evaluator"/> all score with it.
/// </summary>
public struct LossTally
{
    public double Sum { get; private set; }
    public double Weight { get; private set; }

    /// <summary>Adds a batch whose mean loss is <paramref name="meanLoss"/> over <paramref name="weight"/> counted items.</summary>
    public void Add(double meanLoss, double weight) { Sum += meanLoss * weight; Weight += weight; }

    public readonly double Mean => Weight > 0 ? Sum / Weight : double.NaN;

    /// <summary>Combines the sums of several processes (data parallel): <paramref name="sum"/> and <paramref name="weight"/> already totalled.</summary>
    public static LossTally From(double sum, double weight) => new() { Sum = sum, Weight = weight };
}

/// <summary>Accuracy, per-class precision/recall/F1 and the confusion matrix of a classification run.</summary>
public sealed record ClassificationEvaluation(IReadOnlyList<string> Classes, long[,] Confusion)
{
    /// <summary>The mean cross-entropy of the true classes (softmax of the class logits), when scored from probabilities.</summary>
    public double? MeanLoss { get; init; }

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
        var loss = new LossTally();
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
                        loss.Add(LogSumExp(row) - row[target], 1);
                    }
                }
            }
            finally { foreach (var v in feeds.Values) v.Dispose(); }
        }
        if (loss.Weight == 0) throw new InvalidDataException("no counted tokens: every label is -100 or every example has one token");
        return new LanguageModelEvaluation(loss.Mean, (long)loss.Weight);
    }

    /// <summary>Classifies every example (<see cref="Example.ClassLabel"/> is the truth) and tallies the confusion matrix.</summary>
    public static ClassificationEvaluation Classification(Classifier classifier, string? adapter, Dataset data, int batchSize = 8)
    {
        ArgumentNullException.ThrowIfNull(classifier);
        ArgumentNullException.ThrowIfNull(data);
        var truth = new List<int>();
        var predicted = new List<int>();
        var loss = new LossTally();
        int classes = 0;
        foreach (var chunk in data.Examples.Chunk(Math.Max(1, batchSize)))
        {
            var results = classifier.ClassifyBatch(chunk.Select(e => (IReadOnlyList<int>)e.InputIds).ToList(), adapter);
            classes = results[0].Probabilities.Count;
            truth.AddRange(chunk.Select(e => e.ClassLabel));
            predicted.AddRange(results.Select(r => r.Label));
            for (int i = 0; i < chunk.Length; i++)
                if ((uint)chunk[i].ClassLabel < (uint)classes) loss.Add(-Math.Log(Math.Max(results[i].Probabilities[chunk[i].ClassLabel], 1e-30)), 1);
        }
        var names = classifier.Options.Labels ?? (data.ClassNames.Count == classes ? data.ClassNames
            : Enumerable.Range(0, classes).Select(i => i.ToString(System.Globalization.CultureInfo.InvariantCulture)).ToList());
        return ClassificationEvaluation.From(truth, predicted, names) with { MeanLoss = loss.Mean };
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
