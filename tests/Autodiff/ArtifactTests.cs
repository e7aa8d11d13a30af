using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Onnx;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Autodiff;

/// <summary>
/// Whole-model checks: LoRA-rewritten exports (torch opsets 14 and 17, HF Conv1D/Gemm) → training artifacts → ORT.
/// The train model's LoRA gradients are compared with central finite differences of the eval model's loss along
/// random unit directions, one per parameter tensor checked (float32 models: h = 1e-2; loss rounding ≈ 3e-7/h ≈ 3e-5
/// and O(h²) truncation stay well inside the tolerance 2e-3·|d| + 2e-4).
/// </summary>
public class ArtifactTests
{
    static string Fixture(string name) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "torch", name);

    static (ModelProto View, LoraManifest Manifest) Rewrite(string file, int rank = 4)
    {
        var model = OnnxFile.Load(Fixture(file));
        var r = LoraRewrite.Rewrite(model, new LoraConfig { Rank = rank, Alpha = 8, Seed = 3 }, file, "0");
        return (r.TrainingModel, r.Manifest);
    }

    /// <summary>Runs a model by name → (values, shape) feeds; float, long and bool arrays.</summary>
    internal static Dictionary<string, float[]> Run(InferenceSession s, Dictionary<string, (Array Values, long[] Shape)> feeds, params string[] outputs)
    {
        var values = new List<OrtValue>();
        try
        {
            foreach (var (_, (v, shape)) in feeds)
                values.Add(v switch
                {
                    float[] f => OrtValue.CreateTensorValueFromMemory(f, shape),
                    long[] l => OrtValue.CreateTensorValueFromMemory(l, shape),
                    bool[] b => OrtValue.CreateTensorValueFromMemory(b, shape),
                    _ => throw new ArgumentException(v.GetType().Name),
                });
            using var ro = new RunOptions();
            using var res = s.Run(ro, feeds.Keys.ToList(), values, outputs);
            return outputs.Zip(res).ToDictionary(p => p.First, p => p.Second.GetTensorDataAsSpan<float>().ToArray());
        }
        finally { foreach (var v in values) v.Dispose(); }
    }

    static float[] Normal(Random rng, long n, double std) =>
        Enumerable.Range(0, (int)n).Select(_ => (float)(std * Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()))).ToArray();

    [TestCase("gpt_opset14_decomposed_ln_erf_gelu_qkvbias.onnx", TrainingTask.Lm)]
    [TestCase("gpt_opset17_fused_ln_tanh_gelu_noqkvbias.onnx", TrainingTask.Lm)]
    [TestCase("gpt_opset17_custom_ln_tanh_gelu.onnx", TrainingTask.Lm)]
    [TestCase("hf_gpt2_conv1d_opset14.onnx", TrainingTask.Lm)]
    [TestCase("gpt_opset17_fused_ln_tanh_gelu_noqkvbias.onnx", TrainingTask.Cls)]
    [TestCase("hf_gpt2_conv1d_opset14.onnx", TrainingTask.Cls)]
    [TestCase("../tiny.onnx", TrainingTask.Lm)]
    [TestCase("../tiny.onnx", TrainingTask.Cls, HeadMode.Lora)]
    public void LoraGradientsMatchFiniteDifferences(string file, TrainingTask task, HeadMode head = HeadMode.Full)
    {
        var (view, manifest) = Rewrite(file);
        var art = TrainingArtifacts.Build(view, manifest, new ArtifactOptions { Task = task, Classes = 3, HeadSeed = 5, HeadMode = head });
        if (head == HeadMode.Lora)
        {
            Assert.That(art.Spec.Params.Select(p => p.Name), Does.Contain(TrainingArtifacts.HeadLoraA).And.Contain(TrainingArtifacts.HeadLoraB).And.Not.Contain(TrainingArtifacts.HeadWeight));
            Assert.That(art.Spec.FrozenExtras, Is.EqualTo(new[] { TrainingArtifacts.HeadWeight }));
            Assert.That(art.InitialParams.Graph.Output.Select(o => o.Name), Does.Contain(TrainingArtifacts.HeadWeight));
        }
        var rng = new Random(11);
        long vocab = ValueInfos.Dims(view.Graph.Output[0])![^1].Value ?? 96;
        const int batch = 2, seq = 7;
        var ids = Enumerable.Range(0, batch * seq).Select(_ => (long)rng.Next((int)vocab)).ToArray();
        var feeds = new Dictionary<string, (Array, long[])> { ["input_ids"] = (ids, [batch, seq]) };
        if (task == TrainingTask.Lm)
        {
            var labels = (long[])ids.Clone();
            labels[3] = Losses.IgnoreIndex; labels[seq + 5] = Losses.IgnoreIndex;   // ignored positions
            feeds["labels"] = (labels, [batch, seq]);
        }
        else
        {
            feeds["labels"] = (new long[] { 2, 0 }, [batch]);
            feeds["lengths"] = (new long[] { seq, 4 }, [batch]);
        }
        // B is zero at init, which would hide every A gradient: use random values for all parameters
        foreach (var p in art.Spec.Params) feeds[p.Name] = (Normal(rng, p.Shape.Aggregate(1L, (a, b) => a * b), 0.2), p.Shape);

        using var train = new InferenceSession(art.TrainModel.ToByteArray());
        using var eval = new InferenceSession(art.EvalModel.ToByteArray());
        var trainFeeds = new Dictionary<string, (Array, long[])>(feeds) { [TrainingArtifacts.ResetGrad] = (new[] { true }, []) };
        foreach (var p in art.Spec.Params) trainFeeds[TrainingArtifacts.GradIn(p.Name)] = (new float[p.Shape.Aggregate(1L, (a, b) => a * b)], p.Shape);
        var gradNames = art.Spec.Params.Select(p => Optimizers.Grad(p.Name)).ToArray();
        var got = Run(train, trainFeeds, [TrainingArtifacts.Loss, .. gradNames]);
        double loss = Run(eval, feeds, TrainingArtifacts.Loss)[TrainingArtifacts.Loss][0];
        Assert.That(got[TrainingArtifacts.Loss][0], Is.EqualTo(loss).Within(1e-5 * Math.Abs(loss)), "train and eval models compute the same loss");

        // first and last A and B, plus the head; each along its own random unit direction
        var checkedParams = art.Spec.Params.Where((p, i) => i < 2 || i >= art.Spec.Params.Count - 2).ToList();
        const double h = 1e-2;
        foreach (var p in checkedParams)
        {
            var x = (float[])feeds[p.Name].Item1;
            var v = Normal(rng, x.Length, 1);
            var norm = Math.Sqrt(v.Sum(a => (double)a * a));
            double analytic = 0;
            var grad = got[Optimizers.Grad(p.Name)];
            for (int i = 0; i < x.Length; i++) analytic += grad[i] * v[i] / norm;
            double Shifted(double s)
            {
                var y = x.Select((a, i) => (float)(a + s * v[i] / norm)).ToArray();
                var f = new Dictionary<string, (Array, long[])>(feeds) { [p.Name] = (y, p.Shape) };
                return Run(eval, f, TrainingArtifacts.Loss)[TrainingArtifacts.Loss][0];
            }
            double numeric = (Shifted(h) - Shifted(-h)) / (2 * h);
            Assert.That(analytic, Is.EqualTo(numeric).Within(2e-3 * Math.Abs(numeric) + 2e-4),
                $"{file} {task}: d loss / d {p.Name} along a random direction: graph {analytic:G6}, finite difference {numeric:G6}");
        }

        // accumulation: reset_grad=false adds the step's gradients to grad.in
        var again = new Dictionary<string, (Array, long[])>(trainFeeds) { [TrainingArtifacts.ResetGrad] = (new[] { false }, []) };
        foreach (var p in art.Spec.Params) again[TrainingArtifacts.GradIn(p.Name)] = (got[Optimizers.Grad(p.Name)], p.Shape);
        var doubled = Run(train, again, gradNames);
        var first = gradNames[0];
        for (int i = 0; i < doubled[first].Length; i++)
            Assert.That(doubled[first][i], Is.EqualTo(2 * got[first][i]).Within(1e-6 + 1e-6 * Math.Abs(got[first][i])), $"accumulated {first}[{i}]");
    }
}

/// <summary>Save → files ORT loads, and an artifacts.json that round-trips and gives every input and output a role.</summary>
public class ArtifactFileTests
{
    [Test]
    public void TheHeadStartsFromSeededNormalsThatAreTheSameOnEveryPlatform()
    {
        var file = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "tiny.onnx");
        var r = LoraRewrite.Rewrite(OnnxFile.Load(file), new LoraConfig { Rank = 2, Alpha = 2 }, file, "0");
        float[] Head(int seed) => Tensors.ToFloats(TrainingArtifacts.Build(r.TrainingModel, r.Manifest, new ArtifactOptions { Task = TrainingTask.Cls, Classes = 64, HeadSeed = seed })
            .InitialParams.Graph.Initializer.Single(t => t.Name == TrainingArtifacts.HeadWeight + ".init"));
        var head = Head(7);
        // pinned bits: SeededNormal uses only +, ×, ÷, √ (no libm), so these hold on every platform; a changed generator shows here
        Assert.That(head.Take(4).Select(BitConverter.SingleToInt32Bits), Is.EqualTo(PinnedHeadBits), string.Join(", ", head.Take(4).Select(v => v.ToString("R"))));
        // N(0, 0.02²): the sample std of d·64 values lies within 10 % of 0.02 (over 5 standard errors for ≥ 1000 values)
        double std = Math.Sqrt(head.Select(v => (double)v * v).Average());
        Assert.That(head, Has.Length.GreaterThanOrEqualTo(1000));
        Assert.That(std, Is.EqualTo(0.02).Within(0.002));
        Assert.That(Head(8).Take(4), Is.Not.EqualTo(head.Take(4)), "another seed, another head");
    }

    static readonly int[] PinnedHeadBits = [1008183305, -1136247890, 1023553335, 1017936170];   // 0.009256371, -0.01209919, 0.03178331, 0.02105387

    [TestCase("\"optimizer\": \"adamw\"", "\"optimizer\": \"adam\"", "not a valid")]
    [TestCase("\"optimizer\": \"adamw\"", "\"optimizer\": 7", "not one of its names")]
    [TestCase("\"task\": \"lm\"", "\"task\": \"seq2seq\"", "not a valid")]
    public void AnUnknownEnumValueIsRefusedNamingTheFile(string good, string bad, string message)
    {
        var file = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "tiny.onnx");
        var r = LoraRewrite.Rewrite(OnnxFile.Load(file), new LoraConfig { Rank = 2, Alpha = 2 }, file, "0");
        using var dir = new TempDir();
        TrainingArtifacts.Build(r.TrainingModel, r.Manifest).Save(dir.Path);
        var path = Path.Combine(dir.Path, RunLayout.ArtifactsSpec);
        var text = File.ReadAllText(path);
        Assert.That(text, Does.Contain(good));
        File.WriteAllText(path, text.Replace(good, bad, StringComparison.Ordinal));
        Assert.That(() => TrainingArtifacts.LoadSpec(dir.Path), Throws.TypeOf<InvalidDataException>().With.Message.Contains(path).And.Message.Contains(message));
    }

    [Test]
    public void SaveWritesLoadableModelsAndACompleteSpec()
    {
        var file = Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "tiny.onnx");
        var r = LoraRewrite.Rewrite(OnnxFile.Load(file), new LoraConfig { Rank = 4, Alpha = 8 }, file, "0");
        var art = TrainingArtifacts.Build(r.TrainingModel, r.Manifest, new ArtifactOptions { Task = TrainingTask.Cls, Classes = 2 });
        using var dir = new TempDir();
        art.Save(dir.Path);
        var spec = TrainingArtifacts.LoadSpec(dir.Path);
        Assert.That(spec, Is.EqualTo(art.Spec).Using<ArtifactsSpec>((a, b) => System.Text.Json.JsonSerializer.Serialize(a) == System.Text.Json.JsonSerializer.Serialize(b)));
        Assert.That((spec.Task, spec.HeadMode, spec.Pooling, spec.Optimizer), Is.EqualTo((TrainingTask.Cls, HeadMode.Full, Pooling.Last, OptimizerKind.AdamW)));
        // the file keeps the spelling earlier artifacts have, which every reader parses through the same converters
        var raw = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, RunLayout.ArtifactsSpec)))!;
        Assert.That(new[] { "task", "head_mode", "pooling", "optimizer" }.Select(k => (string?)raw[k]), Is.EqualTo(new[] { "cls", "full", "last", "adamw" }));
        Assert.That(spec.Params.Select(p => p.Name), Does.Contain(TrainingArtifacts.HeadWeight));
        foreach (var (kind, model) in new[] { ("train", spec.Train), ("eval", spec.Eval), ("optimizer", spec.OptimizerModel) })
        {
            Assert.That(model.Inputs.Concat(model.Outputs).Where(io => io.Role == IoRole.Other).Select(io => io.Name), Is.Empty, $"{kind}: every input and output has a role");
            using var session = new InferenceSession(Path.Combine(dir.Path, spec.Files[kind]));
            Assert.That(session.InputMetadata.Keys, Is.SupersetOf(model.Inputs.Where(i => i.Role != IoRole.DropoutTrainingMode).Select(i => i.Name)));
            Assert.That(session.OutputMetadata.Keys, Is.EquivalentTo(model.Outputs.Select(o => o.Name)));
        }
        using var init = new InferenceSession(Path.Combine(dir.Path, spec.Files["initial_params"]));
        Assert.That(init.OutputMetadata.Keys, Is.EquivalentTo(spec.Params.Select(p => p.Name)));
        Assert.That(spec.Train.Inputs.Where(i => i.Role == IoRole.Param).Select(i => i.Name), Is.EqualTo(spec.Params.Select(p => p.Name)), "the train model takes the parameters in the spec's order");
    }
}
