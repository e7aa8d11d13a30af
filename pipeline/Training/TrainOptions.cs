using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Data;

namespace OnnxLora.Pipeline.Training;

/// <summary>Everything one training run needs; saved as RUN_DIR/train_config.json so that --resume continues it.</summary>
public sealed record TrainOptions
{
    const int MaxBatch = 1 << 16, MaxSeq = 1 << 20, MaxClasses = 1 << 20;

    /// <summary>An 'onnxlora rewrite' output folder (model.onnx, deploy.onnx, lora_config.json).</summary>
    public required string ModelDir { get; init; }
    public required string DataPath { get; init; }
    public DataFormat Format { get; init; } = DataFormat.Text;
    public TrainingTask Task { get; init; } = TrainingTask.Lm;
    public int Classes { get; init; }
    /// <summary>Label names for tsv classification data (index order); null = the file's sorted labels.</summary>
    public IReadOnlyList<string>? ClassNames { get; init; }
    /// <summary>cls: full trains the classification head (PEFT's modules_to_save); lora adapts a frozen random head.</summary>
    public HeadMode HeadMode { get; init; } = HeadMode.Full;
    /// <summary>cls: which hidden state the head reads: the last non-padding token, the first ([CLS]) or the mean.</summary>
    public Pooling Pooling { get; init; } = Pooling.Last;
    /// <summary>cls: keep the LoRA factors at their start (B = 0) and train the head alone, the frozen-base baseline.</summary>
    public bool FreezeLora { get; init; }
    public required string OutDir { get; init; }
    public int Epochs { get; init; } = 1;
    /// <summary>Optimizer steps; overrides <see cref="Epochs"/> when &gt; 0.</summary>
    public int MaxSteps { get; init; }
    public int BatchSize { get; init; } = 8;
    public int SeqLength { get; init; } = 128;
    public OptimizerKind Optimizer { get; init; } = OptimizerKind.AdamW;
    public double Lr { get; init; } = 2e-4;
    public double WeightDecay { get; init; } = 0.01;
    public int WarmupSteps { get; init; }
    public ScheduleKind Schedule { get; init; } = ScheduleKind.Linear;
    public int GradAccum { get; init; } = 1;
    /// <summary>Global-norm clipping threshold; 0 = off.</summary>
    public double Clip { get; init; }
    public string? EvalDataPath { get; init; }
    /// <summary>Evaluate every N optimizer steps (0 = at each epoch's end only).</summary>
    public int EvalEvery { get; init; }
    /// <summary>Stop when eval loss has not improved for this many evaluations (0 = never).</summary>
    public int EarlyStoppingPatience { get; init; }
    public string Device { get; init; } = "cpu";
    public int Threads { get; init; }
    public int Seed { get; init; } = 42;
    public bool Shuffle { get; init; } = true;
    /// <summary>Batch examples of similar length together (<see cref="Batcher"/>): less padding on data of mixed lengths.</summary>
    public bool BucketByLength { get; init; }
    /// <summary>Concatenate short LM examples into full rows (<see cref="SequencePacker"/>): far fewer padded tokens.</summary>
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingDefault)]   // left out when off: runs from before it keep their NumericsHash and resume
    public bool Pack { get; init; }
    public string? InitAdapter { get; init; }
    public int CheckpointEvery { get; init; } = 50;
    public bool SkipBadRows { get; init; }
    /// <summary>The model's tokenizer for text data (a model folder, tokenizer.json or tokenizer.model); null = GPT-2's.</summary>
    public string? Tokenizer { get; init; }
    /// <summary>Roles for inputs the names do not tell, each NAME=ROLE[:LAYER] (<c>--input-role</c>).</summary>
    public IReadOnlyList<string> InputRoles { get; init; } = [];

    internal static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        Converters = { new JsonStringEnumConverter(JsonNamingPolicy.SnakeCaseLower) },
    };

    /// <summary>Checks the values once, with messages that name the flag.</summary>
    public void Validate()
    {
        void Require(bool ok, string message) { if (!ok) throw new ArgumentException(message); }
        // upper bounds keep a typo from allocating gigabytes before the first step
        Require(BatchSize is >= 1 and <= MaxBatch, $"--batch must be in 1..{MaxBatch} (got {BatchSize})");
        Require(SeqLength is >= 2 and <= MaxSeq, $"--seq must be in 2..{MaxSeq} (got {SeqLength})");
        Require(Epochs >= 1 || MaxSteps > 0, "--epochs must be ≥ 1, or give --max-steps");
        Require(Epochs >= 0 && MaxSteps >= 0, $"--epochs and --max-steps must be ≥ 0 (got {Epochs}, {MaxSteps})");
        Require(double.IsFinite(Lr) && Lr > 0, $"--lr must be a finite number > 0 (got {Lr})");
        Require(double.IsFinite(WeightDecay) && WeightDecay >= 0, $"--weight-decay must be a finite number ≥ 0 (got {WeightDecay})");
        Require(GradAccum is >= 1 and <= MaxBatch, $"--grad-accum must be in 1..{MaxBatch} (got {GradAccum})");
        Require(double.IsFinite(Clip) && Clip >= 0, $"--clip must be a finite number ≥ 0 (got {Clip})");
        // more threads than cores only adds contention: 100000 threads took 16.6 GB and ignored SIGTERM
        Require(Threads >= 0 && Threads <= Environment.ProcessorCount, $"--threads must be in 0..{Environment.ProcessorCount} (this machine's cores; 0 = all), got {Threads}");
        Require(Classes is >= 0 and <= MaxClasses, $"--classes must be in 0..{MaxClasses} (got {Classes})");
        Require(EarlyStoppingPatience >= 0, $"--early-stopping must be ≥ 0 (got {EarlyStoppingPatience})");
        // the names parse through WireNames; a train_config.json could still hold a number
        Require(Enum.IsDefined(Optimizer) && Enum.IsDefined(HeadMode) && Enum.IsDefined(Pooling), $"--optimizer, --head and --pooling must be names (got {Optimizer}, {HeadMode}, {Pooling})");
        Require(!Pack || Task == TrainingTask.Lm, "--pack concatenates language-model examples: it does not apply to --task cls");
        Require(!FreezeLora || Task == TrainingTask.Cls, "--freeze-lora trains the head alone: it needs --task cls");
        Require(Task != TrainingTask.Cls || Classes >= 2 || ClassNames is { Count: >= 2 } || Format == DataFormat.Tsv, "--task cls needs --classes N (≥ 2)");
        Require(CheckpointEvery >= 0 && EvalEvery >= 0 && WarmupSteps >= 0, "--checkpoint-every, --eval-every and --warmup must be ≥ 0");
        GraphRewrite.Signature.RoleOverride.ParseAll(InputRoles);   // a malformed --input-role fails before any work
    }

    public string ToJson() => JsonSerializer.Serialize(this, Json);

    public static TrainOptions Load(string runDir)
    {
        var path = Path.Combine(runDir, RunLayout.TrainConfig);
        if (!File.Exists(path)) throw new FileNotFoundException($"{runDir}: not a training run folder (no {RunLayout.TrainConfig})", path);
        return JsonSerializer.Deserialize<TrainOptions>(File.ReadAllText(path), Json)
            ?? throw new InvalidDataException($"{path}: empty");
    }

    public void Save() => AtomicFile.WriteAllText(Path.Combine(OutDir, RunLayout.TrainConfig), ToJson());

    /// <summary>Hash of what determines the numbers (not output-only settings), to refuse resuming a different run.</summary>
    public string NumericsHash()
    {
        var key = this with { OutDir = "", CheckpointEvery = 0, EvalEvery = 0, EarlyStoppingPatience = 0, Threads = 0, InitAdapter = null };
        return Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(key.ToJson())))[..16];
    }
}
