using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.Pipeline.Data;

namespace OnnxLora.Tests.Training;

public class DataTests
{
    [Test]
    public void Gpt2TokenizerWorksOffline()
    {
        Assert.That(TextTokenizer.Gpt2.Encode("Hello, world!"), Is.EqualTo(new[] { 15496, 11, 995, 0 }));
        Assert.That(TextTokenizer.Gpt2.Decode([15496, 11, 995, 0]), Is.EqualTo("Hello, world!"));
    }

    [Test]
    public void PromptCompletionCountsOnlyTheCompletion()
    {
        using var dir = new TempDir();
        var path = dir.File("d.jsonl");
        File.WriteAllText(path, "{\"prompt\":\"Q: 2+2?\",\"completion\":\" A: 4\"}\n\n{\"text\":\"hello there\"}\n");
        var ds = DatasetLoader.Load(path, new DatasetOptions { Format = DataFormat.Jsonl, SeqLength = 64 });
        Assert.That(ds.Examples, Has.Count.EqualTo(2));
        var e = ds.Examples[0];
        int prompt = TextTokenizer.Gpt2.Encode("Q: 2+2?").Length;
        Assert.That(e.Labels[..prompt], Is.All.EqualTo(Example.Ignore));
        Assert.That(e.Labels[prompt..], Is.EqualTo(e.InputIds[prompt..]));
        Assert.That(e.InputIds[^1], Is.EqualTo(TextTokenizer.Gpt2.EndOfText));
    }

    [Test]
    public void MalformedRowNamesFileAndLineOrIsSkipped()
    {
        using var dir = new TempDir();
        var path = dir.File("bad.jsonl");
        File.WriteAllText(path, "{\"text\":\"ok\"}\n{\"text\": 3}\nnot json\n");
        var e = Assert.Throws<InvalidDataException>(() => DatasetLoader.Load(path, new DatasetOptions { Format = DataFormat.Jsonl }));
        Assert.That(e!.Message, Does.Contain("bad.jsonl:2"));
        var ds = DatasetLoader.Load(path, new DatasetOptions { Format = DataFormat.Jsonl, SkipBadRows = true });
        Assert.That((ds.Examples.Count, ds.SkippedRows), Is.EqualTo((1, 2)));
    }

    [Test]
    public void TsvClassificationTruncatesFromTheFrontAndMapsLabels()
    {
        using var dir = new TempDir();
        var path = dir.File("sms.tsv");
        File.WriteAllText(path, "ham\tsee you at noon\nspam\tWIN a free prize now, call 0800 now now now now now\n");
        var ds = DatasetLoader.Load(path, new DatasetOptions { Format = DataFormat.Tsv, Task = TrainingTask.Cls, SeqLength = 5 });
        Assert.That(ds.ClassNames, Is.EqualTo(new[] { "ham", "spam" }));
        Assert.That(ds.Examples.Select(x => x.ClassLabel), Is.EqualTo(new[] { 0, 1 }));
        Assert.That(ds.Truncated, Is.EqualTo(1));
        var full = TextTokenizer.Gpt2.Encode("WIN a free prize now, call 0800 now now now now now");
        Assert.That(ds.Examples[1].InputIds, Is.EqualTo(full[^5..]));
    }

    [Test]
    public void TokenIdsOutsideTheVocabularyAreRefused()
    {
        using var dir = new TempDir();
        var path = dir.File("t.jsonl");
        File.WriteAllText(path, "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,600]}\n");
        var e = Assert.Throws<InvalidDataException>(() => DatasetLoader.Load(path, new DatasetOptions { Format = DataFormat.Tokens, VocabSize = 512 }));
        Assert.That(e!.Message, Does.Contain("t.jsonl:2").And.Contain("600"));
    }

    /// <summary>Length bucketing: every example once per epoch, batches of similar lengths, deterministic, shuffled batch order.</summary>
    [Test]
    public void BucketByLengthGroupsSimilarLengthsDeterministically()
    {
        var rng = new Random(5);
        var lengths = Enumerable.Range(0, 1000).Select(_ => rng.Next(1, 200)).ToArray();
        var examples = lengths.Select(n => new Example(new int[n], new int[n])).ToList();
        var ds = new Dataset(examples, TrainingTask.Lm, 0, 0, []);
        var bucketed = new Batcher(ds, 8, 0, shuffle: true, seed: 7, bucketByLength: true);
        var plain = new Batcher(ds, 8, 0, shuffle: true, seed: 7);
        var order = bucketed.Order(0);
        Assert.That(order.Order(), Is.EqualTo(Enumerable.Range(0, 1000)), "each example once");
        Assert.That(order, Is.EqualTo(new Batcher(ds, 8, 0, true, 7, true).Order(0)), "a function of (seed, epoch)");
        Assert.That(order, Is.Not.EqualTo(bucketed.Order(1)));
        long Padded(Batcher b, int[] o) => Enumerable.Range(0, b.BatchesPerEpoch).Sum(i => { var x = b.Get(0, i, o); return (long)x.BatchSize * x.SeqLength; });
        long real = lengths.Sum();
        // uniform lengths 1..199 in batches of 8: padding to the batch maximum nearly doubles the tokens (E[max of 8] ≈ 8/9·200);
        // sorted windows of 400 leave consecutive lengths within ~4 of each other
        Assert.That(Padded(plain, plain.Order(0)), Is.GreaterThan(1.5 * real));
        Assert.That(Padded(bucketed, order), Is.LessThan(1.1 * real));
        // the batch order is shuffled: lengths do not fall batch by batch through a window
        var firstBatchMax = Enumerable.Range(0, 10).Select(i => bucketed.Get(0, i, order).SeqLength).ToArray();
        Assert.That(firstBatchMax, Is.Not.Ordered.Descending);
        // shuffle off: file order within windows sorted, longest first, batches in window order
        var fileOrder = new Batcher(ds, 8, 0, shuffle: false, 7, bucketByLength: true).Order(0);
        Assert.That(fileOrder.Take(400).Select(i => lengths[i]), Is.Ordered.Descending);
    }

    [Test]
    public void BatchesPadToTheLongestAndShuffleDeterministically()
    {
        var examples = Enumerable.Range(1, 10).Select(n => new Example(Enumerable.Range(0, n).ToArray(), Enumerable.Range(0, n).ToArray())).ToList();
        var ds = new Dataset(examples, TrainingTask.Lm, 0, 0, []);
        var a = new Batcher(ds, 4, padTokenId: 99, shuffle: true, seed: 7);
        var b = new Batcher(ds, 4, padTokenId: 99, shuffle: true, seed: 7);
        Assert.That(a.Order(0), Is.EqualTo(b.Order(0)));
        Assert.That(a.Order(0), Is.Not.EqualTo(a.Order(1)));
        Assert.That(a.Order(0).Order(), Is.EqualTo(Enumerable.Range(0, 10)));
        Assert.That(new Batcher(ds, 4, 99, shuffle: false, 7).Order(3), Is.EqualTo(Enumerable.Range(0, 10)));

        var batch = Batcher.Pad([examples[0], examples[2]], 99);
        Assert.That((batch.BatchSize, batch.SeqLength), Is.EqualTo((2, 3)));
        Assert.That(batch.InputIds, Is.EqualTo(new long[] { 0, 99, 99, 0, 1, 2 }));
        Assert.That(batch.Labels, Is.EqualTo(new long[] { 0, -100, -100, 0, 1, 2 }));
        Assert.That(batch.Lengths, Is.EqualTo(new long[] { 1, 3 }));
        Assert.That(a.BatchesPerEpoch, Is.EqualTo(3));
    }
}
