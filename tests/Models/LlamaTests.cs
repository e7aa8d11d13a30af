using System.Text.Json;
using System.Text.Json.Nodes;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Onnx;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.Tests.Autodiff;

namespace OnnxLora.Tests.Models;

/// <summary>
/// The Llama family against PyTorch (tests/fixtures/llama, make_llama.py): torch.onnx.export's graphs, the same
/// weights imported from a Hugging Face folder and built by <see cref="LlamaBuilder"/>, on a right-padded batch with
/// its attention mask and position ids; 20 AdamW LoRA steps; import errors that name the file and tensor.
/// </summary>
public class LlamaTests
{
    static string Fixture(params string[] parts) => Path.Combine([TestContext.CurrentContext.TestDirectory, "fixtures", "llama", .. parts]);

    static JsonElement Golden(string arch) => JsonDocument.Parse(File.ReadAllText(Fixture($"{arch}_golden.json"))).RootElement;

    static (long[] Values, long[] Shape) Ids(JsonElement rows)
    {
        var r = rows.EnumerateArray().Select(x => x.EnumerateArray().Select(v => v.GetInt64()).ToArray()).ToArray();
        return (r.SelectMany(x => x).ToArray(), [r.Length, r[0].Length]);
    }

    /// <summary>Logits of a model with Optimum's three inputs.</summary>
    internal static float[] Logits(InferenceSession session, JsonElement feeds)
    {
        var values = new List<OrtValue>();
        try
        {
            foreach (var name in new[] { LlamaBuilder.InputIds, LlamaBuilder.AttentionMask, LlamaBuilder.PositionIds })
            {
                var (v, shape) = Ids(feeds.GetProperty(name));
                values.Add(OrtValue.CreateTensorValueFromMemory(v, shape));
            }
            using var options = new RunOptions();
            using var outputs = session.Run(options, [LlamaBuilder.InputIds, LlamaBuilder.AttentionMask, LlamaBuilder.PositionIds], values, [LlamaBuilder.Logits]);
            return outputs[0].GetTensorDataAsSpan<float>().ToArray();
        }
        finally { values.ForEach(v => v.Dispose()); }
    }

    static double[] GoldenLogits(JsonElement golden) => golden.GetProperty("logits").EnumerateArray().Select(x => x.GetDouble()).ToArray();

    // Logits reach |z| ≈ 4; float32 PyTorch vs ORT (different summation orders, RoPE angles up to 8 rad) differ by ~1e-6.
    const double LogitTolerance = 1e-4;

    [TestCase("llama", "llama_opset14.onnx")]
    [TestCase("llama", "llama_opset17.onnx")]
    [TestCase("qwen2", "qwen2_opset14.onnx")]
    [TestCase("qwen2", "qwen2_opset17.onnx")]
    public void TorchExportsGivePyTorchLogitsOnAPaddedBatch(string arch, string file)
    {
        var golden = Golden(arch);
        using var session = new InferenceSession(Fixture(file));
        GptBuilderTests.AssertClose(Logits(session, golden), GoldenLogits(golden), LogitTolerance, file);
    }

    [TestCase("llama")]
    [TestCase("qwen2")]
    public void ImportedFolderBuildsTheSameModel(string arch)
    {
        var golden = Golden(arch);
        var (model, description, parameters) = HfModels.Build(Fixture($"hf-{arch}"));
        TestContext.Out.WriteLine($"{description}: {parameters:N0} parameters");
        Assert.That(model.Graph.Input.Select(i => i.Name), Is.EqualTo(new[] { "input_ids", "attention_mask", "position_ids" }));
        using var session = new InferenceSession(model.ToByteArray());
        GptBuilderTests.AssertClose(Logits(session, golden), GoldenLogits(golden), LogitTolerance, $"hf-{arch} built by LlamaBuilder");

        // LoRA discovery sees the Hugging Face module paths, the head apart
        var layers = LinearLayers.Discover(model);
        Assert.That(layers.Where(l => !l.IsHead).Select(l => l.Module),
                    Is.EqualTo(Enumerable.Range(0, 2).SelectMany(i => LlamaLayout.AttentionModules.Concat(LlamaLayout.MlpModules).Select(m => LlamaLayout.Layer(i, m)))));
        Assert.That(layers.Single(l => l.IsHead).Module, Is.EqualTo("lm_head"));
    }

    [Test]
    public void MistralFolderWithoutASlidingWindowIsLlama()
    {
        // MistralForCausalLM is Llama's state dict and graph; only a sliding window shorter than the context differs
        using var dir = new TempDir();
        var folder = CopyFolder("llama", dir);
        var config = Path.Combine(folder, HfCheckpoint.ConfigFile);
        var json = JsonNode.Parse(File.ReadAllText(config))!.AsObject();
        json["architectures"] = new JsonArray("MistralForCausalLM");
        json["model_type"] = "mistral";
        json["sliding_window"] = null;
        File.WriteAllText(config, json.ToJsonString());
        var golden = Golden("llama");
        using (var session = new InferenceSession(HfModels.Build(folder).Model.ToByteArray()))
            GptBuilderTests.AssertClose(Logits(session, golden), GoldenLogits(golden), LogitTolerance, "hf-llama as mistral");
        json["sliding_window"] = 16;
        File.WriteAllText(config, json.ToJsonString());
        StringAssert.Contains("sliding_window is 16, shorter than max_position_embeddings (64)", ImportError(folder));
    }

    [Test]
    public void CliBuildsFromAFolderAndFromAPreset()
    {
        using var dir = new TempDir();
        var (code, stdout, stderr) = CliRunner.Run("model", "build", "--from", Fixture("hf-qwen2"), "--out", dir.File("qwen2.onnx"));
        Assert.That(code, Is.EqualTo(0), stderr);
        StringAssert.Contains("qwen2", stdout);
        var golden = Golden("qwen2");
        using (var session = new InferenceSession(dir.File("qwen2.onnx")))
            GptBuilderTests.AssertClose(Logits(session, golden), GoldenLogits(golden), LogitTolerance, "model build --from hf-qwen2");

        (code, stdout, stderr) = CliRunner.Run("model", "build", "--arch", "llama", "--preset", "tiny", "--out", dir.File("tiny.onnx"));
        Assert.That(code, Is.EqualTo(0), stderr);
        var model = OnnxFile.Load(dir.File("tiny.onnx"));
        Assert.That(model.MetadataProps.Single(p => p.Key == LlamaBuilder.ConfigMetadataKey).Value, Does.Contain("\"num_key_value_heads\":2"));

        var folder = Path.Combine(dir.Path, "hf");
        Directory.CreateDirectory(folder);
        foreach (var f in Directory.GetFiles(Fixture("hf-qwen2"))) File.Copy(f, Path.Combine(folder, Path.GetFileName(f)));
        var before = File.ReadAllBytes(Path.Combine(folder, "model.safetensors"));
        (code, _, stderr) = CliRunner.Run("model", "build", "--from", folder, "--out", Path.Combine(folder, "model.safetensors"), "--force");
        Assert.That(code, Is.EqualTo(1));
        StringAssert.Contains("--out lies inside the input", stderr);
        Assert.That(File.ReadAllBytes(Path.Combine(folder, "model.safetensors")), Is.EqualTo(before));

        (code, _, stderr) = CliRunner.Run("model", "build", "--arch", "llama", "--preset", "gpt2", "--out", dir.File("x.onnx"));
        Assert.That(code, Is.EqualTo(1));
        StringAssert.Contains("smollm2-135m", stderr);
    }

    [Test]
    public void PaddingAndBatchingDoNotChangeRealPositions()
    {
        // independent of the fixtures: a random preset, each row alone vs in a right-padded batch
        var weights = LlamaWeights.Random(LlamaConfig.Preset("tiny-qwen2"), seed: 3);
        using var session = new InferenceSession(LlamaBuilder.Build(weights).ToByteArray());
        int vocab = weights.Config.VocabSize;
        int[] lengths = [7, 3];
        var random = new Random(5);
        var rows = lengths.Select(n => Enumerable.Range(0, n).Select(_ => (long)random.Next(vocab)).ToArray()).ToArray();
        JsonElement Feeds(long[][] ids, int seq) => JsonSerializer.SerializeToElement(new Dictionary<string, long[][]>
        {
            ["input_ids"] = ids.Select(r => r.Concat(new long[seq - r.Length]).ToArray()).ToArray(),
            ["attention_mask"] = ids.Select(r => Enumerable.Range(0, seq).Select(t => t < r.Length ? 1L : 0L).ToArray()).ToArray(),
            ["position_ids"] = ids.Select(r => Enumerable.Range(0, seq).Select(t => t < r.Length ? (long)t : 1L).ToArray()).ToArray(),
        });
        var batch = Logits(session, Feeds(rows, 7));
        for (int b = 0; b < rows.Length; b++)
        {
            var alone = Logits(session, Feeds([rows[b]], rows[b].Length));
            var inBatch = batch.AsSpan(b * 7 * vocab, rows[b].Length * vocab).ToArray();
            GptBuilderTests.AssertClose(inBatch, alone.Select(x => (double)x).ToArray(), 1e-5, $"row {b} in a padded batch vs alone");
        }
    }

    static IEnumerable<TestCaseData> TrainingCases() =>
        from arch in new[] { "llama", "qwen2" }
        from source in new[] { "opset14", "opset17", "builder" }
        select new TestCaseData(arch, source).SetName($"LoraTrainingMatchesPyTorch({arch}, {source})");

    /// <summary>
    /// 20 AdamW steps of LoRA on every q/k/v/o/gate/up/down_proj from the fixture's A/B, feeding the batches' attention
    /// mask and position ids, labels −100 on padding: losses within 1e-4 relative of PyTorch's float32 run
    /// (float32 vs float64 in PyTorch: 2.6e-7).
    /// </summary>
    [TestCaseSource(nameof(TrainingCases))]
    public void LoraTrainingMatchesPyTorch(string arch, string source)
    {
        var golden = Golden(arch);
        var model = source == "builder" ? HfModels.Build(Fixture($"hf-{arch}")).Model : OnnxFile.Load(Fixture($"{arch}_{source}.onnx"));
        var lora = golden.GetProperty("lora");
        var config = new LoraConfig
        {
            Rank = lora.GetProperty("rank").GetInt32(), Alpha = lora.GetProperty("alpha").GetDouble(),
            TargetModules = lora.GetProperty("targets").EnumerateArray().Select(t => t.GetString()!).ToList(),
        };
        var (init, _) = SafeTensorsFile.Read(Fixture(lora.GetProperty("init").GetString()!));
        var batches = golden.GetProperty("batches").EnumerateArray().Select(b =>
        {
            var feeds = new Dictionary<string, (Array, long[])>();
            foreach (var name in new[] { "input_ids", "attention_mask", "position_ids" })
            {
                var (v, shape) = Ids(b.GetProperty(name));
                feeds[name] = (v, shape);
            }
            var (ids, s) = Ids(b.GetProperty("input_ids"));
            var (mask, _) = Ids(b.GetProperty("attention_mask"));
            feeds[TrainingArtifacts.Labels] = (ids.Select((x, i) => mask[i] == 1 ? x : Losses.IgnoreIndex).ToArray(), s);
            return feeds;
        }).ToList();
        var adamw = golden.GetProperty("adamw");
        var hp = adamw.GetProperty("hyperparameters");
        var expected = adamw.GetProperty("losses_float32").EnumerateArray().Select(x => x.GetDouble()).ToList();
        var losses = TinyTrainingTests.Train(model, config, init, batches, OptimizerKind.AdamW,
                                             (float)hp.GetProperty("lr").GetDouble(), (float)hp.GetProperty("weight_decay").GetDouble(), expected.Count);
        double worst = losses.Zip(expected, (a, e) => Math.Abs(a - e) / Math.Abs(e)).Max();
        TestContext.Out.WriteLine($"{arch} {source}: loss {losses[0]:F6} → {losses[^1]:F6}, max relative difference to PyTorch {worst:E2}");
        for (int step = 0; step < expected.Count; step++)
            Assert.That(losses[step], Is.EqualTo(expected[step]).Within(1e-4 * expected[step]), $"{arch} {source} step {step + 1}");
    }

    /// <summary>
    /// The same parity as a user drives it: rewrite, then <c>onnxlora train</c> on a tokens file whose rows are the
    /// golden batches' unpadded sequences (the trainer pads them on the right and feeds attention_mask and position_ids
    /// by role), A/B from --init-adapter, 20 AdamW steps; metrics.jsonl's losses within 1e-4 relative of PyTorch's.
    /// </summary>
    [TestCase("llama", "opset14")]
    [TestCase("qwen2", "opset17")]
    [TestCase("llama", "builder")]
    [TestCase("llama", "opset17_with_past")]
    public void CliTrainingMatchesPyTorch(string arch, string source)
    {
        using var dir = new TempDir();
        var golden = Golden(arch);
        string model = dir.File("model.onnx");
        if (source == "builder")
            Assert.That(CliRunner.Run("model", "build", "--from", Fixture($"hf-{arch}"), "--out", model).Code, Is.EqualTo(0));
        else File.Copy(Fixture($"{arch}_{source}.onnx"), model);
        var lora = golden.GetProperty("lora");
        var (code, _, err) = CliRunner.Run("rewrite", model, "--out", dir.File("rw"), "--rank", lora.GetProperty("rank").GetInt32().ToString(),
            "--alpha", lora.GetProperty("alpha").GetDouble().ToString(System.Globalization.CultureInfo.InvariantCulture),
            "--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj");
        Assert.That(code, Is.EqualTo(0), err);

        // the init A/B under the rewrite's parameter names
        var manifest = LoraManifest.Load(Path.Combine(dir.File("rw"), RunLayout.LoraConfig));
        var (init, _) = SafeTensorsFile.Read(Fixture(lora.GetProperty("init").GetString()!));
        SafeTensorsFile.Write(dir.File("init.safetensors"), manifest.Targets.SelectMany(t => new[]
        {
            KeyValuePair.Create(t.LoraA, init[t.Module + ".lora_A.weight"]), KeyValuePair.Create(t.LoraB, init[t.Module + ".lora_B.weight"]),
        }));
        int seq = 0;
        var rows = new List<string>();
        foreach (var b in golden.GetProperty("batches").EnumerateArray())
        {
            var ids = b.GetProperty("input_ids").EnumerateArray().ToList();
            var mask = b.GetProperty("attention_mask").EnumerateArray().ToList();
            seq = ids[0].GetArrayLength();
            for (int r = 0; r < ids.Count; r++)
            {
                int length = mask[r].EnumerateArray().Count(m => m.GetInt32() == 1);
                rows.Add(new JsonObject { ["input_ids"] = new JsonArray(ids[r].EnumerateArray().Take(length).Select(x => (JsonNode?)x.GetInt64()).ToArray()) }.ToJsonString());
            }
        }
        File.WriteAllLines(dir.File("train.jsonl"), rows);
        var hp = golden.GetProperty("adamw").GetProperty("hyperparameters");
        string Num(string key) => hp.GetProperty(key).GetDouble().ToString("R", System.Globalization.CultureInfo.InvariantCulture);
        (code, _, err) = CliRunner.Run("train", "--model", dir.File("rw"), "--data", dir.File("train.jsonl"), "--format", "tokens", "--seq", seq.ToString(),
            "--batch", "2", "--no-shuffle", "--max-steps", "20", "--optimizer", "adamw", "--lr", Num("lr"), "--weight-decay", Num("weight_decay"),
            "--schedule", "constant", "--init-adapter", dir.File("init.safetensors"), "--threads", "1", "--out", dir.File("run"));
        Assert.That(code, Is.EqualTo(0), err);
        var losses = File.ReadLines(Path.Combine(dir.File("run"), "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject())
            .Where(o => (string)o["kind"]! == "train").Select(o => (double)o["loss"]!).ToList();
        var expected = golden.GetProperty("adamw").GetProperty("losses_float32").EnumerateArray().Select(x => x.GetDouble()).ToList();
        Assert.That(losses, Has.Count.EqualTo(expected.Count));
        TestContext.Out.WriteLine($"{arch} {source} via the CLI: max relative difference {losses.Zip(expected, (a, e) => Math.Abs(a - e) / e).Max():E2}");
        for (int step = 0; step < expected.Count; step++)
            Assert.That(losses[step], Is.EqualTo(expected[step]).Within(1e-4 * expected[step]), $"{arch} {source} step {step + 1}");
    }

    [Test]
    public void ExportTrainsEvaluatesGeneratesAndExportsPeftFromTheCli()
    {
        using var dir = new TempDir();
        string Run(params string[] args)
        {
            var (code, stdout, stderr) = CliRunner.Run(args);
            Assert.That(code, Is.EqualTo(0), $"{string.Join(" ", args)}: {stderr}");
            return stdout;
        }
        var inspect = Run("inspect", Fixture("qwen2_opset14.onnx"));
        StringAssert.Contains("attention_mask", inspect);
        StringAssert.Contains("position_ids", inspect);
        Run("rewrite", Fixture("qwen2_opset14.onnx"), "--out", dir.File("rw"), "--rank", "4", "--targets", "all-linear");
        var random = new Random(1);
        File.WriteAllLines(dir.File("train.jsonl"), Enumerable.Range(0, 16).Select(i =>
            new JsonObject { ["input_ids"] = new JsonArray(Enumerable.Range(0, 4 + i % 7).Select(_ => (JsonNode?)random.Next(1, 128)).ToArray()) }.ToJsonString()));
        Run("train", "--model", dir.File("rw"), "--data", dir.File("train.jsonl"), "--format", "tokens", "--seq", "12", "--batch", "4",
            "--max-steps", "4", "--lr", "1e-2", "--threads", "1", "--out", dir.File("run"));
        var eval = Run("eval", "--model", dir.File("rw"), "--adapter", Path.Combine(dir.File("run"), "adapter.onnx_adapter"), "--data", dir.File("train.jsonl"), "--format", "tokens", "--seq", "12");
        StringAssert.Contains("perplexity", eval);
        var generated = Run("generate", "--model", dir.File("rw"), "--adapter", Path.Combine(dir.File("run"), "adapter.onnx_adapter"), "--ids", "5,6,7", "-n", "3");
        var ids = generated.Trim().Split('\n')[^1].Split(',').Select(int.Parse).ToArray();   // after the adapter's name
        Assert.That(ids, Has.Length.AnyOf(3, 6), generated);
        Assert.That(ids, Has.All.InRange(0, 127));
        Run("export", dir.File("run"), "--format", "peft", "--out", dir.File("peft"));
        var (peft, _) = SafeTensorsFile.Read(Path.Combine(dir.File("peft"), "adapter_model.safetensors"));
        Assert.That(peft.Keys, Does.Contain("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    }

    [Test]
    public void EveryOpHasAGradientEntryAndAnInferredRank()
    {
        var models = new[] { "llama_opset14.onnx", "llama_opset17.onnx", "llama_opset17_with_past.onnx", "qwen2_opset14.onnx", "qwen2_opset17.onnx" }
            .Select(f => (f, OnnxFile.Load(Fixture(f)))).Append(("builder", HfModels.Build(Fixture("hf-llama")).Model));
        foreach (var (name, model) in models)
        {
            var missing = model.Graph.Node.Where(n => !GradientRegistry.IsRegistered(n.Domain, n.OpType)).Select(n => n.OpType).Distinct();
            Assert.That(missing, Is.Empty, $"{name}: ops without a gradient registry entry");
            var shapes = ShapeInference.Run(model);
            var unknown = model.Graph.Node.Where(n => n.Output.Any(o => shapes.ShapeOf(o)?.Rank is null)).Select(n => $"{n.OpType} {n.Name}").ToList();
            Assert.That(unknown, Is.Empty, $"{name}: outputs whose rank shape inference does not know");
        }
    }

    [Test]
    public void WithPastExportGivesTheSameLogitsAndGenerations()
    {
        // an empty cache ([batch, kv_heads, 0, head_dim]) gives the padded batch's logits
        var golden = Golden("llama");
        using (var session = new InferenceSession(Fixture("llama_opset17_with_past.onnx")))
        {
            var names = new List<string> { LlamaBuilder.InputIds, LlamaBuilder.AttentionMask, LlamaBuilder.PositionIds };
            var values = names.Select(n => { var (v, shape) = Ids(golden.GetProperty(n)); return OrtValue.CreateTensorValueFromMemory(v, shape); }).ToList();
            long batch = golden.GetProperty("input_ids").GetArrayLength();
            for (int layer = 0; layer < 2; layer++)
                foreach (var kv in new[] { "key", "value" })
                {
                    names.Add($"past_key_values.{layer}.{kv}");
                    values.Add(OrtValue.CreateTensorValueFromMemory(Array.Empty<float>(), [batch, 2, 0, 8]));
                }
            using var options = new RunOptions();
            using var outputs = session.Run(options, names, values, [LlamaBuilder.Logits]);
            GptBuilderTests.AssertClose(outputs[0].GetTensorDataAsSpan<float>().ToArray(), GoldenLogits(golden), LogitTolerance, "with past, empty cache");
            values.ForEach(v => v.Dispose());
        }

        // greedy generation from the rewritten with-past export (cache fed back) = from the plain export (full recompute)
        using var dir = new TempDir();
        string Generate(string file)
        {
            var rw = dir.File(file);
            Assert.That(CliRunner.Run("rewrite", Fixture(file), "--out", rw, "--rank", "2", "--targets", "q_proj").Code, Is.EqualTo(0));
            var (code, stdout, stderr) = CliRunner.Run("generate", "--model", rw, "--ids", "5,17,42", "-n", "8");
            Assert.That(code, Is.EqualTo(0), stderr);
            return stdout.Trim();
        }
        var plain = Generate("llama_opset17.onnx");
        TestContext.Out.WriteLine($"greedy continuation: {plain}");
        Assert.That(Generate("llama_opset17_with_past.onnx"), Is.EqualTo(plain));
    }

    [Test]
    public void Gpt2FolderImportsAsBefore()
    {
        // the GPT-2 fixture folder (config.json + model.safetensors without the transformer. prefix) through the same entry point
        var gpt2 = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "hf-gpt2-tiny");
        var golden = JsonDocument.Parse(File.ReadAllText(Path.Combine(gpt2, "golden.json"))).RootElement;
        var (model, description, _) = HfModels.Build(gpt2);
        StringAssert.StartsWith("GPT-2", description);
        var rows = golden.GetProperty("input_ids").EnumerateArray().Select(r => r.EnumerateArray().Select(x => x.GetInt64()).ToArray()).ToArray();
        var ids = new long[rows.Length, rows[0].Length];
        for (int b = 0; b < rows.Length; b++) for (int t = 0; t < rows[b].Length; t++) ids[b, t] = rows[b][t];
        using var session = new InferenceSession(model.ToByteArray());
        GptBuilderTests.AssertClose(GptBuilderTests.OrtLogits(session, ids, out _), GoldenLogits(golden), LogitTolerance, "hf-gpt2-tiny folder");
    }

    static string CopyFolder(string arch, TempDir dir)
    {
        var target = Path.Combine(dir.Path, arch);
        Directory.CreateDirectory(target);
        foreach (var f in Directory.GetFiles(Fixture($"hf-{arch}"))) File.Copy(f, Path.Combine(target, Path.GetFileName(f)));
        return target;
    }

    static string ImportError(string folder) =>
        Assert.Catch(() => HfModels.Build(folder))!.Message;

    [Test]
    public void ImportErrorsNameTheFileAndTensor()
    {
        using var dir = new TempDir();

        // a shape that does not fit config.json: rewrite one tensor of the second shard
        var llama = CopyFolder("llama", dir);
        var shard = Path.Combine(llama, "model-00002-of-00002.safetensors");
        var (tensors, meta) = SafeTensorsFile.Read(shard);
        var victim = tensors.Keys.First(k => k.EndsWith("k_proj.weight", StringComparison.Ordinal));
        tensors[victim] = SafeTensor.FromFloats([32, 32], new float[32 * 32]);
        SafeTensorsFile.Write(shard, tensors, meta);
        var message = ImportError(llama);
        StringAssert.Contains(shard, message);
        StringAssert.Contains($"'{victim}' has shape [32, 32]", message);
        StringAssert.Contains("[16, 32]", message);

        // a tensor of an integer dtype
        tensors[victim] = new SafeTensor("I32", [16, 32], new byte[16 * 32 * 4]);
        SafeTensorsFile.Write(shard, tensors, meta);
        StringAssert.Contains($"'{victim}' has dtype I32", ImportError(llama));

        // a missing shard, and an index entry that leaves the folder
        File.Delete(shard);
        StringAssert.Contains("missing shard", ImportError(llama));
        var index = Path.Combine(llama, HfCheckpoint.IndexFile);
        var json = JsonNode.Parse(File.ReadAllText(index))!;
        json["weight_map"]!["model.norm.weight"] = "../outside.safetensors";
        File.WriteAllText(index, json.ToJsonString());
        StringAssert.Contains("'../outside.safetensors' is not a file name in the folder", ImportError(llama));

        // a missing tensor; a head that config.json says is tied but differs; an architecture we do not build
        var qwen = CopyFolder("qwen2", dir);
        var weights = Path.Combine(qwen, HfCheckpoint.WeightsFile);
        (tensors, meta) = SafeTensorsFile.Read(weights);
        var embedding = tensors[LlamaLayout.TokenEmbedding];
        tensors.Remove("model.layers.1.self_attn.v_proj.bias");
        SafeTensorsFile.Write(weights, tensors, meta);
        StringAssert.Contains("missing tensor 'model.layers.1.self_attn.v_proj.bias' [16]", ImportError(qwen));
        (tensors, meta) = SafeTensorsFile.Read(Fixture("hf-qwen2", HfCheckpoint.WeightsFile));
        tensors[LlamaLayout.LmHead] = SafeTensor.FromFloats(embedding.Shape, new float[embedding.ElementCount]);
        SafeTensorsFile.Write(weights, tensors, meta);
        StringAssert.Contains("'lm_head.weight' differs from 'model.embed_tokens.weight'", ImportError(qwen));
        var config = Path.Combine(qwen, HfCheckpoint.ConfigFile);
        File.WriteAllText(config, File.ReadAllText(config).Replace("Qwen2ForCausalLM", "GemmaForCausalLM"));
        StringAssert.Contains("architecture 'GemmaForCausalLM' cannot be imported", ImportError(qwen));
        File.WriteAllText(config, File.ReadAllText(config).Replace("GemmaForCausalLM", "Qwen2ForCausalLM").Replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3"));
        StringAssert.Contains("num_attention_heads (4) must be a multiple of num_key_value_heads (3)", ImportError(qwen));
    }

    [Test]
    public void RandomInitIsSeededAndFollowsTransformers()
    {
        var config = LlamaConfig.Preset("tiny-qwen2");
        var a = LlamaWeights.Random(config, seed: 4);
        var b = LlamaWeights.Random(config, seed: 4);
        var c = LlamaWeights.Random(config, seed: 5);
        foreach (var (name, _) in LlamaLayout.Tensors(config))
        {
            Assert.That(a[name].Values, Is.EqualTo(b[name].Values), name);
            var v = a[name].Values;
            if (LlamaLayout.IsNorm(name)) Assert.That(v, Has.All.EqualTo(1f), name);
            else if (name.EndsWith(".bias", StringComparison.Ordinal)) Assert.That(v, Has.All.EqualTo(0f), name);
            else
            {
                Assert.That(v, Is.Not.EqualTo(c[name].Values), name);
                double std = Math.Sqrt(v.Average(x => (double)x * x));
                Assert.That(std, Is.EqualTo(0.02).Within(0.004), $"{name}: N(0, 0.02) (transformers' initializer_range)");
            }
        }
        Assert.That(a.ParameterCount, Is.EqualTo(config.ParameterCount));
    }

    [Test]
    public void PresetsHaveThePublishedShapes()
    {
        // parameter counts of the published checkpoints (tied heads counted once)
        Assert.That(LlamaConfig.Preset("smollm2-135m").ParameterCount, Is.EqualTo(134_515_008));
        Assert.That(LlamaConfig.Preset("qwen2.5-0.5b").ParameterCount, Is.EqualTo(494_032_768));
        Assert.That(LlamaConfig.Preset("llama-3.2-1b").ParameterCount, Is.EqualTo(1_235_814_400));
        // Llama 3's rope_scaling leaves high frequencies alone and divides the lowest by its factor (32)
        var llama = LlamaConfig.Preset("llama-3.2-1b");
        var inv = llama.InverseFrequencies();
        Assert.That(inv[0], Is.EqualTo(1f));
        Assert.That(inv[^1], Is.EqualTo((float)(1 / Math.Pow(500000, 62.0 / 64) / 32)).Within(1e-6).Percent);
        var roundTrip = LlamaConfig.FromHfConfig(llama.ToHfConfig(), "config.json");
        Assert.That(roundTrip, Is.EqualTo(llama));
    }
}
