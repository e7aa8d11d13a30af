using System.Diagnostics;
using System.Runtime.Intrinsics.X86;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Graphs;
using Onnx;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tools.Bench;

/// <summary>What a contestant ran on: CPU model and the SIMD flags that pick BLAS kernels, and ONNX Runtime's MatMul rate.</summary>
public static class MachineInfo
{
    /// <summary>The CPU model and its avx2 / fma / avx512* / amx* flags, from /proc/cpuinfo (as the peers read them).</summary>
    public static (string Model, string Flags) Cpu()
    {
        string model = "unknown", flags = "";
        try
        {
            foreach (var line in File.ReadLines("/proc/cpuinfo"))
            {
                int colon = line.IndexOf(':');
                if (colon < 0) continue;
                var (key, value) = (line[..colon].Trim(), line[(colon + 1)..].Trim());
                if (key == "model name" && model == "unknown") model = value;
                if (key != "flags") continue;
                flags = string.Join(" ", value.Split(' ').Where(f => f is "avx2" or "fma" || f.StartsWith("avx512", StringComparison.Ordinal) || f.StartsWith("amx", StringComparison.Ordinal))
                                                     .Order(StringComparer.Ordinal));
                break;
            }
        }
        catch (IOException) { }   // not Linux: the model stays unknown
        return (model, flags);
    }

    /// <summary>
    /// The fp32 SGEMM kernel ONNX Runtime's MLAS dispatches to on this CPU (MLAS picks it from CPUID at load time in
    /// the same order: AVX-512F, then FMA3/AVX2, then AVX, then SSE; ORT does not report its choice, so this repeats it).
    /// </summary>
    public static string MlasKernel() =>
        Avx512F.IsSupported ? "MLAS SGEMM AVX-512F" : Fma.IsSupported && Avx2.IsSupported ? "MLAS SGEMM FMA3/AVX2" : Avx.IsSupported ? "MLAS SGEMM AVX" : "MLAS SGEMM SSE/other";

    /// <summary>
    /// ONNX Runtime's fp32 MatMul rate on an n×n×n product with <paramref name="threads"/> intra-op threads (2n³ FLOPs
    /// per run), after one warm-up run: <c>Gflops</c> from the best wall time of <paramref name="repeats"/> runs, and
    /// <c>GflopsPerCpuSecond</c> from the process CPU time of all of them (spinning off, so it counts only work), the
    /// load-independent peak that a step's GFLOP per CPU-second is compared with on a shared machine.
    /// </summary>
    public static (double Gflops, double GflopsPerCpuSecond) OrtMatMulGflops(int threads, int n = 2048, int repeats = 5)
    {
        var model = new ModelProto { IrVersion = 8, ProducerName = "onnxlora", Graph = new GraphProto { Name = "matmul_peak" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(model);
        foreach (var name in new[] { "a", "b" }) g.AddInput(ValueInfos.Tensor(name, DataType.Float, n, n));
        g.AddNode("MatMul", ["a", "b"], ["c"], "matmul");
        g.AddOutput(ValueInfos.Tensor("c", DataType.Float, n, n));
        using var options = new SessionOptions { IntraOpNumThreads = threads, InterOpNumThreads = 1 };
        options.AddSessionConfigEntry("session.intra_op.allow_spinning", "0");
        using var session = new InferenceSession(Google.Protobuf.MessageExtensions.ToByteArray(model), options);
        var rng = new Random(1);
        var data = new float[n * n];
        for (int i = 0; i < data.Length; i++) data[i] = (float)(rng.NextDouble() - 0.5);
        long[] shape = [n, n];
        using var a = OrtValue.CreateTensorValueFromMemory(data, shape);
        using var b = OrtValue.CreateTensorValueFromMemory(data, shape);
        using var c = OrtValue.CreateTensorValueFromMemory(new float[n * n], shape);
        using var run = new RunOptions();
        void Once() => session.Run(run, ["a", "b"], [a, b], ["c"], [c]);
        Once();
        double best = double.MaxValue, flops = 2.0 * n * n * n;
        var cpu = Process.GetCurrentProcess().TotalProcessorTime;
        for (int i = 0; i < repeats; i++)
        {
            var t = Stopwatch.GetTimestamp();
            Once();
            best = Math.Min(best, Stopwatch.GetElapsedTime(t).TotalSeconds);
        }
        double cpuSeconds = (Process.GetCurrentProcess().TotalProcessorTime - cpu).TotalSeconds;
        return (flops / best / 1e9, flops * repeats / cpuSeconds / 1e9);
    }
}
