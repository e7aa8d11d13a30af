using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Training;

public class PackingTests
{
    const int Seq = 64;

    // example k's tokens are k·1000 + t, so a packed row can be read back into the examples it holds
    static Dataset ShortExamples(int count, int seed)
    {
        var rng = new Random(seed);
        var examples = Enumerable.Range(0, count).Select(k =>
        {
            int n = rng.Next(1, 40), prompt = rng.Next(0, n);
            var ids = Enumerable.Range(0, n).Select(t => k * 1000 + t).ToArray();
            return new Example(ids, ids.Select((id, t) => t < prompt ? Example.Ignore : id).ToArray());
        }).ToList();
        return new Dataset(examples, TrainingTask.Lm, 0, 0, []);
    }

    // what the LM loss scores: (input at t−1, label at t) for every t ≥ 1 whose label counts
    static IEnumerable<(int, int)> Targets(Example e) =>
        Enumerable.Range(1, e.Length - 1).Where(t => e.Labels[t] != Example.Ignore).Select(t => (e.InputIds[t - 1], e.Labels[t]));

    [Test]
    public void PackingKeepsEveryTokenAndTargetOnceInFewerRows()
    {
        var ds = ShortExamples(300, 5);
        var packed = SequencePacker.Pack(ds, Seq, seed: 7, shuffle: true);

        Assert.That(packed.Examples.Select(e => e.Length), Is.All.LessThanOrEqualTo(Seq));
        Assert.That(packed.Examples.SelectMany(e => e.InputIds).Order(), Is.EqualTo(ds.Examples.SelectMany(e => e.InputIds).Order()));
        // no target crosses from one example into the next, and none is lost
        Assert.That(packed.Examples.SelectMany(Targets).Order(), Is.EqualTo(ds.Examples.SelectMany(Targets).Order()));
        foreach (var row in packed.Examples)
            for (int t = 1; t < row.Length; t++)
                if (row.InputIds[t] / 1000 == row.InputIds[t - 1] / 1000)
                    Assert.That(row.InputIds[t], Is.EqualTo(row.InputIds[t - 1] + 1), "an example stays whole and in order");
                else
                    Assert.That(row.InputIds[t] % 1000, Is.EqualTo(0), "the next example starts at its first token");

        Assert.That(packed.Examples.Count, Is.LessThan(ds.Examples.Count / 2));
        long real = ds.TokenCount;
        Assert.That(Padded(packed), Is.LessThan(Padded(ds)));
        Assert.That(Padded(packed), Is.LessThan(real * 1.15), "best fit leaves little room at the rows' ends");
    }

    static long Padded(Dataset ds)
    {
        var b = new Batcher(ds, 8, 0, shuffle: true, seed: 3);
        var order = b.Order(0);
        return Enumerable.Range(0, b.BatchesPerEpoch).Sum(i => { var x = b.Get(0, i, order); return (long)x.BatchSize * x.SeqLength; });
    }

    [Test]
    public void PackingIsAFunctionOfTheSeed()
    {
        var ds = ShortExamples(120, 9);
        static string Key(Dataset d) => string.Join("|", d.Examples.Select(e => string.Join(",", e.InputIds)));
        Assert.That(Key(SequencePacker.Pack(ds, Seq, 7, true)), Is.EqualTo(Key(SequencePacker.Pack(ds, Seq, 7, true))));
        Assert.That(Key(SequencePacker.Pack(ds, Seq, 7, true)), Is.Not.EqualTo(Key(SequencePacker.Pack(ds, Seq, 8, true))));
        Assert.That(Key(SequencePacker.Pack(ds, Seq, 7, false)), Is.EqualTo(Key(SequencePacker.Pack(ds, Seq, 8, false))), "file order ignores the seed");
    }

    [Test]
    public void FullWindowsAndLongExamplesAreLeftAlone()
    {
        // text cut into --seq windows: every window is a full row; the short tail stays last with shuffling off
        var windows = Enumerable.Range(0, 5).Select(k => Enumerable.Range(k * Seq, k < 4 ? Seq : 10).ToArray())
                                            .Select(ids => new Example(ids, ids)).ToList();
        var text = new Dataset(windows, TrainingTask.Lm, 0, 0, []);
        Assert.That(SequencePacker.Pack(text, Seq, 7, shuffle: false).Examples, Is.EqualTo(windows));

        var ids = Enumerable.Range(0, Seq + 5).ToArray();
        var longOne = new Dataset([new Example(ids, ids), new Example([1, 2], [1, 2])], TrainingTask.Lm, 0, 0, []);
        var packed = SequencePacker.Pack(longOne, Seq, 7, shuffle: false).Examples;
        Assert.That(packed, Has.Count.EqualTo(2));
        Assert.That(packed[0].InputIds, Is.EqualTo(ids), "never split, never joined");
    }

    [Test]
    public void PackingOffLeavesTheRunSettingsAsBefore()
    {
        // train_config.json (and so the resume hash) of an unpacked run has no "pack": runs started before it resume
        var plain = new TrainOptions { ModelDir = "m", DataPath = "d", OutDir = "o" };
        var packed = plain with { Pack = true };
        Assert.That(plain.ToJson(), Does.Not.Contain("pack"));
        Assert.That(packed.ToJson(), Does.Contain("\"pack\": true"));
        Assert.That(packed.NumericsHash(), Is.Not.EqualTo(plain.NumericsHash()), "resuming with another --pack is refused");
    }

    [Test]
    public void ClassificationIsRefused()
    {
        var cls = new Dataset([new Example([1, 2], [1, 2], ClassLabel: 0)], TrainingTask.Cls, 0, 0, ["a", "b"]);
        Assert.That(() => SequencePacker.Pack(cls, Seq, 7, true), Throws.ArgumentException.With.Message.Contains("--pack"));
    }
}
