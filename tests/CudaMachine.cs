using System.Runtime.InteropServices;

namespace OnnxLora.Tests;

/// <summary>
/// Whether this machine has an NVIDIA GPU with the CUDA 13 runtime, found without the code under test (a driver
/// device node and libcudart load), so that CUDA tests can skip with a reason and error-path tests can run.
/// </summary>
static class CudaMachine
{
    public static bool Present { get; } = Probe();

    /// <summary>Ignores the calling test, with the reason, on a machine without a GPU.</summary>
    public static void Require()
    {
        if (!Present) Assert.Ignore("no NVIDIA GPU with the CUDA 13 runtime on this machine (/dev/nvidiactl and libcudart.so.13)");
    }

    /// <summary>Ignores the calling test, with the reason, on a machine with a GPU (where the error path cannot occur).</summary>
    public static void RequireAbsent()
    {
        if (Present) Assert.Ignore("this machine has a GPU with the CUDA 13 runtime; the no-CUDA error path cannot be observed here");
    }

    static bool Probe()
    {
        if (!File.Exists("/dev/nvidiactl") || !NativeLibrary.TryLoad("libcudart.so.13", out var handle)) return false;
        NativeLibrary.Free(handle);
        return true;
    }
}
