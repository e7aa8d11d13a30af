using System.Text.RegularExpressions;

namespace OnnxLora.Tests.Serving;

/// <summary>The `serve` and `loadtest` verbs as a user runs them.</summary>
[NonParallelizable]
public class ServeCliTests
{
    [Test]
    public void LoadTestRunsWithoutErrorsOrCrossTalk()
    {
        using var dir = new TempDir();
        ServingFixture.WriteFiles(dir);
        var (code, output, error) = CliRunner.Run("loadtest", "--model", dir.File("rw"), "--tokenizer", dir.File("tokenizer"),
            "--adapter", "a=" + dir.File("adapters/a.onnx_adapter"), "--adapter", "b=" + dir.File("adapters/b.onnx_adapter"),
            "--clients", "3", "--seconds", "60", "--max-requests", "12", "--max-tokens", "8", "--context", "64");
        Assert.That(code, Is.EqualTo(0), output + error);
        Assert.That(Row(output, "requests"), Is.EqualTo("12"), "bounded by --max-requests");
        Assert.That(Row(output, "errors (non-200)"), Is.EqualTo("0"));
        Assert.That(Row(output, "cross-talk (text ≠ alone)"), Is.EqualTo("0"));
        Assert.That(output, Does.Contain("RSS first third → last third"));
    }

    [TestCase("--port", "70000", "--port")]
    [TestCase("--max-tokens", "0", "--max-tokens")]
    [TestCase("--classifier", "nameonly", "--classifier")]
    [TestCase("--host", "example.invalid", "--host")]
    [TestCase("--adapter-root", "/no/such/folder", "--adapter-root")]
    public void BadFlagsAreOneLineErrors(string flag, string value, string named)
    {
        using var dir = new TempDir();
        ServingFixture.WriteFiles(dir);
        var (code, _, error) = CliRunner.Run("serve", "--model", dir.File("rw"), "--tokenizer", dir.File("tokenizer"), "--port", "0", flag, value);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(error.Trim().Split('\n'), Has.Length.EqualTo(1), error);
        Assert.That(error, Does.StartWith("error: ").And.Contain(named));
    }

    // a row of the report table: │ name │ value │
    static string Row(string output, string name) =>
        Regex.Match(output, $@"│ {Regex.Escape(name)}\s*│ ([^│]*?)\s*│") is { Success: true } m ? m.Groups[1].Value : throw new AssertionException($"no row '{name}' in\n{output}");
}
