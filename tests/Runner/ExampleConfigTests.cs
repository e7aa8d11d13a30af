using OnnxLora.Pipeline.Runner;

namespace OnnxLora.Tests.Runner;

/// <summary>The configs in examples/ stay valid, and examples/default.yaml is the built-in default.</summary>
public class ExampleConfigTests
{
    // tests run from tests/bin/<configuration>/net10.0/
    static string Examples => Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "..", "..", "..", "..", "examples"));

    static IEnumerable<string> ExampleFiles() => Directory.GetFiles(Examples, "*.yaml").Select(f => Path.GetFileName(f));

    [TestCaseSource(nameof(ExampleFiles))]
    public void ExampleConfigIsValid(string file)
    {
        var config = PipelineConfig.Load(Path.Combine(Examples, file));
        Assert.DoesNotThrow(() => new PipelineRunner(config).Validate());
    }

    [Test]
    public void DefaultYamlIsTheBuiltInDefault()
    {
        var text = File.ReadAllText(Path.Combine(Examples, "default.yaml")).ReplaceLineEndings("\n").TrimEnd();
        var builtIn = DemoData.DefaultConfig.ReplaceLineEndings("\n").TrimEnd();
        Assert.That(text, Is.EqualTo(builtIn), "examples/default.yaml must be DemoData.DefaultConfig; copy one to the other");
    }
}
