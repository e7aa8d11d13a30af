using Microsoft.ML.OnnxRuntime;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Runtime;

namespace OnnxLora.Tests.Deployment;

public class AdapterHostTests
{
    const int Batch = 3;

    static float[] Run(AdapterHost host, string? adapter, float[] x)
    {
        using var input = OrtValue.CreateTensorValueFromMemory(x, [x.Length / TinyDeployable.In, TinyDeployable.In]);
        using var outputs = host.Run(adapter, new Dictionary<string, OrtValue> { ["x"] = input }, ["y"]);
        return outputs[0].GetTensorDataAsSpan<float>().ToArray();
    }

    /// <summary>The feeds that give the adapter's effect without the adapter API: A and scale·B as plain inputs.</summary>
    static Dictionary<string, (long[], float[])> DirectFeeds(LoraAdapter adapter) =>
        OnnxAdapterFile.DeployableParameters(adapter).ToDictionary(p => p.Name, p => (p.Dims, p.ToFloats()));

    [Test]
    public void Adapter_through_OrtLoraAdapter_equals_feeding_A_and_scaled_B_and_no_adapter_is_the_base()
    {
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        var adapter = LoraAdapter.CreateRandom(files.Manifest, seed: 11, amplitude: 0.5);
        OnnxAdapterFile.Write(dir.File("a.onnx_adapter"), adapter);
        var x = TinyDeployable.Input(Batch, seed: 2);

        using var host = AdapterHost.Create(files.Deploy);
        host.AddAdapter("a", dir.File("a.onnx_adapter"));
        var withAdapter = Run(host, "a", x);
        var direct = TinyDeployable.RunPlain(files.Deploy, x, Batch, DirectFeeds(adapter));
        Assert.That(TinyDeployable.MaxAbsDiff(withAdapter, direct), Is.LessThanOrEqualTo(1e-5));

        var baseline = TinyDeployable.RunPlain(files.Base, x, Batch);
        Assert.That(TinyDeployable.MaxAbsDiff(Run(host, null, x), baseline), Is.LessThanOrEqualTo(1e-6));
        Assert.That(TinyDeployable.MaxAbsDiff(withAdapter, baseline), Is.GreaterThan(1e-3), "the adapter must change the output");
    }

    [Test]
    public void Two_adapters_on_alternating_requests_from_several_threads_do_not_cross_talk()
    {
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        using var host = AdapterHost.Create(files.Deploy);
        string?[] names = ["a", "b", null];
        host.AddAdapter("a", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(LoraAdapter.CreateRandom(files.Manifest, 21, 0.5))));
        host.AddAdapter("b", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(LoraAdapter.CreateRandom(files.Manifest, 22, 0.5))));
        var x = TinyDeployable.Input(Batch, seed: 5);
        var expected = names.Select(n => Run(host, n, x)).ToArray();
        Assert.That(TinyDeployable.MaxAbsDiff(expected[0], expected[1]), Is.GreaterThan(1e-3));

        int mismatches = 0;
        Parallel.For(0, 4 * 60, new ParallelOptions { MaxDegreeOfParallelism = 4 }, i =>
        {
            var y = Run(host, names[i % 3], x);
            if (TinyDeployable.MaxAbsDiff(y, expected[i % 3]) > 1e-6) Interlocked.Increment(ref mismatches);
        });
        Assert.That(mismatches, Is.Zero);
    }

    [Test]
    public void Adapters_can_be_added_and_removed_while_requests_run()
    {
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        using var host = AdapterHost.Create(files.Deploy);
        var bytes = OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(LoraAdapter.CreateRandom(files.Manifest, 31, 0.5)));
        host.AddAdapter("stable", bytes);
        var x = TinyDeployable.Input(Batch, seed: 6);
        var expected = Run(host, "stable", x);

        using var stop = new CancellationTokenSource();
        var churn = Task.Run(() =>
        {
            for (int i = 0; i < 40; i++)
            {
                host.AddAdapter("churn", bytes, replace: true);
                try { Run(host, "churn", x); } catch (KeyNotFoundException) { }
                host.RemoveAdapter("churn");
            }
        });
        var readers = Enumerable.Range(0, 3).Select(_ => Task.Run(() =>
        {
            int bad = 0;
            while (!churn.IsCompleted)
            {
                if (TinyDeployable.MaxAbsDiff(Run(host, "stable", x), expected) > 1e-6) bad++;
                try { if (TinyDeployable.MaxAbsDiff(Run(host, "churn", x), expected) > 1e-6) bad++; }
                catch (KeyNotFoundException) { }      // removed between lookups: a clear error, not a crash
            }
            return bad;
        })).ToArray();
        churn.Wait();
        Assert.That(readers.Sum(r => r.Result), Is.Zero);
        Assert.That(host.AdapterNames, Is.EqualTo(new[] { "stable" }));
        Assert.That(host.RemoveAdapter("churn"), Is.False);
    }

    [Test]
    public void Corrupt_or_mismatched_adapters_fail_clearly_and_the_host_keeps_serving()
    {
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        using var host = AdapterHost.Create(files.Deploy);
        var good = OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(LoraAdapter.CreateRandom(files.Manifest, 41, 0.5)));
        host.AddAdapter("good", good);
        var x = TinyDeployable.Input(Batch, seed: 7);
        var expected = Run(host, "good", x);

        var t0 = files.Manifest.Targets[0];
        var wrongShape = OnnxAdapterFile.Serialize([AdapterParameter.FromFloats(t0.LoraA, [t0.In + 1, 2], new float[(t0.In + 1) * 2])]);
        var unknownName = OnnxAdapterFile.Serialize([AdapterParameter.FromFloats("lora_A.not.in.model", [2, 2], new float[4])]);
        var wrongId = (byte[])good.Clone();
        "XXXX"u8.CopyTo(wrongId.AsSpan(4));
        var cases = new (string Name, byte[] Bytes, string Expect)[]
        {
            ("truncated", good[..(good.Length - 9)], "past the end"),
            ("wrong identifier", wrongId, "identifier"),
            ("wrong shape", wrongShape, "[7, 2]"),
            ("unknown name", unknownName, "lora_A.not.in.model"),
        };
        foreach (var (name, bytes, expect) in cases)
        {
            var file = dir.File(name.Replace(' ', '_') + ".onnx_adapter");
            File.WriteAllBytes(file, bytes);
            var e = Assert.Throws<InvalidDataException>(() => host.AddAdapter(name, file), name)!;
            Assert.That(e.Message, Does.StartWith(file).And.Contain(expect), name);
            Assert.That(TinyDeployable.MaxAbsDiff(Run(host, "good", x), expected), Is.LessThanOrEqualTo(1e-6), $"still serving after '{name}'");
        }
        Assert.That(host.AdapterNames, Is.EqualTo(new[] { "good" }));
        var missing = Assert.Throws<KeyNotFoundException>(() => Run(host, "nope", x))!;
        Assert.That(missing.Message, Does.Contain("'nope'").And.Contain("good"));
    }

    [Test]
    public void Half_precision_adapter_for_a_model_whose_inputs_are_float16()
    {
        using var dir = new TempDir();
        var half = TinyDeployable.Write(Directory.CreateDirectory(dir.File("fp16")).FullName, parameterType: Onnx.TensorProto.Types.DataType.Float16);
        var full = TinyDeployable.Write(Directory.CreateDirectory(dir.File("fp32")).FullName);
        var adapter = LoraAdapter.CreateRandom(half.Manifest, 51, 0.5);
        var model = OnnxLora.GraphRewrite.Graphs.OnnxFile.Load(half.Deploy);
        OnnxAdapterFile.Write(dir.File("h.onnx_adapter"), adapter, new() { ElementType = Onnx.TensorProto.Types.DataType.Float16, DeployableModel = model });
        var bf16 = Assert.Throws<InvalidDataException>(() => OnnxAdapterFile.Write(dir.File("b.onnx_adapter"), adapter,
            new() { ElementType = Onnx.TensorProto.Types.DataType.Bfloat16, DeployableModel = model }))!;
        Assert.That(bf16.Message, Does.Contain("Bfloat16").And.Contain("Float16"));

        using var host = AdapterHost.Create(half.Deploy);
        host.AddAdapter("h", dir.File("h.onnx_adapter"));
        var x = TinyDeployable.Input(Batch, seed: 8);
        // the same fp16-rounded values fed as float32 to the float model
        var rounded = OnnxAdapterFile.Read(dir.File("h.onnx_adapter")).Parameters.ToDictionary(p => p.Name, p => (p.Dims, p.ToFloats()));
        Assert.That(TinyDeployable.MaxAbsDiff(Run(host, "h", x), TinyDeployable.RunPlain(full.Deploy, x, Batch, rounded)), Is.LessThanOrEqualTo(1e-5));
        Assert.That(TinyDeployable.MaxAbsDiff(Run(host, "h", x), TinyDeployable.RunPlain(full.Deploy, x, Batch, DirectFeeds(adapter))), Is.LessThanOrEqualTo(1e-2));
        // and a float32 adapter is refused by the float16 model, naming the type
        var e = Assert.Throws<InvalidDataException>(() => host.AddAdapter("f", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(adapter)), "f32.onnx_adapter"))!;
        Assert.That(e.Message, Does.Contain("f32.onnx_adapter").And.Contain("Float16"));
    }

    [Test]
    public void Host_and_adapters_are_created_and_disposed()
    {
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        var host = AdapterHost.Create(files.Deploy);
        host.AddAdapter("a", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(LoraAdapter.CreateRandom(files.Manifest, 1))));
        Assert.That(host.Slots.Keys, Is.EquivalentTo(files.Manifest.Targets.SelectMany(t => new[] { t.LoraA, t.LoraB })));
        host.Dispose();
        host.Dispose();
        Assert.Throws<ObjectDisposedException>(() => Run(host, "a", TinyDeployable.Input(1, 1)));
    }

    [Test]
    public void Cuda_that_cannot_load_is_one_clear_error_not_a_fallback()
    {
        CudaMachine.RequireAbsent();
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        var e = Assert.Throws<CudaUnavailableException>(() => AdapterHost.Create(files.Deploy, new AdapterHostOptions { Device = ExecutionDevice.Parse("cuda:0") }).Dispose());
        Assert.That(e!.Message, Does.Contain("CUDA").And.Match(@"lib\w+\.so|--device cpu|device 0"));
    }

    [Test]
    public void Cuda_host_runs_on_the_gpu_and_matches_the_cpu()
    {
        CudaMachine.Require();
        using var dir = new TempDir();
        var files = TinyDeployable.Write(dir.Path);
        var adapter = OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(LoraAdapter.CreateRandom(files.Manifest, 1)));
        using var gpu = AdapterHost.Create(files.Deploy, new AdapterHostOptions { Device = ExecutionDevice.Parse("cuda:0") });
        using var cpu = AdapterHost.Create(files.Deploy);
        gpu.AddAdapter("a", adapter);
        cpu.AddAdapter("a", adapter);
        Assert.That(gpu.Device.IsCuda);
        var x = TinyDeployable.Input(2, 3);
        // float32 matmuls of width In: TF32 is off by default in ORT's CUDA provider, so only summation order differs
        Assert.That(Run(gpu, "a", x), Is.EqualTo(Run(cpu, "a", x)).Within(1e-4));
        Assert.That(Run(gpu, null, x), Is.EqualTo(Run(cpu, null, x)).Within(1e-4));
    }
}
