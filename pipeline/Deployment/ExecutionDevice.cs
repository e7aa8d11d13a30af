using System.Runtime.InteropServices;
using Microsoft.ML.OnnxRuntime;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>Where a session runs: the CPU execution provider, or CUDA on one GPU.</summary>
public readonly record struct ExecutionDevice(bool IsCuda, int DeviceId = 0)
{
    public static ExecutionDevice Cpu => new(false);
    public static ExecutionDevice Cuda(int deviceId = 0) => new(true, deviceId);

    public override string ToString() => IsCuda ? $"cuda:{DeviceId}" : "cpu";

    /// <summary>Parses "cpu", "cuda" or "cuda:ID".</summary>
    public static ExecutionDevice Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var t = text.Trim().ToLowerInvariant();
        if (t == "cpu") return Cpu;
        if (t == "cuda") return Cuda();
        if (t.StartsWith("cuda:", StringComparison.Ordinal) && int.TryParse(t.AsSpan(5), out var id) && id >= 0) return Cuda(id);
        throw new ArgumentException($"device '{text}' is not one of 'cpu', 'cuda', 'cuda:ID' (e.g. cuda:0)");
    }

    /// <summary>
    /// Appends this device's execution provider to <paramref name="options"/>. CUDA that cannot load fails with one
    /// error naming the libraries that are missing; it never falls back to the CPU silently.
    /// </summary>
    public void AppendTo(SessionOptions options)
    {
        if (!IsCuda) return;
        try { options.AppendExecutionProvider_CUDA(DeviceId); }
        catch (Exception e) when (e is OnnxRuntimeException or DllNotFoundException or EntryPointNotFoundException)
        {
            throw new InvalidOperationException(CudaFailure(DeviceId, e.Message), e);
        }
    }

    /// <summary>The libraries the CUDA execution provider of Microsoft.ML.OnnxRuntime.Gpu 1.31 (a CUDA 13 build) needs.</summary>
    public static IReadOnlyList<string> CudaLibraries => OperatingSystem.IsWindows()
        ? ["cudart64_13.dll", "cublas64_13.dll", "cublasLt64_13.dll", "curand64_10.dll", "cudnn64_9.dll"]
        : ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudnn.so.9"];

    /// <summary>The CUDA libraries that cannot be loaded from this process's library path.</summary>
    public static IReadOnlyList<string> MissingCudaLibraries()
    {
        var missing = new List<string>();
        foreach (var lib in CudaLibraries)
        {
            if (NativeLibrary.TryLoad(lib, out var handle)) NativeLibrary.Free(handle);
            else missing.Add(lib);
        }
        return missing;
    }

    static string CudaFailure(int deviceId, string ortMessage)
    {
        var missing = MissingCudaLibraries();
        var what = missing.Count > 0
            ? $"missing {string.Join(", ", missing)}"
            : $"ONNX Runtime says: {ortMessage.ReplaceLineEndings(" ").Trim()}";
        return $"the CUDA execution provider cannot load for cuda:{deviceId} ({what}). It needs CUDA 13 and cuDNN 9 on the library path " +
            "(LD_LIBRARY_PATH); install them or run with --device cpu.";
    }
}
