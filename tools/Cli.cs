using OnnxLora.Pipeline.Training.Distributed;
using OnnxLora.Tools.Commands;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools;

/// <summary>The `onnxlora` command: every verb is registered here, one line each.</summary>
public static class Cli
{
    /// <summary>Runs a shared parser and names the flag in its message ("--format: format must be …").</summary>
    internal static T Flag<T>(string flag, Func<T> parse)
    {
        try { return parse(); }
        catch (ArgumentException e) { throw new ArgumentException($"{flag}: {e.Message}", e); }
    }

    public static int Run(string[] args, IAnsiConsole? console = null)
    {
        // under an MPI launcher only rank 0 prints; errors still come from every rank, on stderr
        if (console is null && DataParallel.LauncherRank > 0) console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(TextWriter.Null) });
        // only train and run share their work among ranks; another verb would do the same work (and write the same files) once per rank
        if (DataParallel.LauncherSize > 1 && args.FirstOrDefault() is { } verb && !verb.StartsWith('-') && verb is not ("train" or "run"))
        {
            Console.Error.WriteLine($"error: 'onnxlora {verb}' runs in one process; under mpiexec only 'train' and 'run' are data-parallel");
            return 1;
        }
        var app = new CommandApp();
        app.Configure(c =>
        {
            c.SetApplicationName("onnxlora");
            if (console is not null) c.ConfigureConsole(console);
            c.SetExceptionHandler((e, _) => Fail(e, console ?? AnsiConsole.Console));
            // verbs: one registration each, in the order `onnxlora --help` lists them
            c.AddCommand<Commands.RunCommand>("run").WithDescription("Run the whole pipeline from a config (model → rewrite → train → evaluate → export → deploy check); no config = the built-in demo.")
                .WithExample("run").WithExample("run", "examples/sms-spam-gpt2.yaml", "--set", "train.epochs=1");
            c.AddBranch("model", m => { m.SetDescription("GPT models as ONNX"); m.AddCommand<ModelBuildCommand>("build").WithDescription(ModelBuildCommand.Description).WithExample("model", "build", "--preset", "tiny", "--out", "tiny.onnx"); m.AddCommand<ModelUnpackCommand>("unpack").WithDescription(ModelUnpackCommand.Description); });
            c.AddCommand<Commands.InspectCommand>("inspect").WithDescription("Show a model's inputs, operators, parameters and LoRA-able weight MatMul/Gemm nodes.");
            c.AddCommand<Commands.RewriteCommand>("rewrite").WithDescription("Add LoRA branches: writes DIR/model.onnx (training view), DIR/deploy.onnx and DIR/lora_config.json.");
            c.AddCommand<Commands.TrainCommand>("train").WithDescription("Train the LoRA parameters of a rewrite with ONNX Runtime (progress bar, checkpoints, metrics.jsonl, loss.png, adapter).")
                .WithExample("train", "--model", "rw", "--data", "train.txt", "--out", "run", "--epochs", "2");
            c.AddCommand<Commands.ExportCommand>("export").WithDescription("Export an adapter as .onnx_adapter (ONNX Runtime), a PEFT folder, or a merged .onnx.");
            c.AddCommand<Commands.MergeCommand>("merge").WithDescription("Fold an adapter into the base weights: a plain .onnx for any ONNX Runtime.");
            c.AddCommand<Commands.GenerateCommand>("generate").WithDescription("Generate text with the deployable model and adapters (KV cache when the model has one).");
            c.AddCommand<Commands.ClassifyCommand>("classify").WithDescription("Classify text with the deployable model and adapters: label and probabilities.");
            c.AddCommand<Commands.EvalCommand>("eval").WithDescription("Evaluate the deployable model with adapters: perplexity (lm) or accuracy, precision, recall, F1 and a confusion matrix (cls).");
            c.AddCommand<ServeCommand>("serve").WithDescription(ServeCommand.Description).WithExample("serve", "--model", "rw", "--adapter", "sql=sql.onnx_adapter", "--port", "8000");
            c.AddCommand<LoadTestCommand>("loadtest").WithDescription(LoadTestCommand.Description).WithExample("loadtest", "--model", "rw", "--adapter", "a=a.onnx_adapter", "--adapter", "b=b.onnx_adapter", "--clients", "8", "--seconds", "30");
            c.AddCommand<BenchCommand>("bench").WithDescription(BenchCommand.Description).WithExample("bench", "--preset", "gpt2", "--task", "cls", "--peers", "bench/peers", "--runs", "3");
        });
        try { return app.Run(args); }
        finally { DataParallel.Shutdown(); }
    }

    /// <summary>The one failure gate: a one-line error on stderr and a non-zero exit code.</summary>
    static int Fail(Exception e, IAnsiConsole console)
    {
        var inner = e is CommandRuntimeException && e.InnerException is not null ? e.InnerException : e;
        var message = inner.Message.ReplaceLineEndings(" ");
        if (Environment.GetEnvironmentVariable("ONNXLORA_DEBUG") == "1") Console.Error.WriteLine(inner);
        int rank = DataParallel.LauncherRank;
        if (inner is OperationCanceledException && rank > 0) return 130;   // a stop every rank agreed on: rank 0 says it
        Console.Error.WriteLine($"error: {(rank > 0 ? $"rank {rank}: " : "")}{message}");
        if (inner is OperationCanceledException) return 130;
        DataParallel.AbortIfDistributed(1);   // the other ranks may wait in a collective for this one: end them all
        return 1;
    }
}
