using Google.Protobuf;
using OnnxLora.Models;

namespace OnnxLora.Tests.Models;

public class TinyFixtureTests
{
    [Test]
    public void CommittedTinyOnnxEqualsAFreshBuild()
    {
        // tests/fixtures/tiny.onnx is what other tests load; it must stay what the builder writes today. Regenerate with
        //   dotnet run --project tools -- model build --preset tiny --seed 0 --out tests/fixtures/tiny.onnx --force
        var committed = File.ReadAllBytes(Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "tiny.onnx"));
        var config = GptConfig.Preset("tiny");
        var fresh = GptBuilder.Build(config, GptWeights.Random(config, 0)).ToByteArray();
        Assert.That(committed.SequenceEqual(fresh), "tests/fixtures/tiny.onnx is stale: regenerate it (see the comment above)");
    }
}
