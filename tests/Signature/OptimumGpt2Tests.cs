using System.Text.Json.Nodes;
using Microsoft.ML.OnnxRuntime;
using TrainingSession = OnnxLora.Pipeline.Training.TrainingSession;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Models;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Signature;

/// <summary>
/// A Hugging Face GPT-2 exported with Optimum's decoder signature (tests/fixtures/optimum, tools/fixtures/make_optimum_gpt2.py):
/// opsets 14 and 17, with and without past_key_values, against PyTorch goldens — right-padded batches, 20 AdamW steps.
/// </summary>
public class OptimumGpt2Tests
{
    public static readonly string[] Files = ["gpt2_opset14.onnx", "gpt2_opset14_with_past.onnx", "gpt2_opset17.onnx", "gpt2_opset17_with_past.onnx"];

    internal static string Fixture(string name) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "optimum", name);

    static JsonNode Golden() => JsonNode.Parse(File.ReadAllText(Fixture("golden.json")))!;

    /// <summary>The rewrite the golden script trained: r 4, alpha 8, c_attn, c_proj and c_fc of every block (c_proj covers both).</summary>
    static LoraRewriteResult Rewrite(string file) =>
        LoraRewrite.Rewrite(OnnxFile.Load(Fixture(file)), new LoraConfig { Rank = 4, Alpha = 8, TargetModules = ["c_attn", "c_proj", "c_fc"] }, file, "");

    /// <summary>The golden's rows (each cut to its length) as examples: labels are the ids, padding is added by the batcher.</summary>
    static List<Example> Rows(JsonNode batch)
    {
        var ids = batch["input_ids"]!.AsArray();
        var lengths = batch["lengths"]!.AsArray().Select(n => n!.GetValue<int>()).ToList();
        return lengths.Select((n, r) =>
        {
            var row = ids[r]!.AsArray().Take(n).Select(x => x!.GetValue<int>()).ToArray();
            return new Example(row, row);
        }).ToList();
    }

    static TrainingSession Session(TempDir dir, string file, out ArtifactsSpec spec)
    {
        var r = Rewrite(file);
        var artifacts = TrainingArtifacts.Build(r.TrainingModel, r.Manifest, new ArtifactOptions { Optimizer = OptimizerKind.AdamW });
        artifacts.Save(dir.File("artifacts"));
        spec = artifacts.Spec;
        var session = TrainingSession.Create(dir.File("artifacts"), ExecutionDevice.Cpu, threads: 1);
        var (init, _) = SafeTensorsFile.Read(Fixture("lora_init.safetensors"));
        foreach (var (name, t) in init) session.SetState(name, t.ToFloats());
        return session;
    }

    [TestCaseSource(nameof(Files))]
    public void TwentyAdamWStepsOnPaddedBatchesMatchPyTorch(string file)
    {
        var golden = Golden();
        var hp = golden["adamw"]!["hyperparameters"]!;
        var expected = golden["adamw"]!["losses_float32"]!.AsArray().Select(x => x!.GetValue<double>()).ToArray();
        int padId = golden["pad_id"]!.GetValue<int>();
        var batches = golden["batches"]!.AsArray().Select(b => Batcher.Pad(Rows(b!), padId)).ToList();

        using var dir = new TempDir();
        using var session = Session(dir, file, out var spec);
        session.SetLearningRate(hp["lr"]!.GetValue<double>());
        session.WeightDecay = hp["weight_decay"]!.GetValue<double>();
        // the train graph takes the signature's inputs with their roles, and present.* is pruned from it
        Assert.That(spec.Train.Inputs.Where(i => SignatureFeeds.Feeds(i.Role)).Select(i => i.Role).Distinct(),
            Is.SupersetOf(new[] { IoRole.InputIds, IoRole.AttentionMask, IoRole.PositionIds }));
        Assert.That(spec.Train.Outputs.Concat(spec.Eval.Outputs).Where(o => o.Name.StartsWith("present", StringComparison.Ordinal)), Is.Empty);
        if (file.Contains("with_past", StringComparison.Ordinal))
            Assert.That(spec.Train.Inputs.Where(i => i.Role == IoRole.PastKey).Select(i => i.Layer), Is.EquivalentTo(new int?[] { 0, 1 }));

        var losses = new List<double>();
        for (int s = 0; s < expected.Length; s++)
        {
            session.LazyResetGrad();
            losses.Add(session.TrainStep(batches[s % batches.Count]).Loss);
            session.OptimizerStep();
        }
        int worst = Enumerable.Range(0, expected.Length).MaxBy(s => Math.Abs(losses[s] / expected[s] - 1));
        TestContext.Out.WriteLine($"{file}: loss {losses[0]:F6} → {losses[^1]:F6}; max relative difference to PyTorch {Math.Abs(losses[worst] / expected[worst] - 1):E2} at step {worst}");
        // float32 on both sides: the two PyTorch runs (float32 vs float64) differ by ~2e-7, so 1e-4 is loose but not blind
        for (int s = 0; s < expected.Length; s++)
            Assert.That(losses[s], Is.EqualTo(expected[s]).Within(Math.Abs(expected[s]) * 1e-4), $"{file} step {s}: ours {losses[s]:R}, PyTorch {expected[s]:R}");
        Assert.That(losses[^1], Is.LessThan(losses[0] * 0.8), "the loss should fall");
    }

    [TestCaseSource(nameof(Files))]
    public void EvalStepGivesEachPaddedRowItsLogitsAndLossAlone(string file)
    {
        var golden = Golden();
        var padded = golden["padded_batch"]!;
        var rows = Rows(padded);
        var batch = Batcher.Pad(rows, golden["pad_id"]!.GetValue<int>());
        var reference = padded["logits"]!.AsArray().Select(x => x!.GetValue<float>()).ToArray();
        int vocab = golden["config"]!["vocab_size"]!.GetValue<int>();

        using var dir = new TempDir();
        using var session = Session(dir, file, out _);
        var all = session.EvalStep(batch, withLogits: true);
        double weighted = 0;
        long counted = 0;
        for (int r = 0; r < rows.Count; r++)
        {
            var alone = session.EvalStep(Batcher.Pad([rows[r]], 0), withLogits: true);
            int n = rows[r].Length;
            for (int t = 0; t < n; t++)
                for (int v = 0; v < vocab; v++)
                {
                    float inBatch = all.Logits![(r * batch.SeqLength + t) * vocab + v];
                    Assert.That(inBatch, Is.EqualTo(alone.Logits![t * vocab + v]).Within(2e-5), $"{file} row {r} position {t}: padded vs alone");
                    Assert.That(inBatch, Is.EqualTo(reference[(r * batch.SeqLength + t) * vocab + v]).Within(1e-4), $"{file} row {r} position {t}: ours vs PyTorch");
                }
            weighted += alone.Loss * (n - 1);
            counted += n - 1;
        }
        // the batch loss is the mean over counted positions: the rows' own losses weighted by their counted positions
        Assert.That(all.Loss, Is.EqualTo(weighted / counted).Within(1e-5 * weighted / counted));
    }

    [TestCaseSource(nameof(Files))]
    public void DeploymentFeedsPaddedRowsLikeRowsAlone(string file)
    {
        var golden = Golden();
        var padded = golden["padded_batch"]!;
        var rows = Rows(padded).Select(e => (IReadOnlyList<int>)e.InputIds).ToList();
        var reference = padded["logits"]!.AsArray().Select(x => x!.GetValue<float>()).ToArray();
        int vocab = golden["config"]!["vocab_size"]!.GetValue<int>(), width = rows.Max(r => r.Count);

        using var dir = new TempDir();
        var rw = dir.File("rw");
        LoraRewrite.RewriteFile(Fixture(file), new LoraConfig { Rank = 4, Alpha = 8, TargetModules = ["c_attn"] }, rw);
        using var host = AdapterHost.Create(Path.Combine(rw, RunLayout.DeployableModel));
        var signature = ModelSignature.Of(host);
        Assert.That((signature.AttentionMask, signature.PositionIds, signature.Roles.HasPast), Is.EqualTo(("attention_mask", "position_ids", file.Contains("with_past", StringComparison.Ordinal))));

        float[] Logits(IReadOnlyList<IReadOnlyList<int>> batch, int w, bool left)
        {
            var feeds = signature.Feeds(batch, w, padId: 0, leftPad: left);
            try
            {
                using var outputs = host.Run(null, feeds, [signature.Logits]);
                return outputs[0].GetTensorDataAsSpan<float>().ToArray();
            }
            finally { foreach (var v in feeds.Values) v.Dispose(); }
        }

        var right = Logits(rows, width, left: false);
        var left = Logits(rows, width, left: true);
        for (int r = 0; r < rows.Count; r++)
        {
            var alone = Logits([rows[r]], rows[r].Count, left: false);
            int n = rows[r].Count, shift = width - n;
            for (int i = 0; i < n * vocab; i++)
            {
                int t = i / vocab, v = i % vocab;
                Assert.That(right[(r * width + t) * vocab + v], Is.EqualTo(alone[i]).Within(2e-5), $"{file} row {r} position {t}: right-padded vs alone");
                Assert.That(left[(r * width + shift + t) * vocab + v], Is.EqualTo(alone[i]).Within(2e-5), $"{file} row {r} position {t}: left-padded vs alone");
                Assert.That(alone[i], Is.EqualTo(reference[(r * width + t) * vocab + v]).Within(1e-4), $"{file} row {r} position {t}: deployed vs PyTorch");
            }
        }

        // perplexity evaluation does not depend on how rows are batched
        var data = new Dataset(Rows(padded), TrainingTask.Lm, 0, 0, []);
        var batched = Evaluator.LanguageModel(host, null, data, batchSize: 3);
        var single = Evaluator.LanguageModel(host, null, data, batchSize: 1);
        Assert.That(batched.MeanLoss, Is.EqualTo(single.MeanLoss).Within(1e-6 * single.MeanLoss));
        Assert.That(batched.Tokens, Is.EqualTo(single.Tokens));
    }

    public static IEnumerable<string> GenerationModels() => Files.Select(f => Path.Combine("optimum", f)).Append("tiny.onnx");

    /// <summary>Left-padded (models with a mask) or right-padded (tiny.onnx: ids only) batched generation, row by row equal to generation alone.</summary>
    [TestCaseSource(nameof(GenerationModels))]
    public void BatchedGenerationGivesEachPromptWhatItGetsAlone(string file) =>
        AssertBatchedGenerationEqualsAlone(Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", file));

    /// <summary>
    /// An export with a mask that counts positions itself (no position_ids input, as older Optimum GPT-2 exports): left
    /// padding would shift its positions, so batched generation pads on the right and still matches each prompt alone.
    /// </summary>
    [Test]
    public void AModelWithoutPositionIdsGeneratesInBatchesLikeAlone()
    {
        var model = OnnxFile.Load(Fixture("gpt2_opset17.onnx"));
        model.Graph.Input.Remove(model.Graph.Input.Single(i => i.Name == "position_ids"));
        var g = new GraphEditor(model);
        var seq = g.Op("Gather", [g.Op("Shape", ["input_ids"], "pos/shape"), g.AddConstant("pos/one", Tensors.Int64("", [], [1]))], "pos/seq");
        var range = g.Op("Range", [g.AddConstant("pos/zero", Tensors.Int64("", [], [0])), seq, g.AddConstant("pos/step", Tensors.Int64("", [], [1]))], "pos/range");
        g.AddNode("Unsqueeze", [range, g.AddConstant("pos/axes", Tensors.Int64Vector("", 0))], ["position_ids"], "pos/unsqueeze");   // [1, seq]
        g.SortTopologically();
        using var dir = new TempDir();
        var path = dir.File("no_position_ids.onnx");
        OnnxFile.Save(model, path);
        Assert.That(SignatureRoles.Decide(model).Input(IoRole.PositionIds), Is.Null);
        AssertBatchedGenerationEqualsAlone(path);
    }

    static void AssertBatchedGenerationEqualsAlone(string modelPath)
    {
        var file = Path.GetFileName(modelPath);
        using var dir = new TempDir();
        var rw = dir.File("rw");
        LoraRewrite.RewriteFile(modelPath, new LoraConfig { Rank = 2, TargetModules = ["c_attn"] }, rw);
        using var host = AdapterHost.Create(Path.Combine(rw, RunLayout.DeployableModel));
        var generator = new TextGenerator(host);
        IReadOnlyList<int>[] prompts = [[5, 17, 99, 3, 42, 8, 11], [7], [250, 1, 33]];
        foreach (var sampling in new[] { SamplingOptions.Greedy, new SamplingOptions { Temperature = 0.8, Seed = 3 } })
        {
            var options = new GenerationOptions { MaxNewTokens = 6, Sampling = sampling, StopTokenIds = [prompts[0][3]] };
            var batched = generator.GenerateBatch(prompts, options);
            for (int r = 0; r < prompts.Length; r++)
            {
                var alone = generator.Generate(prompts[r], options);
                Assert.That((batched[r].TokenIds, batched[r].StopReason), Is.EqualTo((alone.TokenIds, alone.StopReason)), $"{file} prompt {r}, temperature {sampling.Temperature}");
            }
        }
    }

    /// <summary>
    /// The with-past exports are real caches: the present.* of a prefix, fed back as past_key_values by role and layer
    /// with the next token, give the logits the whole sequence gives (what a KV-cache generator will rely on).
    /// </summary>
    [TestCase("gpt2_opset14_with_past.onnx")]
    [TestCase("gpt2_opset17_with_past.onnx")]
    public void PresentOutputsFedBackAsPastContinueTheSequence(string file)
    {
        var roles = SignatureRoles.Decide(OnnxFile.Load(Fixture(file)));
        using var session = new InferenceSession(Fixture(file));
        int[] ids = [5, 17, 99, 3, 42];
        int n = ids.Length;
        using var run = new RunOptions();

        IDisposableReadOnlyCollection<OrtValue> Run(IReadOnlyList<int> rowIds, Dictionary<string, OrtValue>? past)
        {
            var tokens = PaddedTokens.Pad([rowIds], rowIds.Count, 0);
            var feeds = roles.Inputs.Where(i => !i.Role.IsPast()).ToDictionary(i => i.Name, i => SignatureFeeds.Create(i, tokens));
            if (past is null) foreach (var i in roles.Inputs.Where(i => i.Role.IsPast())) feeds[i.Name] = SignatureFeeds.Create(i, tokens);
            else
            {
                // one new token after the cache: the mask covers past + 1, the position is the past length
                feeds[roles.Input(IoRole.AttentionMask)!].Dispose();
                feeds[roles.Input(IoRole.AttentionMask)!] = OrtValue.CreateTensorValueFromMemory(Enumerable.Repeat(1L, n).ToArray(), [1, n]);
                feeds[roles.Input(IoRole.PositionIds)!].Dispose();
                feeds[roles.Input(IoRole.PositionIds)!] = OrtValue.CreateTensorValueFromMemory(new long[] { n - 1 }, [1, 1]);
                foreach (var (name, value) in past) feeds[name] = value;
            }
            try { return session.Run(run, feeds.Keys.ToList(), feeds.Values.ToList(), roles.Outputs.Select(o => o.Name).ToList()); }
            finally { foreach (var (name, v) in feeds) if (past is null || !past.ContainsKey(name)) v.Dispose(); }
        }

        using var whole = Run(ids, null);
        using var prefix = Run(ids[..^1], null);
        // present_key[i] → past_key[i], present_value[i] → past_value[i]
        var past = new Dictionary<string, OrtValue>();
        for (int o = 0; o < roles.Outputs.Count; o++)
        {
            var output = roles.Outputs[o];
            if (!output.Role.IsPresent()) continue;
            var pastRole = output.Role == IoRole.PresentKey ? IoRole.PastKey : IoRole.PastValue;
            past[roles.Inputs.Single(i => i.Role == pastRole && i.Layer == output.Layer).Name] = prefix[o];
        }
        Assert.That(past, Has.Count.EqualTo(4));
        using var next = Run([ids[^1]], past);
        int vocab = Golden()["config"]!["vocab_size"]!.GetValue<int>();
        var expected = whole[0].GetTensorDataAsSpan<float>().Slice((n - 1) * vocab, vocab).ToArray();
        Assert.That(next[0].GetTensorDataAsSpan<float>().ToArray(), Is.EqualTo(expected).Within(2e-5));
    }
}
