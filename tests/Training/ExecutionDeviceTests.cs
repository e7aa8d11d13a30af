using OnnxLora.Pipeline.Runtime;

namespace OnnxLora.Tests.Training;

public class ExecutionDeviceTests
{
    [TestCase("cpu", false, 0)]
    [TestCase("cuda", true, 0)]
    [TestCase("CUDA:1", true, 1)]
    public void ParsesDevices(string text, bool cuda, int id) =>
        Assert.That(ExecutionDevice.Parse(text), Is.EqualTo(new ExecutionDevice(cuda, id)));

    [TestCase("gpu")]
    [TestCase("cuda:x")]
    public void RejectsUnknownDevices(string text) =>
        Assert.That(() => ExecutionDevice.Parse(text), Throws.ArgumentException.With.Message.Contain(text));

    [Test]
    public void CudaWithoutCudaLibrariesIsOneClearError()
    {
        bool hasCuda = System.Runtime.InteropServices.NativeLibrary.TryLoad("libcudart.so.13", out var h);
        if (hasCuda) System.Runtime.InteropServices.NativeLibrary.Free(h);
        Assume.That(hasCuda, Is.False, "this machine has the CUDA 13 runtime; the error path cannot be observed here");
        var e = Assert.Throws<CudaUnavailableException>(() => ExecutionDevice.Parse("cuda").CreateSessionOptions().Dispose());
        Assert.That(e!.Message, Does.Contain("libcudart.so.13").And.Contain("--device cpu"));
    }
}
