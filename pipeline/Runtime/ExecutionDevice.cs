using System.Runtime.InteropServices;
using Microsoft.ML.OnnxRuntime;

namespace OnnxLora.Pipeline.Runtime;

/// <summary>Thrown when the CUDA execution provider cannot be used; the message names the missing piece.</summary>
public sealed class CudaUnavailableException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// Where sessions run: "cpu" or "cuda[:id]". CUDA comes from Microsoft.ML.OnnxRuntime.Gpu (a CUDA 13 build):
/// the provider library is loaded only when asked for, and a failure is one clear error, never a silent
/// fallback to the CPU.
/// </summary>
public sealed record ExecutionDevice(bool IsCuda, int DeviceId)
{
    public static readonly ExecutionDevice Cpu = new(false, 0);

    /// <summary>The native libraries the CUDA provider needs, in the order a loader would miss them.</summary>
    static readonly (string Library, string Hint)[] CudaDependencies =
    [
        ("libcudart.so.13", "the CUDA 13 runtime"),
        ("libcublasLt.so.13", "cuBLASLt from CUDA 13"),
        ("libcublas.so.13", "cuBLAS from CUDA 13"),
        ("libcurand.so.10", "cuRAND from CUDA 13"),
        ("libcudnn.so.9", "cuDNN 9 for CUDA 13"),
    ];

    public static ExecutionDevice Parse(string text)
    {
        var t = text.Trim().ToLowerInvariant();
        if (t == "cpu") return Cpu;
        if (t == "cuda") return new ExecutionDevice(true, 0);
        if (t.StartsWith("cuda:") && int.TryParse(t[5..], out var id) && id >= 0) return new ExecutionDevice(true, id);
        throw new ArgumentException($"--device '{text}' is not one of: cpu, cuda, cuda:<id>");
    }

    public override string ToString() => IsCuda ? $"cuda:{DeviceId}" : "cpu";

    /// <summary>
    /// Session options for this device with <paramref name="threads"/> intra-op threads (0 = all cores).
    /// The caller owns (disposes) the returned options.
    /// </summary>
    public SessionOptions CreateSessionOptions(int threads = 0)
    {
        var options = new SessionOptions
        {
            GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL,
            IntraOpNumThreads = threads > 0 ? threads : Environment.ProcessorCount,
            InterOpNumThreads = 1,
            ExecutionMode = ExecutionMode.ORT_SEQUENTIAL,
        };
        if (!IsCuda) return options;
        try
        {
            CheckCudaLibraries();
            options.AppendExecutionProvider_CUDA(DeviceId);
            return options;
        }
        catch (Exception e) when (e is OnnxRuntimeException or CudaUnavailableException or EntryPointNotFoundException)
        {
            options.Dispose();
            throw e as CudaUnavailableException ?? new CudaUnavailableException($"the CUDA execution provider could not start on device {DeviceId}: {e.Message}", e);
        }
    }

    /// <summary>Memory info of the device's own allocator (for parameters and moments that stay on it).</summary>
    public OrtMemoryInfo DeviceMemoryInfo() => IsCuda
        ? new OrtMemoryInfo(OrtMemoryInfo.allocatorCUDA, OrtAllocatorType.DeviceAllocator, DeviceId, OrtMemType.Default)
        : OrtMemoryInfo.DefaultInstance;

    static void CheckCudaLibraries()
    {
        var ortDir = Path.GetDirectoryName(typeof(ExecutionDevice).Assembly.Location) ?? ".";
        bool providerPresent = File.Exists(Path.Combine(ortDir, "libonnxruntime_providers_cuda.so"))
            || File.Exists(Path.Combine(ortDir, "runtimes", "linux-x64", "native", "libonnxruntime_providers_cuda.so"));
        if (!providerPresent && RuntimeInformation.IsOSPlatform(OSPlatform.Linux))
            throw new CudaUnavailableException("CUDA was asked for, but libonnxruntime_providers_cuda.so is not beside the application (build with Microsoft.ML.OnnxRuntime.Gpu for linux-x64)");
        if (!RuntimeInformation.IsOSPlatform(OSPlatform.Linux)) return;
        foreach (var (library, hint) in CudaDependencies)
        {
            if (NativeLibrary.TryLoad(library, out var handle)) { NativeLibrary.Free(handle); continue; }
            throw new CudaUnavailableException(
                $"CUDA was asked for, but {library} ({hint}) cannot be loaded: install it or add its folder to LD_LIBRARY_PATH, or use --device cpu");
        }
    }
}
