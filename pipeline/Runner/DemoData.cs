using System.Globalization;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Pipeline.Runner;

/// <summary>
/// The built-in default's task, generated here so the demo needs nothing from the network or outside the repository:
/// short reviews whose sentiment is carried by an opinion word somewhere in the sentence, among neutral filler. A
/// random-weight GPT cannot tell them apart; LoRA plus a small head learns to within a few steps. The held-out set
/// comes from another seed, so the eval accuracy measures generalisation to new sentences.
/// </summary>
public static class DemoData
{
    public const string Name = "sentiment";
    public static readonly string[] Labels = ["negative", "positive"];

    static readonly string[] Positive = ["great", "wonderful", "delicious", "friendly", "lovely", "excellent", "fantastic", "superb", "charming", "pleasant", "amazing", "perfect"];
    static readonly string[] Negative = ["terrible", "awful", "rude", "cold", "bland", "dirty", "horrible", "disappointing", "slow", "noisy", "boring", "broken"];
    static readonly string[] Things = ["food", "service", "staff", "room", "movie", "music", "coffee", "hotel", "show", "pizza", "book", "trip"];
    // the opinion word sits near the end of most templates, where a small random model can pick it up quickly
    static readonly string[] Templates =
    [
        "The {0} was {1}.", "Honestly, the {0} was {1}.", "I thought the {0} was {1} and the {2} was {3}.", "What a {1} {0}!",
        "Our {0} was {1}, really {4}.",
    ];

    /// <summary>Writes train.tsv and eval.tsv (label&lt;TAB&gt;text) into <paramref name="dir"/>.</summary>
    public static (string Train, string Eval) Write(string dir, int trainRows = 400, int evalRows = 96)
    {
        Directory.CreateDirectory(dir);
        var train = Path.Combine(dir, "train.tsv");
        var eval = Path.Combine(dir, "eval.tsv");
        AtomicFile.WriteAllText(train, string.Concat(Rows(trainRows, seed: 11).Select(r => $"{r.Label}\t{r.Text}\n")));
        AtomicFile.WriteAllText(eval, string.Concat(Rows(evalRows, seed: 29).Select(r => $"{r.Label}\t{r.Text}\n")));
        return (train, eval);
    }

    /// <summary>Deterministic rows for a seed, each label drawn at random.</summary>
    public static IEnumerable<(string Label, string Text)> Rows(int count, int seed)
    {
        var rng = new Random(seed);
        for (int i = 0; i < count; i++)
        {
            bool positive = rng.Next(2) == 1;
            var words = positive ? Positive : Negative;
            string Word() => words[rng.Next(words.Length)];
            string Thing() => Things[rng.Next(Things.Length)];
            var text = string.Format(CultureInfo.InvariantCulture, Templates[rng.Next(Templates.Length)], Thing(), Word(), Thing(), Word(), Word());
            yield return (positive ? "positive" : "negative", text);
        }
    }

    /// <summary>The config of the built-in default (also examples/default.yaml).</summary>
    public const string DefaultConfig = """
        # The built-in default of `onnxlora run`: a small GPT (random weights) learns a sentiment task that the project
        # generates, with LoRA on every linear layer and a trained classification head.
        run_dir: runs/default
        model:
          preset: small
          seed: 0
        lora:
          targets: all-linear
          rank: 8
          alpha: 16
        data:
          generate: sentiment
          task: cls
          seq: 48
        train:
          optimizer: adamw
          lr: 5e-3
          warmup: 5
          epochs: 3
          batch: 16
          eval_every: 30
          seed: 13
        export:
          formats: [onnx-adapter, peft, merged]
        evaluate:
          examples: 6
        """;
}
