using Microsoft.ML.OnnxRuntime;
using OnnxLora.Pipeline.Deployment;

namespace OnnxLora.Tests.Deployment;

public class GenerationTests
{
    static string TorchFixture(string name) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "torch", name);

    static float[] LastLogits(AdapterHost host, IReadOnlyList<int> ids)
    {
        using var input = OrtValue.CreateTensorValueFromMemory(ids.Select(i => (long)i).ToArray(), [1, ids.Count]);
        using var outputs = host.Run(null, new Dictionary<string, OrtValue> { ["input_ids"] = input }, ["logits"]);
        var all = outputs[0].GetTensorDataAsSpan<float>();
        int vocab = all.Length / ids.Count;
        return all.Slice((ids.Count - 1) * vocab, vocab).ToArray();
    }

    [Test]
    public void Greedy_generation_on_token_ids_is_deterministic_and_follows_the_argmax()
    {
        using var host = AdapterHost.Create(TorchFixture("hf_gpt2_conv1d_opset14.onnx"));     // vocab 128: ids only
        var generator = new TextGenerator(host);
        int[] prompt = [47, 68, 25, 118];
        var options = new GenerationOptions { MaxNewTokens = 6 };
        var a = generator.Generate(prompt, options);
        Assert.That(a.TokenIds, Has.Count.EqualTo(6));
        Assert.That(a.StopReason, Is.EqualTo("max_new_tokens"));
        Assert.That(a.Text, Is.Null);
        Assert.That(generator.Generate(prompt, options).TokenIds, Is.EqualTo(a.TokenIds));
        // each token is the argmax of the logits at the end of the growing sequence
        var seq = prompt.ToList();
        foreach (var id in a.TokenIds)
        {
            Assert.That(id, Is.EqualTo(Sampler.ArgMax(LastLogits(host, seq))));
            seq.Add(id);
        }
        var stopped = generator.Generate(prompt, options with { StopTokenIds = [a.TokenIds[2]] });
        Assert.That(stopped.TokenIds, Is.EqualTo(a.TokenIds.Take(a.TokenIds.ToList().IndexOf(a.TokenIds[2]))));
        Assert.That(stopped.StopReason, Is.EqualTo("stop_token"));
        var bad = Assert.Throws<ArgumentOutOfRangeException>(() => generator.Generate([5, 500], options))!;
        Assert.That(bad.Message, Does.Contain("token id 500").And.Contain("128"));
    }

    [Test]
    public void Seeded_sampling_is_reproducible_and_the_context_window_slides()
    {
        using var host = AdapterHost.Create(TorchFixture("hf_gpt2_conv1d_opset14.onnx"));     // 32 positions
        var generator = new TextGenerator(host);
        var options = new GenerationOptions
        {
            MaxNewTokens = 30, ContextLength = 16,
            Sampling = new SamplingOptions { Temperature = 1.5, TopK = 50, TopP = 0.95, Seed = 7 },
        };
        int[] prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        var a = generator.Generate(prompt, options);
        Assert.That(a.TokenIds, Has.Count.EqualTo(30), "40 tokens run through a 32-position model with a 16-token window");
        Assert.That(generator.Generate(prompt, options).TokenIds, Is.EqualTo(a.TokenIds));
        var other = generator.Generate(prompt, options with { Sampling = options.Sampling with { Seed = 8 } });
        Assert.That(other.TokenIds, Is.Not.EqualTo(a.TokenIds));
        Assert.That(generator.Generate(prompt, options with { Sampling = SamplingOptions.Greedy }).TokenIds, Is.Not.EqualTo(a.TokenIds));
    }

    [Test]
    public void The_builders_position_count_bounds_the_context_by_default()
    {
        // tiny (vocab 512, 64 positions; the builder records n_positions in the model's metadata)
        using var host = AdapterHost.Create(Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "tiny.onnx"));
        var generator = new TextGenerator(host);
        var prompt = Enumerable.Range(0, 60).Select(i => i * 7 % 512).ToArray();
        var result = generator.Generate(prompt, new GenerationOptions { MaxNewTokens = 10 });
        Assert.That(result.TokenIds, Has.Count.EqualTo(10), "70 tokens through a 64-position model: the window slides");
        var unbounded = Assert.Throws<InvalidOperationException>(() => generator.Generate(prompt, new GenerationOptions { MaxNewTokens = 10, ContextLength = 100 }))!;
        Assert.That(unbounded.Message, Does.Contain("tiny.onnx"));
    }

    [Test]
    public void Text_generation_with_the_gpt2_tokenizer_stops_at_a_stop_sequence()
    {
        using var dir = new TempDir();
        using var host = AdapterHost.Create(BigramModel.Write(dir.File("lm.onnx"), vocab: 50257, width: 50257));
        var generator = new TextGenerator(host, TextGenerator.Gpt2Tokenizer());
        Assert.That(generator.Tokenizer!.EncodeToIds("Hello, world!"), Is.EqualTo(new[] { 15496, 11, 995, 0 }));
        var options = new GenerationOptions { MaxNewTokens = 8 };
        var full = generator.Generate("Hello, world!", options);
        Assert.That(full.Text, Is.EqualTo(generator.Tokenizer.Decode(full.TokenIds)));
        Assert.That(full.Text, Has.Length.GreaterThan(4));
        // stop at a piece of what greedy generation produces: the text is cut before it
        var stop = full.Text!.Substring(full.Text.Length / 2, 2);
        var cut = generator.Generate("Hello, world!", options with { StopSequences = [stop] });
        Assert.That(cut.StopReason, Is.EqualTo("stop_sequence"));
        Assert.That(cut.Text, Is.EqualTo(full.Text[..full.Text.IndexOf(stop, StringComparison.Ordinal)]));
        Assert.That(full.Text, Does.StartWith(cut.Text!));
    }
}

public class ClassifierTests
{
    [Test]
    public void Batch_classification_uses_the_last_real_token_of_each_padded_row()
    {
        using var dir = new TempDir();
        using var host = AdapterHost.Create(BigramModel.Write(dir.File("cls.onnx"), vocab: 64, width: 3));
        var classifier = new Classifier(host, options: new ClassifierOptions { Labels = ["neg", "neutral", "pos"], PadTokenId = 0 });
        IReadOnlyList<int>[] rows = [[5, 9, 12], [7], [3, 3, 3, 3, 40]];
        var batch = classifier.ClassifyBatch(rows);
        for (int i = 0; i < rows.Length; i++)
        {
            var single = classifier.Classify(rows[i]);     // no padding
            Assert.That(batch[i].Probabilities, Is.EqualTo(single.Probabilities).Within(1e-6), $"row {i}");
            Assert.That(batch[i].Label, Is.EqualTo(single.Label));
            Assert.That(batch[i].Probabilities.Sum(), Is.EqualTo(1).Within(1e-5));
            Assert.That(batch[i].LabelName, Is.EqualTo(new[] { "neg", "neutral", "pos" }[batch[i].Label]));
            Assert.That(batch[i].Label, Is.EqualTo(batch[i].Probabilities.ToList().IndexOf(batch[i].Probabilities.Max())));
        }
        // the bigram head only sees the last token: rows ending in the same token agree, others differ
        Assert.That(classifier.Classify([1, 2, 40]).Probabilities, Is.EqualTo(batch[2].Probabilities).Within(1e-6));
        Assert.That(batch[0].Probabilities, Is.Not.EqualTo(batch[1].Probabilities));
    }

    [Test]
    public void Language_model_logits_restricted_to_label_tokens_and_a_fixed_width_model()
    {
        using var dir = new TempDir();
        using var host = AdapterHost.Create(BigramModel.Write(dir.File("lm.onnx"), vocab: 50257, width: 50257, fixedTokens: 12));
        var tokenizer = TextGenerator.Gpt2Tokenizer();
        int no = tokenizer.EncodeToIds(" no").Single(), yes = tokenizer.EncodeToIds(" yes").Single();
        var classifier = new Classifier(host, tokenizer, new ClassifierOptions { LabelTokenIds = [no, yes], Labels = ["ham", "spam"] });
        var r = classifier.Classify("Win a free prize now");
        Assert.That(r.Probabilities, Has.Count.EqualTo(2));
        // reference: the full LM logits at the last real token, restricted to the two ids and softmaxed
        var ids = tokenizer.EncodeToIds("Win a free prize now").Select(i => (long)i).Concat(Enumerable.Repeat(50256L, 12)).Take(12).ToArray();
        using var input = OrtValue.CreateTensorValueFromMemory(ids, [1, 12]);
        using var outputs = host.Run(null, new Dictionary<string, OrtValue> { ["input_ids"] = input });
        int last = tokenizer.EncodeToIds("Win a free prize now").Count - 1;
        var logits = outputs[0].GetTensorDataAsSpan<float>().Slice(last * 50257, 50257).ToArray();
        double pYes = 1 / (1 + Math.Exp(logits[no] - logits[yes]));
        Assert.That(r.Probabilities[1], Is.EqualTo(pYes).Within(1e-5));
        Assert.That(Assert.Throws<ArgumentException>(() => classifier.Classify(string.Join(" ", Enumerable.Repeat("word", 20))))!.Message, Does.Contain("takes 12"));
        Assert.That(Assert.Throws<ArgumentException>(() => _ = new Classifier(host, tokenizer, new ClassifierOptions { LabelTokenIds = [no, yes], Labels = ["a"] }))!.Message,
            Does.Contain("2 classes"));
    }
}
