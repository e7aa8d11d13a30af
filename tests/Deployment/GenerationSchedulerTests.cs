using System.Text;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// Continuous batching: requests served together by <see cref="GenerationScheduler"/> get exactly what each gets alone
/// from <see cref="TextGenerator.Generate(IReadOnlyList{int}, GenerationOptions, string?)"/> — different prompts,
/// lengths and options, two adapters, greedy and seeded sampling, requests that join mid-decode or are cancelled — on
/// models with a cache (with mask and positions, or without them) and without one.
/// </summary>
public class GenerationSchedulerTests
{
    static string Fixture(string path) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", path);

    const string NoMaskModel = "optimum GPT-2 with past, mask and positions computed inside";
    const string StackedCacheModel = "optimum GPT-2 with past.{i} caches [2, batch, heads, past, head_dim]";

    public static IEnumerable<TestCaseData> Models()
    {
        // model, LoRA targets, has a cache, rows of different lengths share a run
        yield return new TestCaseData("optimum/gpt2_opset17_with_past.onnx", "c_attn,c_fc", true, true);
        yield return new TestCaseData("llama/llama_opset17_with_past.onnx", "q_proj,v_proj,down_proj", true, true);
        yield return new TestCaseData(NoMaskModel, "c_attn,c_fc", true, false);
        yield return new TestCaseData(StackedCacheModel, "c_attn,c_proj", true, true);
        yield return new TestCaseData("optimum/gpt2_opset17.onnx", "c_attn,c_fc", false, true);      // no cache, left padding
        yield return new TestCaseData("tiny.onnx", "c_attn,c_proj", false, true);                    // no cache, no mask: right padding
    }

    [TestCaseSource(nameof(Models))]
    public async Task ConcurrentRequestsGetWhatEachGetsAlone(string model, string targets, bool cached, bool pads)
    {
        using var dir = new TempDir();
        using var host = DeployTwoAdapters(ModelPath(model, dir), targets, dir);
        var generator = new TextGenerator(host);
        Assert.That(generator.HasCache, Is.EqualTo(cached));
        var requests = Mix(generator);
        var alone = requests.Select(r => generator.Generate(r.PromptIds, r.Options, r.Adapter)).ToList();
        Assert.That(alone[1].TokenIds, Is.Not.EqualTo(generator.Generate(requests[1].PromptIds, requests[1].Options).TokenIds), "adapter 'a' changes the tokens");
        Assert.That(alone[4].TokenIds, Is.Not.EqualTo(generator.Generate(requests[4].PromptIds, requests[4].Options, "a").TokenIds), "'a' and 'b' differ");

        await using var scheduler = new GenerationScheduler(generator, new SchedulerOptions { MaxBatch = 3 });
        var streams = requests.Select(r => scheduler.Generate(r)).ToList();       // all queued before any is read
        var served = await Task.WhenAll(streams.Select(s => Collect(s)));
        for (int i = 0; i < requests.Count; i++) AssertSame(served[i], alone[i], $"{model}, request {i}");
        if (pads) Assert.That(scheduler.Runs, Is.LessThan(scheduler.GeneratedTokens), "rows were decoded together (fewer runs than tokens)");
        Assert.That((scheduler.Running, scheduler.QueueDepth), Is.EqualTo((0, 0)));
        Assert.That(scheduler.GeneratedTokens, Is.EqualTo(alone.Sum(r => r.TokenIds.Count)));
    }

    /// <summary>
    /// Prompts of several lengths; greedy and seeded sampling; a stop token; a sliding window (its own uncached lane);
    /// the cache turned off; base, 'a' and 'b'. Ids stay below 128, the smallest vocabulary here.
    /// </summary>
    static List<GenerationRequest> Mix(TextGenerator generator)
    {
        var greedy = new GenerationOptions { MaxNewTokens = 9 };
        SamplingOptions Sampled(int seed) => new() { Temperature = 0.9, TopK = 20, TopP = 0.95, Seed = seed };
        int[] stopPrompt = [64, 65, 66];
        var stopAt = generator.Generate(stopPrompt, greedy, "a").TokenIds[3];
        return
        [
            new([5, 17, 99, 3, 42, 8, 11], greedy, null),
            new([7], greedy with { MaxNewTokens = 12 }, "a"),
            new([120, 1, 33], new GenerationOptions { MaxNewTokens = 6, Sampling = Sampled(11) }, "b"),
            new([9, 30, 2, 77], new GenerationOptions { MaxNewTokens = 10, Sampling = Sampled(12) }, "a"),
            new([41, 5], greedy with { MaxNewTokens = 4 }, "b"),
            new(stopPrompt, greedy with { StopTokenIds = [stopAt] }, "a"),
            new([3, 1, 4, 1, 5], greedy with { MaxNewTokens = 7, ContextLength = 6 }, "a"),
            new([8, 8], new GenerationOptions { MaxNewTokens = 11, Sampling = Sampled(13), UseCache = false }, null),
            new([100, 2], new GenerationOptions { MaxNewTokens = 5, Sampling = Sampled(14) }, "a"),
        ];
    }

    [Test]
    public async Task ARequestThatJoinsMidDecodeGetsWhatItGetsAlone()
    {
        using var dir = new TempDir();
        using var host = DeployTwoAdapters(Fixture("optimum/gpt2_opset17_with_past.onnx"), "c_attn,c_fc", dir);
        var generator = new TextGenerator(host);
        GenerationRequest first = new([5, 17, 99, 3, 42, 8, 11], new GenerationOptions { MaxNewTokens = 16 }, "a"),
            joiner = new([7, 2], new GenerationOptions { MaxNewTokens = 6, Sampling = new SamplingOptions { Temperature = 0.8, Seed = 3 } }, "a"),
            other = new([120, 1, 33], new GenerationOptions { MaxNewTokens = 5 }, "b");
        var alone = new[] { first, joiner, other }.Select(r => generator.Generate(r.PromptIds, r.Options, r.Adapter)).ToList();

        await using var scheduler = new GenerationScheduler(generator, new SchedulerOptions { MaxBatch = 4 });
        var pace = new Pacer(scheduler);
        var firstEvents = new List<GeneratedToken>();
        var stream = scheduler.Generate(first).GetAsyncEnumerator();
        pace.WaitHeld();
        pace.Turns(2);                                                // prefill + step, step: 3 tokens
        for (int i = 0; i < 3; i++)
        {
            Assert.That(await stream.MoveNextAsync(), Is.True);
            firstEvents.Add(stream.Current);
        }
        Assert.That(firstEvents.Select(e => e.FinishReason), Is.All.Null, "the first request is mid-decode");
        var joined = Collect(scheduler.Generate(joiner));
        var beside = Collect(scheduler.Generate(other));
        pace.Free();
        while (await stream.MoveNextAsync()) firstEvents.Add(stream.Current);
        await stream.DisposeAsync();

        AssertSame(ToServed(firstEvents), alone[0], "the running request");
        AssertSame(await joined, alone[1], "the request that joined mid-decode");
        AssertSame(await beside, alone[2], "a request with another adapter");
        // alone: 16 + 6 + 5 runs; the joiner's steps ride on the first request's runs
        Assert.That(scheduler.Runs, Is.LessThan(16 + 6 + 5), "the joiner was decoded in the running batch");
    }

    /// <summary>Two adapters' lanes take turns: after four turns each request has its two turns' tokens and no more.</summary>
    [Test]
    public async Task LanesOfDifferentAdaptersTakeTurns()
    {
        using var dir = new TempDir();
        using var host = DeployTwoAdapters(Fixture("optimum/gpt2_opset17_with_past.onnx"), "c_attn", dir);
        var generator = new TextGenerator(host);
        GenerationRequest[] requests = [new([5, 17, 99], new GenerationOptions { MaxNewTokens = 12 }, "a"), new([7, 2], new GenerationOptions { MaxNewTokens = 12 }, "b")];
        await using var scheduler = new GenerationScheduler(generator);
        var pace = new Pacer(scheduler);
        var streams = requests.Select(r => scheduler.Generate(r).GetAsyncEnumerator()).ToList();
        var events = streams.Select(_ => new List<GeneratedToken>()).ToList();
        pace.WaitHeld();
        pace.Turns(4);                                                // per lane: prefill + step, then a step
        var pending = new List<ValueTask<bool>>();
        for (int r = 0; r < 2; r++)
        {
            for (int i = 0; i < 3; i++)
            {
                Assert.That(await streams[r].MoveNextAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)), Is.True, $"request {r} had its turns");
                events[r].Add(streams[r].Current);
            }
            pending.Add(streams[r].MoveNextAsync());
            Assert.That(pending[r].IsCompleted, Is.False, $"request {r} got no more than its turns while the loop is held");
        }
        pace.Free();
        for (int r = 0; r < 2; r++)
        {
            if (await pending[r]) events[r].Add(streams[r].Current);
            while (await streams[r].MoveNextAsync()) events[r].Add(streams[r].Current);
            await streams[r].DisposeAsync();
            AssertSame(ToServed(events[r]), generator.Generate(requests[r].PromptIds, requests[r].Options, requests[r].Adapter), $"request {r}");
        }
    }

    [Test]
    public async Task CancellingARequestFreesItsSlotAndTheOtherRowsGoOnUnchanged()
    {
        using var dir = new TempDir();
        using var host = DeployTwoAdapters(Fixture("llama/llama_opset17_with_past.onnx"), "q_proj,v_proj", dir);
        var generator = new TextGenerator(host);
        GenerationRequest doomed = new([5, 17, 99, 3, 42], new GenerationOptions { MaxNewTokens = 20 }, "a"),
            stays = new([7, 2], new GenerationOptions { MaxNewTokens = 10, Sampling = new SamplingOptions { Temperature = 0.7, TopK = 10, Seed = 5 } }, "a"),
            waits = new([120, 1, 33], new GenerationOptions { MaxNewTokens = 6 }, "a");
        var alone = new[] { stays, waits }.Select(r => generator.Generate(r.PromptIds, r.Options, r.Adapter)).ToList();

        await using var scheduler = new GenerationScheduler(generator, new SchedulerOptions { MaxBatch = 2, MaxRunning = 2 });
        var pace = new Pacer(scheduler);
        using var cancel = new CancellationTokenSource();
        var doomedStream = scheduler.Generate(doomed, cancel.Token).GetAsyncEnumerator();
        var staying = Collect(scheduler.Generate(stays));
        var waiting = Collect(scheduler.Generate(waits));
        pace.WaitHeld();
        pace.Turns(1);
        Assert.That(await doomedStream.MoveNextAsync(), Is.True);
        Assert.That(await doomedStream.MoveNextAsync(), Is.True);
        Assert.That((scheduler.Running, scheduler.QueueDepth), Is.EqualTo((2, 1)), "two running, the third waits for a slot");

        cancel.Cancel();
        pace.Free();
        await Assert.CatchAsync<OperationCanceledException>(async () => { while (await doomedStream.MoveNextAsync()) { } });
        AssertSame(await staying, alone[0], "the row that stayed");
        AssertSame(await waiting, alone[1], "the request that took the freed slot");
        Assert.That((scheduler.Running, scheduler.QueueDepth), Is.EqualTo((0, 0)));
        Assert.That(scheduler.GeneratedTokens, Is.LessThan(20 + alone.Sum(r => r.TokenIds.Count)), "the cancelled request stopped early");
    }

    [Test]
    public async Task AFullQueueRefusesAtOnceAndACancelledWaiterLeavesIt()
    {
        using var dir = new TempDir();
        using var host = AdapterHost.Create(Fixture("optimum/gpt2_opset17_with_past.onnx"));
        var generator = new TextGenerator(host);
        var options = new GenerationOptions { MaxNewTokens = 4 };
        await using var scheduler = new GenerationScheduler(generator, new SchedulerOptions { MaxBatch = 1, MaxRunning = 1, QueueCapacity = 1 });
        var pace = new Pacer(scheduler);
        var running = Collect(scheduler.Generate(new([5, 6], options, null)));
        pace.WaitHeld();                                              // admitted, held before its first turn
        Assert.That(scheduler.Running, Is.EqualTo(1));
        using var cancel = new CancellationTokenSource();
        var queued = scheduler.Generate(new([7], options, null), cancel.Token);
        Assert.That(scheduler.QueueDepth, Is.EqualTo(1));
        var full = Assert.Throws<QueueFullException>(() => scheduler.Generate(new([8], options, null)))!;
        Assert.That(full.Capacity, Is.EqualTo(1));
        Assert.That(full.Message, Does.Contain("queue is full"));

        cancel.Cancel();
        Assert.That(scheduler.QueueDepth, Is.Zero, "a cancelled request leaves the queue at once");
        await Assert.CatchAsync<OperationCanceledException>(async () => await Collect(queued));
        var next = Collect(scheduler.Generate(new([8], options, null)));
        pace.Free();
        AssertSame(await running, generator.Generate([5, 6], options), "the running request");
        AssertSame(await next, generator.Generate([8], options), "the request queued after the cancellation");

        Assert.Throws<ArgumentException>(() => scheduler.Generate(new([], options, null)));
        Assert.Throws<ArgumentOutOfRangeException>(() => scheduler.Generate(new([5, 300], options, null)));
        var unknown = (await Assert.CatchAsync<KeyNotFoundException>(async () => await Collect(scheduler.Generate(new([5], options, "nope")))))!;
        Assert.That(unknown.Message, Does.Contain("'nope'"));
    }

    [Test]
    public async Task DisposalStopsTheLoopAndEndsTheRequestsStillThere()
    {
        using var host = AdapterHost.Create(Fixture("optimum/gpt2_opset17_with_past.onnx"));
        var scheduler = new GenerationScheduler(new TextGenerator(host), new SchedulerOptions { MaxRunning = 1 });
        var pace = new Pacer(scheduler);
        var options = new GenerationOptions { MaxNewTokens = 20 };
        var running = Collect(scheduler.Generate(new([5, 6], options, null)));
        pace.WaitHeld();
        var queued = Collect(scheduler.Generate(new([7], options, null)));
        var disposing = scheduler.DisposeAsync();
        pace.Free();
        await disposing;
        await Assert.CatchAsync<ObjectDisposedException>(async () => await running);
        await Assert.CatchAsync<ObjectDisposedException>(async () => await queued);
        Assert.Throws<ObjectDisposedException>(() => scheduler.Generate(new([5], options, null)));
    }

    /// <summary>Streamed text: the deltas add up to the text generated alone, cut before a stop sequence.</summary>
    [Test]
    public async Task StreamedTextIsTheTextGeneratedAloneAndStopsBeforeAStopSequence()
    {
        using var dir = new TempDir();
        using var host = AdapterHost.Create(BigramModel.Write(dir.File("lm.onnx"), vocab: 50257, width: 50257));
        var generator = new TextGenerator(host, TextGenerator.Gpt2Tokenizer());
        var tokenizer = generator.Tokenizer!;
        var greedy = new GenerationOptions { MaxNewTokens = 10 };
        var full = generator.Generate("Hello, world!", greedy).Text!;
        var stop = full.Substring(full.Length / 2, 2);
        var requests = new (string Prompt, GenerationOptions Options)[]
        {
            ("Hello, world!", greedy),
            ("Hello, world!", greedy with { StopSequences = [stop, "\u0001never"] }),
            ("Once upon a time", new GenerationOptions { MaxNewTokens = 14, Sampling = new SamplingOptions { Temperature = 1.2, Seed = 2 } }),
            ("Ünïcödé 🤗", new GenerationOptions { MaxNewTokens = 8, Sampling = new SamplingOptions { Temperature = 1.5, Seed = 9 } }),
        };
        await using var scheduler = new GenerationScheduler(generator);
        var served = await Task.WhenAll(requests.Select(r => Collect(scheduler.Generate(new(tokenizer.EncodeToIds(r.Prompt), r.Options, null)))));
        for (int i = 0; i < requests.Length; i++)
            AssertSame(served[i], generator.Generate(requests[i].Prompt, requests[i].Options), $"request {i}");
        Assert.That(served[1].Reason, Is.EqualTo("stop"));
        Assert.That(served[1].Text, Is.EqualTo(full[..full.IndexOf(stop, StringComparison.Ordinal)]));
    }

    /// <summary>
    /// The incremental text of GPT-2's byte-level tokens: never half a character (🤗 spans several tokens), never text
    /// past where a stop sequence may start, and the stop sequence found where it starts.
    /// </summary>
    [Test]
    public void TextStreamsWholeCharactersAndHoldsBackAPossibleStopSequence()
    {
        var tokenizer = TextGenerator.Gpt2Tokenizer();
        const string text = "Hi 🤗 there, wörld and world!";        // " and" and " world" are separate tokens
        var ids = tokenizer.EncodeToIds(text);
        Assert.That(Enumerable.Range(1, ids.Count).Any(n => tokenizer.Decode(ids.Take(n)).EndsWith('\uFFFD')), Is.True, "a character split over tokens");
        int stopAt = text.IndexOf("and world", StringComparison.Ordinal);

        var stream = new TextStream(tokenizer, ["and world", "xyz"]);
        var generated = new List<int>();
        var sent = new StringBuilder();
        int cut = -1;
        foreach (var id in ids)
        {
            generated.Add(id);
            cut = stream.Add(generated);
            var delta = stream.TakeDelta();
            Assert.That(delta, Does.Not.Contain("\uFFFD"), $"after {generated.Count} tokens");
            sent.Append(delta);
            Assert.That(text, Does.StartWith(sent.ToString()));
            Assert.That(sent.Length, Is.LessThanOrEqualTo(stopAt), "nothing past where the stop sequence may start ('and' is held back)");
            if (cut >= 0) break;
        }
        Assert.That(cut, Is.EqualTo(stopAt));
        Assert.That(sent.ToString(), Is.EqualTo(text[..stopAt]));
        Assert.That(stream.Finish(text[..stopAt]), Is.Empty);

        var plain = new TextStream(tokenizer, []);
        var all = new StringBuilder();
        for (int n = 1; n <= ids.Count; n++)
        {
            plain.Add(ids.Take(n).ToList());
            all.Append(plain.TakeDelta());
        }
        Assert.That(all.ToString(), Is.EqualTo(text));
    }

    sealed record Served(List<int> Tokens, string? Text, string Reason);

    static void AssertSame(Served served, GenerationResult alone, string what)
    {
        Assert.That(served.Tokens, Is.EqualTo(alone.TokenIds), $"{what}: tokens");
        Assert.That(served.Reason, Is.EqualTo(alone.StopReason == "max_new_tokens" ? "length" : "stop"), $"{what}: finish reason");
        Assert.That(served.Text, Is.EqualTo(alone.Text), $"{what}: text");
    }

    /// <summary>Reads a stream to its end and checks its shape: token events, then one final event with no token.</summary>
    static async Task<Served> Collect(IAsyncEnumerable<GeneratedToken> stream)
    {
        var events = new List<GeneratedToken>();
        await foreach (var e in stream) events.Add(e);
        return ToServed(events);
    }

    static Served ToServed(List<GeneratedToken> events)
    {
        Assert.That(events, Is.Not.Empty);
        Assert.That(events[^1].FinishReason, Is.Not.Null, "the stream ends with a final event");
        Assert.That(events[^1].TokenId, Is.EqualTo(-1));
        Assert.That(events.SkipLast(1).Select(e => (e.FinishReason, e.TokenId >= 0)), Is.All.EqualTo(((string?)null, true)));
        bool hasText = events.Any(e => e.TextDelta is not null);
        Assert.That(events.All(e => e.TextDelta is not null) || !hasText, "text on every event or on none");
        return new Served(events.SkipLast(1).Select(e => e.TokenId).ToList(), hasText ? string.Concat(events.Select(e => e.TextDelta)) : null, events[^1].FinishReason!);
    }

    /// <summary>Holds the scheduler's decode loop before each turn until the test lets it go on (30 s at most each way).</summary>
    sealed class Pacer
    {
        static readonly TimeSpan Limit = TimeSpan.FromSeconds(30);
        readonly GenerationScheduler _scheduler;
        readonly SemaphoreSlim _go = new(0), _held = new(0);

        public Pacer(GenerationScheduler scheduler)
        {
            _scheduler = scheduler;
            scheduler.BeforeTurn = () =>
            {
                _held.Release();
                if (!_go.Wait(Limit)) throw new TimeoutException("the test did not let the paced decode loop go on");
            };
        }

        /// <summary>Waits until the loop is held before a turn (it has admitted what was waiting).</summary>
        public void WaitHeld() => Assert.That(_held.Wait(Limit), Is.True, "the decode loop reached its next turn");

        /// <summary>Lets the held loop run <paramref name="turns"/> turns and waits until it is held before the next.</summary>
        public void Turns(int turns)
        {
            for (int i = 0; i < turns; i++)
            {
                _go.Release();
                WaitHeld();
            }
        }

        /// <summary>Unpaced from now on.</summary>
        public void Free()
        {
            _scheduler.BeforeTurn = null;
            _go.Release();
        }
    }

    static string ModelPath(string model, TempDir dir) => model switch
    {
        NoMaskModel => WithoutMaskAndPositions(Fixture("optimum/gpt2_opset17_with_past.onnx"), dir.File("nomask.onnx")),
        StackedCacheModel => WithStackedCaches(Fixture("optimum/gpt2_opset17_with_past.onnx"), dir.File("stacked.onnx")),
        _ => Fixture(model),
    };

    /// <summary>Deploys <paramref name="model"/> with two random nonzero adapters, 'a' and 'b'.</summary>
    static AdapterHost DeployTwoAdapters(string model, string targets, TempDir dir)
    {
        var (host, _) = CachedGenerationTests.Deploy(model, targets, dir);
        var manifest = LoraManifest.Load(Path.Combine(dir.File("rw"), RunLayout.LoraConfig));
        var b = dir.File("b.onnx_adapter");
        OnnxAdapterFile.Write(b, LoraAdapter.CreateRandom(manifest, seed: 9, amplitude: 0.5));
        host.AddAdapter("b", b);
        return host;
    }

    /// <summary>
    /// The Optimum GPT-2 with past, its attention_mask (all ones) and position_ids (past length onwards) computed inside
    /// the graph instead of fed: a cached model that cannot pad, as older exports without those inputs.
    /// </summary>
    static string WithoutMaskAndPositions(string source, string path)
    {
        var model = OnnxFile.Load(source);
        foreach (var name in new[] { "attention_mask", "position_ids" }) model.Graph.Input.Remove(model.Graph.Input.Single(i => i.Name == name));
        var g = new GraphEditor(model);
        var axis0 = g.AddConstant("axis0", Tensors.Int64Vector("axis0", 0));
        string Dim(string shape, long index) =>
            g.Op("Slice", [shape, g.AddConstant("start", Tensors.Int64Vector("start", index)), g.AddConstant("end", Tensors.Int64Vector("end", index + 1))], "dim");
        var idsShape = g.Op("Shape", ["input_ids"], "ids_shape");
        string batch = Dim(idsShape, 0), tokens = Dim(idsShape, 1), past = Dim(g.Op("Shape", ["past_key_values.0.key"], "past_shape"), 2);
        var total = g.Op("Add", [past, tokens], "total");
        g.AddNode("ConstantOfShape", [g.Op("Concat", [batch, total], "mask_shape", "", Attr.Int("axis", 0))], ["attention_mask"],
                  attributes: Attr.Tensor("value", Tensors.Int64("one", [1], [1])));
        var positions = g.Op("Range", [g.Op("Squeeze", [past, axis0]), g.Op("Squeeze", [total, axis0]), g.AddConstant("step", Tensors.Scalar("step", DataType.Int64, 1))], "positions");
        g.AddNode("Expand", [g.Op("Unsqueeze", [positions, axis0]), g.Op("Concat", [batch, tokens], "positions_shape", "", Attr.Int("axis", 0))], ["position_ids"]);
        g.SortTopologically();
        OnnxFile.Save(model, path);
        return path;
    }

    /// <summary>
    /// The Optimum GPT-2 with past, each layer's key and value cache stacked in one input past.{i} and one output
    /// present.{i}, [2, batch, heads, tokens, head_dim], the older cache form.
    /// </summary>
    static string WithStackedCaches(string source, string path)
    {
        var model = OnnxFile.Load(source);
        var pasts = model.Graph.Input.Where(i => i.Name.StartsWith("past_key_values.", StringComparison.Ordinal)).ToList();
        var presents = model.Graph.Output.Where(o => o.Name.StartsWith("present.", StringComparison.Ordinal)).ToList();
        foreach (var v in pasts) model.Graph.Input.Remove(v);
        foreach (var v in presents) model.Graph.Output.Remove(v);
        var g = new GraphEditor(model);
        var axis0 = g.AddConstant("axis0", Tensors.Int64Vector("axis0", 0));
        var dims = ValueInfos.Dims(pasts[0])!;                       // [batch, heads, past, head_dim]
        for (int layer = 0; layer < pasts.Count / 2; layer++)
        {
            g.AddInput(ValueInfos.Tensor($"past.{layer}", DataType.Float, [2, .. dims]));
            for (int kv = 0; kv < 2; kv++)
                g.AddNode("Gather", [$"past.{layer}", g.AddConstant("index", Tensors.Scalar("index", DataType.Int64, kv))],
                          [$"past_key_values.{layer}.{(kv == 0 ? "key" : "value")}"], attributes: Attr.Int("axis", 0));
            string key = g.Op("Unsqueeze", [$"present.{layer}.key", axis0]), value = g.Op("Unsqueeze", [$"present.{layer}.value", axis0]);
            g.AddNode("Concat", [key, value], [$"present.{layer}"], attributes: Attr.Int("axis", 0));
            g.AddOutput(ValueInfos.Tensor($"present.{layer}", DataType.Float, 2, "batch_size", dims[1], "total", dims[3]));
        }
        g.SortTopologically();
        OnnxFile.Save(model, path);
        return path;
    }
}
