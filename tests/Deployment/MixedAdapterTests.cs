using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// Mixed-adapter batching: one run whose rows use the base model, adapter a (rank 4) and adapter b (rank 2, from
/// another rewrite of the same base) gives every row what AdapterHost gives it alone with its adapter.
/// </summary>
public class MixedAdapterTests
{
    static string Fixture(string path) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", path);

    // row alone vs row in the mixed batch: the same math, zero padding adds exact zeros, but a batched MatMul may sum
    // in another order (other kernels, CUDA), so allow float32 rounding: ~1e-7 relative per op over a few dozen ops and
    // layers stays below 1e-5; 1e-4 relative leaves margin. (On the CPU EP here the rows match bit for bit.)
    const double RelativeTolerance = 1e-4;

    public static IEnumerable<TestCaseData> Models()
    {
        yield return new TestCaseData("optimum/gpt2_opset17.onnx", "c_attn,c_fc");
        yield return new TestCaseData("optimum/gpt2_opset17_with_past.onnx", "c_attn,c_proj");
        yield return new TestCaseData("llama/llama_opset17.onnx", "q_proj,v_proj,down_proj");
    }

    sealed record Setup(string RewriteDir, LoraAdapter A, LoraAdapter B, string APath, string BPath);

    static Setup Prepare(string model, string targets, TempDir dir)
    {
        var rw4 = LoraRewrite.RewriteFile(model, new LoraConfig { Rank = 4, Alpha = 8, TargetModules = targets.Split(',') }, dir.File("rw4"));
        var rw2 = LoraRewrite.RewriteFile(model, new LoraConfig { Rank = 2, Alpha = 3, TargetModules = targets.Split(',') }, dir.File("rw2"));
        var a = LoraAdapter.CreateRandom(rw4.Manifest, seed: 5, amplitude: 0.5);
        var b = LoraAdapter.CreateRandom(rw2.Manifest, seed: 9, amplitude: 0.5);
        OnnxAdapterFile.Write(dir.File("a.onnx_adapter"), a);
        OnnxAdapterFile.Write(dir.File("b.onnx_adapter"), b);
        return new Setup(dir.File("rw4"), a, b, dir.File("a.onnx_adapter"), dir.File("b.onnx_adapter"));
    }

    /// <summary>Logits [rows, tokens, vocab] of equal-length rows, with every token-side input fed by role (empty caches).</summary>
    static float[] Logits(ModelRoles roles, IReadOnlyList<IReadOnlyList<int>> rows,
                          Func<IReadOnlyDictionary<string, OrtValue>, IDisposableReadOnlyCollection<OrtValue>> run)
    {
        var tokens = PaddedTokens.Pad(rows, rows[0].Count, padId: 0);
        var feeds = roles.Inputs.Where(i => i.Role != IoRole.AdapterIndex).ToDictionary(i => i.Name, i => SignatureFeeds.Create(i, tokens));
        try
        {
            using var outputs = run(feeds);
            return outputs[0].GetTensorDataAsSpan<float>().ToArray();
        }
        finally { foreach (var v in feeds.Values) v.Dispose(); }
    }

    [TestCaseSource(nameof(Models))]
    public void Each_row_of_a_mixed_batch_equals_that_row_alone_with_its_adapter(string file, string targets)
    {
        using var dir = new TempDir();
        var s = Prepare(Fixture(file), targets, dir);
        var deploy = Path.Combine(s.RewriteDir, RunLayout.DeployableModel);
        using var host = AdapterHost.Create(deploy);
        host.AddAdapter("a", s.APath);
        host.AddAdapter("b", s.BPath);
        using var mixed = MixedAdapterBatch.Create(s.RewriteDir, [KeyValuePair.Create("a", s.A), KeyValuePair.Create("b", s.B)]);
        Assert.That(mixed.AdapterSlots, Is.EqualTo(new string?[] { null, "a", "b" }));

        var mixedModel = BuildMixedDeployable.Run(OnnxFile.Load(deploy), LoraManifest.Load(Path.Combine(s.RewriteDir, RunLayout.LoraConfig)));
        ModelValidator.Check(mixedModel, "mixed");
        var roles = SignatureRoles.Decide(mixedModel);
        Assert.That(roles.Input(IoRole.AdapterIndex), Is.EqualTo(BuildMixedDeployable.AdapterIndexInput));
        var hostRoles = SignatureRoles.Decide(OnnxFile.Load(deploy));

        IReadOnlyList<int>[] rows = [[5, 17, 99, 3, 42], [8, 11, 2, 64, 7], [120, 1, 33, 9, 4], [5, 17, 99, 3, 42], [8, 11, 2, 64, 7]];
        string?[] adapters = [null, "a", "b", "b", "a"];
        var batched = Logits(roles, rows, feeds => mixed.Run(adapters, feeds, [roles.Logits]));
        int perRow = batched.Length / rows.Length;
        var byAdapter = new Dictionary<string, float[]>();
        for (int r = 0; r < rows.Length; r++)
        {
            var alone = Logits(hostRoles, [rows[r]], feeds => host.Run(adapters[r], feeds, [hostRoles.Logits]));
            Assert.That(alone, Has.Length.EqualTo(perRow));
            var row = batched.AsSpan(r * perRow, perRow).ToArray();
            double scale = alone.Max(v => Math.Abs((double)v));
            Assert.That(TinyDeployable.MaxAbsDiff(row, alone), Is.LessThanOrEqualTo(RelativeTolerance * scale),
                        $"{file}: row {r} (adapter {adapters[r] ?? "none"}) mixed vs alone");
            if (r < 3) byAdapter[adapters[r] ?? ""] = alone;
        }
        // the adapters change the logits, and differently (else the comparison would show nothing)
        Assert.That(TinyDeployable.MaxAbsDiff(byAdapter["a"], byAdapter[""]), Is.GreaterThan(1e-2));
        Assert.That(TinyDeployable.MaxAbsDiff(byAdapter["b"], byAdapter[""]), Is.GreaterThan(1e-2));
    }

    [Test]
    public void Two_dimensional_activations_and_a_model_without_token_ids_work_too()
    {
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        var a = LoraAdapter.CreateRandom(files.Manifest, seed: 3, amplitude: 0.5);
        OnnxAdapterFile.Write(dir.File("a.onnx_adapter"), a);
        using var host = AdapterHost.Create(files.Deploy);
        host.AddAdapter("a", dir.File("a.onnx_adapter"));
        using var mixed = MixedAdapterBatch.Load(dir.Path, [KeyValuePair.Create("a", dir.File("a.onnx_adapter"))]);

        var x = TinyDeployable.Input(4, seed: 2);                  // [4, in]: the branches see 2-D x
        string?[] adapters = [null, "a", "a", null];
        using var input = OrtValue.CreateTensorValueFromMemory(x, [4, TinyDeployable.In]);
        using var outputs = mixed.Run(adapters, new Dictionary<string, OrtValue> { ["x"] = input }, ["y"]);
        var y = outputs[0].GetTensorDataAsSpan<float>().ToArray();
        for (int r = 0; r < 4; r++)
        {
            using var one = OrtValue.CreateTensorValueFromMemory(x[(r * TinyDeployable.In)..((r + 1) * TinyDeployable.In)], [1, TinyDeployable.In]);
            using var alone = host.Run(adapters[r], new Dictionary<string, OrtValue> { ["x"] = one }, ["y"]);
            Assert.That(TinyDeployable.MaxAbsDiff(y[(r * TinyDeployable.Out)..((r + 1) * TinyDeployable.Out)], alone[0].GetTensorDataAsSpan<float>().ToArray()),
                        Is.LessThan(1e-5), $"row {r}");
        }
    }

    [Test]
    public void A_bad_index_an_unknown_adapter_or_a_wrong_row_count_is_an_error_naming_it()
    {
        using var dir = new TempDir();
        var s = Prepare(Fixture("optimum/gpt2_opset17.onnx"), "c_attn", dir);
        using var mixed = MixedAdapterBatch.Create(s.RewriteDir, [KeyValuePair.Create("a", s.A), KeyValuePair.Create("b", s.B)]);
        var roles = SignatureRoles.Decide(BuildMixedDeployable.Run(OnnxFile.Load(Path.Combine(s.RewriteDir, RunLayout.DeployableModel)),
                                                                   LoraManifest.Load(Path.Combine(s.RewriteDir, RunLayout.LoraConfig))));
        IReadOnlyList<int>[] rows = [[1, 2, 3], [4, 5, 6]];

        var outOfRange = Assert.Throws<ArgumentOutOfRangeException>(() => Logits(roles, rows, f => mixed.RunSlots([0, 3], f)));
        Assert.That(outOfRange!.Message, Does.Contain("'adapter_index'").And.Contain("row 1 has slot 3"));
        Assert.Throws<ArgumentOutOfRangeException>(() => Logits(roles, rows, f => mixed.RunSlots([-1, 0], f)));
        var unknown = Assert.Throws<KeyNotFoundException>(() => Logits(roles, rows, f => mixed.Run(["a", "c"], f)));
        Assert.That(unknown!.Message, Does.Contain("'c'").And.Contain("row 1"));
        var count = Assert.Throws<ArgumentException>(() => Logits(roles, rows, f => mixed.Run(["a"], f)));
        Assert.That(count!.Message, Does.Contain("'adapter_index'").And.Contain("batch of 2 rows"));
    }

    [Test]
    public void An_adapter_for_modules_the_rewrite_did_not_target_is_refused()
    {
        using var dir = new TempDir();
        var model = Fixture("optimum/gpt2_opset17.onnx");
        LoraRewrite.RewriteFile(model, new LoraConfig { Rank = 2, Alpha = 2, TargetModules = ["c_attn"] }, dir.File("attn"));
        var fc = LoraRewrite.RewriteFile(model, new LoraConfig { Rank = 2, Alpha = 2, TargetModules = ["c_fc"] }, dir.File("fc"));
        var e = Assert.Throws<InvalidDataException>(() =>
            MixedAdapterBatch.Create(dir.File("attn"), [KeyValuePair.Create("x", LoraAdapter.CreateRandom(fc.Manifest, seed: 1))]));
        Assert.That(e!.Message, Does.Contain("adapter 'x'").And.Contain("c_fc"));
    }

    [Test]
    public void The_mixed_model_with_its_default_stacks_is_the_base_model_and_the_pass_refuses_what_it_cannot_mix()
    {
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        var mixed = BuildMixedDeployable.Run(OnnxFile.Load(files.Deploy), files.Manifest);
        ModelValidator.Check(mixed, "mixed");
        Assert.That(mixed.Graph.Input.Select(i => i.Name), Does.Not.Contain(files.Manifest.Targets[0].LoraA));
        var path = dir.File("mixed.onnx");
        OnnxFile.Save(mixed, path);
        var x = TinyDeployable.Input(3, seed: 4);
        using (var session = new InferenceSession(path))
        using (var input = OrtValue.CreateTensorValueFromMemory(x, [3, TinyDeployable.In]))
        using (var index = OrtValue.CreateTensorValueFromMemory(new long[3], [3]))
        using (var run = new RunOptions())
        using (var y = session.Run(run, ["x", BuildMixedDeployable.AdapterIndexInput], [input, index], ["y"]))
            Assert.That(TinyDeployable.MaxAbsDiff(y[0].GetTensorDataAsSpan<float>().ToArray(), TinyDeployable.RunPlain(files.Base, x, 3)), Is.LessThan(1e-6),
                        "every index 0 with the default (zero-rank) stacks runs the base model");

        var again = Assert.Throws<InvalidOperationException>(() => BuildMixedDeployable.Run(mixed, files.Manifest));
        Assert.That(again!.Message, Does.Contain("'adapter_index'"));
        using var halfDir = new TempDir();
        var half = TinyDeployable.Write(halfDir.Path, parameterType: Onnx.TensorProto.Types.DataType.Float16);
        var e = Assert.Throws<NotSupportedException>(() => BuildMixedDeployable.Run(OnnxFile.Load(half.Deploy), half.Manifest));
        Assert.That(e!.Message, Does.Contain(half.Manifest.Targets[0].LoraA).And.Contain("Float16"));
    }
}
