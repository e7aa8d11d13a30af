using System.ComponentModel;
using System.Globalization;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Contracts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Training;
using OnnxLora.Pipeline.Training.Distributed;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// `onnxlora train --model DIR --data FILE --out RUN_DIR …`: trains the LoRA parameters of a rewrite with ONNX Runtime,
/// showing a progress bar; Ctrl+C (or SIGTERM) stops after the current step with a checkpoint to --resume from.
/// </summary>
public sealed class TrainCommand(IAnsiConsole console) : Command<TrainCommand.Settings>
{
    public sealed class Settings : CommandSettings
    {
        [CommandOption("--model <DIR>")][Description("An 'onnxlora rewrite' output folder (model.onnx, lora_config.json).")]
        public string? Model { get; init; }
        [CommandOption("--data <FILE>")][Description("Training data.")]
        public string? Data { get; init; }
        [CommandOption("--format <FORMAT>")][Description("text (packed into --seq windows), jsonl ({prompt,completion} or {text}), tokens ({input_ids,labels?}) or tsv (label<TAB>text). Default: from the file extension.")]
        public string? Format { get; init; }
        [CommandOption("--task <TASK>")][Description("lm (causal language modelling, default) or cls (classification from the last token).")]
        public string Task { get; init; } = "lm";
        [CommandOption("--classes <N>")][Description("Number of classes for --task cls (default: the labels found in the data).")]
        public int Classes { get; init; }
        [CommandOption("--labels <LIST>")][Description("Class names in index order for tsv data, e.g. ham,spam (default: sorted labels of the file).")]
        public string? Labels { get; init; }
        [CommandOption("--head <MODE>")][Description("cls head: full (trained fully, PEFT's modules_to_save; default) or lora.")]
        public string Head { get; init; } = "full";
        [CommandOption("--pooling <MODE>")][Description("cls: the hidden state the head reads: last (last non-padding token; decoders, default), first ([[CLS]]; encoders) or mean (over the mask).")]
        public string Pooling { get; init; } = "last";
        [CommandOption("--freeze-lora")][Description("cls: keep LoRA at its start (B = 0, the frozen base) and train the head alone: the baseline a LoRA run is compared with.")]
        public bool FreezeLora { get; init; }
        [CommandOption("-o|--out <RUN_DIR>")][Description("Run folder (new or empty): checkpoints, metrics.jsonl, loss.png and the adapter.")]
        public string? Out { get; init; }
        [CommandOption("--overwrite")][Description("Start over in --out when it holds an earlier run (nothing else is ever replaced).")]
        public bool Overwrite { get; init; }
        [CommandOption("--epochs <E>")][Description("Passes over the data (default 1).")]
        public int Epochs { get; init; } = 1;
        [CommandOption("--max-steps <N>")][Description("Optimizer steps; overrides --epochs.")]
        public int MaxSteps { get; init; }
        [CommandOption("--batch <B>")][Description("Sequences per micro-batch (default 8); under mpiexec the global batch, split across the ranks.")]
        public int Batch { get; init; } = 8;
        [CommandOption("--seq <T>")][Description("Longest sequence in tokens; longer examples are truncated and counted (default 128).")]
        public int Seq { get; init; } = 128;
        [CommandOption("--optimizer <NAME>")][Description("adamw (default) or sgd.")]
        public string Optimizer { get; init; } = "adamw";
        [CommandOption("--lr <X>")][Description("Peak learning rate (default 2e-4).")]
        public double Lr { get; init; } = 2e-4;
        [CommandOption("--weight-decay <X>")][Description("Decoupled weight decay for AdamW, L2 for SGD (default 0.01).")]
        public double WeightDecay { get; init; } = 0.01;
        [CommandOption("--warmup <N>")][Description("Linear warmup steps (default 0).")]
        public int Warmup { get; init; }
        [CommandOption("--schedule <KIND>")][Description("constant, linear (default) or cosine decay after warmup.")]
        public string Schedule { get; init; } = "linear";
        [CommandOption("--grad-accum <K>")][Description("Micro-batches per optimizer step (default 1).")]
        public int GradAccum { get; init; } = 1;
        [CommandOption("--clip <X>")][Description("Global gradient-norm clipping (default off).")]
        public double Clip { get; init; }
        [CommandOption("--eval-data <FILE>")][Description("Held-out data, same format.")]
        public string? EvalData { get; init; }
        [CommandOption("--eval-every <N>")][Description("Evaluate every N steps (default: at the end of each epoch).")]
        public int EvalEvery { get; init; }
        [CommandOption("--early-stopping <N>")][Description("Stop after N evaluations without a better eval loss (default off).")]
        public int EarlyStopping { get; init; }
        [CommandOption("--device <DEVICE>")][Description("cpu (default), cuda or cuda:<id>.")]
        public string Device { get; init; } = "cpu";
        [CommandOption("--threads <N>")][Description("Intra-op threads (default: all cores; under mpiexec, the cores of a node shared by its ranks).")]
        public int Threads { get; init; }
        [CommandOption("--seed <N>")][Description("Seed for shuffling and the task head (default 42).")]
        public int Seed { get; init; } = 42;
        [CommandOption("--no-shuffle")][Description("Keep the file's order (exact reproduction against another trainer).")]
        public bool NoShuffle { get; init; }
        [CommandOption("--bucket-by-length")][Description("Batch examples of similar length together (seeded, deterministic): less padding and faster steps on data of mixed lengths.")]
        public bool BucketByLength { get; init; }
        [CommandOption("--pack")][Description("LM only: concatenate short examples into full --seq rows (seeded order; an example is never split; padding only at a row's end), so far fewer padded tokens. Caveat: a token attends to the earlier examples of its row and positions do not restart per example.")]
        public bool Pack { get; init; }
        [CommandOption("--init-adapter <PATH>")][Description("Start from an adapter: .onnx_adapter, a PEFT folder, or an OnnxLora adapter.safetensors.")]
        public string? InitAdapter { get; init; }
        [CommandOption("--resume <RUN_DIR>")][Description("Continue an interrupted run from its last checkpoint (other flags are taken from the run).")]
        public string? Resume { get; init; }
        [CommandOption("--checkpoint-every <N>")][Description("Checkpoint every N steps (default 50; always at the end and on Ctrl+C).")]
        public int CheckpointEvery { get; init; } = 50;
        [CommandOption("--skip-bad-rows")][Description("Skip malformed data rows (counted) instead of failing.")]
        public bool SkipBadRows { get; init; }
        [CommandOption("--tokenizer <PATH>")][Description("The model's tokenizer for text data: a Hugging Face model folder, its tokenizer.json (BPE) or tokenizer.model (SentencePiece). Default: GPT-2's.")]
        public string? Tokenizer { get; init; }
        [CommandOption("--input-role <NAME=ROLE>")][InputRoleHelp]
        public string[] InputRoles { get; init; } = [];
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        using var stop = new StopSignals(cancellationToken);
        TrainResult result;
        if (s.Resume is not null) result = WithProgress(p => Trainer.Resume(s.Resume, p, stop.Token));
        else
        {
            var options = ToOptions(s);
            console.MarkupLineInterpolated($"training [bold]{options.ModelDir}[/] on [bold]{options.DataPath}[/] ({options.Task.ToString().ToLowerInvariant()}, {options.Optimizer.WireName()}, lr {options.Lr}, batch {options.BatchSize}×{options.GradAccum}, device {options.Device})");
            result = WithProgress(p => Trainer.Train(options, p, stop.Token, s.Overwrite));
        }
        PrintSummary(result);
        return 0;
    }

    internal static TrainOptions ToOptions(Settings s)
    {
        if (string.IsNullOrEmpty(s.Model)) throw new ArgumentException("--model DIR is required (an 'onnxlora rewrite' output folder)");
        if (string.IsNullOrEmpty(s.Data)) throw new ArgumentException("--data FILE is required");
        if (string.IsNullOrEmpty(s.Out)) throw new ArgumentException("--out RUN_DIR is required");
        var task = Cli.Flag("--task", () => WireNames.Parse<TrainingTask>(s.Task, "task"));
        return new TrainOptions
        {
            ModelDir = Path.GetFullPath(s.Model), DataPath = Path.GetFullPath(s.Data), Format = ParseFormat(s.Format, s.Data, task), Task = task,
            Classes = s.Classes, ClassNames = Pipeline.Data.DatasetLoader.ParseClassNames(s.Labels, "--labels"), HeadMode = Cli.Flag("--head", () => WireNames.Parse<HeadMode>(s.Head, "head")),
            Pooling = Cli.Flag("--pooling", () => WireNames.Parse<Pooling>(s.Pooling, "pooling")), FreezeLora = s.FreezeLora,
            OutDir = Path.GetFullPath(s.Out), Epochs = s.Epochs, MaxSteps = s.MaxSteps, BatchSize = s.Batch, SeqLength = s.Seq,
            Optimizer = Cli.Flag("--optimizer", () => WireNames.Parse<OptimizerKind>(s.Optimizer, "optimizer")), Lr = s.Lr, WeightDecay = s.WeightDecay, WarmupSteps = s.Warmup,
            Schedule = Cli.Flag("--schedule", () => WireNames.Parse<ScheduleKind>(s.Schedule, "schedule")),
            GradAccum = s.GradAccum, Clip = s.Clip, EvalDataPath = s.EvalData is null ? null : Path.GetFullPath(s.EvalData),
            EvalEvery = s.EvalEvery, EarlyStoppingPatience = s.EarlyStopping, Device = s.Device, Threads = s.Threads, Seed = s.Seed,
            Shuffle = !s.NoShuffle, BucketByLength = s.BucketByLength, Pack = s.Pack, InitAdapter = s.InitAdapter, CheckpointEvery = s.CheckpointEvery, SkipBadRows = s.SkipBadRows, Tokenizer = s.Tokenizer,
            InputRoles = s.InputRoles,
        };
    }

    static DataFormat ParseFormat(string? format, string path, TrainingTask task) => format is { Length: > 0 }
        ? Cli.Flag("--format", () => DatasetLoader.ParseFormat(format))
        : Path.GetExtension(path).ToLowerInvariant() switch
        {
            ".jsonl" or ".json" => DataFormat.Jsonl,
            ".tsv" or ".csv" => DataFormat.Tsv,
            _ => task == TrainingTask.Cls ? DataFormat.Tsv : DataFormat.Text,
        };

    TrainResult WithProgress(Func<IProgress<TrainProgress>, TrainResult> run)
    {
        TrainResult? result = null;
        console.Progress()
            .AutoClear(false)
            .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask("starting", maxValue: 1);
                result = run(new InlineProgress(p =>
                {
                    task.MaxValue = p.TotalSteps;
                    task.Value = p.Step;
                    var eval = p.EvalLoss is double e ? $" eval {e:F4}" : "";
                    task.Description = $"step {p.Step}/{p.TotalSteps} loss {p.Loss:F4}{eval} lr {p.Lr:G3} {p.TokensPerSecond:F0} tok/s";
                }));
            });
        return result!;
    }

    void PrintSummary(TrainResult r)
    {
        var grid = new Grid().AddColumn().AddColumn();
        void Row(string k, string v) => grid.AddRow(new Text(k), new Text(v));
        Row("steps", $"{r.Steps}{(r.EarlyStopped ? " (early stop)" : "")}");
        Row("loss", $"{r.FirstLoss:F4} → {r.LastLoss:F4}");
        if (r.BestEvalLoss is double e) Row("best eval loss", e.ToString("F4", CultureInfo.InvariantCulture));
        if (r.EvalAccuracy is double a) Row("eval accuracy", $"{a:P2}");
        Row("time", $"{r.Elapsed.TotalSeconds:F1} s");
        Row("throughput", $"{r.TokensPerSecond:F0} tokens/s");
        Row("peak memory", $"{r.PeakMemoryBytes / (1024.0 * 1024):F0} MiB");
        if (DataParallel.Current.Stats is { Steps: > 0 } dp)
            Row("data parallel", $"{dp.Processes} processes; {dp.StepTime.TotalMilliseconds / dp.Steps:F1} ms/step, gradient Allreduce {dp.GradientAllReduce.TotalMilliseconds / dp.Steps:F2} ms ({dp.AllReduceShare:P1}, {dp.GradientBytes / 1e6:F2} MB), waiting for the slowest rank {dp.Sync.TotalMilliseconds / dp.Steps:F1} ms");
        Row("adapter", r.AdapterPath);
        Row("loss curve", Path.Combine(r.RunDir, RunLayout.LossPlot));
        console.Write(new Panel(grid).Header("training finished"));
    }

    sealed class InlineProgress(Action<TrainProgress> report) : IProgress<TrainProgress>
    {
        public void Report(TrainProgress value) => report(value);
    }
}
