using Spectre.Console;

namespace OnnxLora.Tests;

/// <summary>Runs `onnxlora …` in-process as a user would, capturing stdout (a wide, colourless console) and stderr.</summary>
public static class CliRunner
{
    public static (int Code, string Out, string Err) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(stdout), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors, Interactive = InteractionSupport.No,
        });
        console.Profile.Width = 400;
        var stderr = new StringWriter();
        lock (ConsoleLock)
        {
            var saved = Console.Error;
            Console.SetError(stderr);
            try { return (OnnxLora.Tools.Cli.Run(args, console), stdout.ToString(), stderr.ToString()); }
            finally { Console.SetError(saved); }
        }
    }

    static readonly object ConsoleLock = new();

    /// <summary>`model build --preset tiny` then `rewrite --rank 4 --alpha 8` into <paramref name="dir"/>; returns the rewrite folder.</summary>
    public static string TinyRewrite(TempDir dir)
    {
        var (code, _, error) = Run("model", "build", "--preset", "tiny", "--out", dir.File("tiny.onnx"));
        Assert.That(code, Is.EqualTo(0), error);
        (code, _, error) = Run("rewrite", dir.File("tiny.onnx"), "--out", dir.File("rw"), "--rank", "4", "--alpha", "8");
        Assert.That(code, Is.EqualTo(0), error);
        return dir.File("rw");
    }

    /// <summary>The built `onnxlora` assembly beside the tests, for tests that need a real process (signals, kill).</summary>
    public static string ToolPath => Path.Combine(TestContext.CurrentContext.TestDirectory, "onnxlora.dll");
}
