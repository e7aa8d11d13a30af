using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization;
using SessionOptions = Microsoft.ML.OnnxRuntime.SessionOptions;
using OrtEnv = Microsoft.ML.OnnxRuntime.OrtEnv;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tools.Bench;

/// <summary>
/// One benchmark run of the <see cref="Workload"/> (bench/peers/workload.json, the peers' too): a GPT-2-shaped model
/// with separate q/k/v projections and random weights, LoRA of rank r on every linear layer including the head,
/// AdamW on the LoRA parameters; one step = reset gradients + forward + loss + backward + optimizer step.
/// </summary>
public sealed record BenchSpec(string Preset, string Task, int Classes, int Batch, int Seq, int Rank, double Alpha, int Steps, int Warmup, int Threads, int Seed, Workload Workload)
{
    /// <summary>Tokens per step (every position counts, as in the peers).</summary>
    public long TokensPerStep => (long)Batch * Seq;

    public GptConfig ModelConfig => Workload.ModelConfig(Preset);

    /// <summary>
    /// The matrix-multiply FLOPs of one training step, counted analytically (2 per multiply-add; biases, norms,
    /// softmax, GELU and the optimizer are left out): forward F = 2·N·(W + Wₗ) + 4·N·L·T·d, where N = batch × seq
    /// tokens, W the frozen linear weights per token (12·d² per block + the head d × outputs), Wₗ the LoRA weights
    /// (r·(in + out) per linear) and 4·T·d per token and block the attention products QKᵀ and A·V over all T
    /// positions; training = 3·F − 2·N·W: every product also has an input gradient and a weight gradient, except
    /// that no weight gradient of a frozen weight is computed.
    /// </summary>
    public double TrainingFlops
    {
        get
        {
            var c = ModelConfig;
            long d = c.EmbedDim, head = Task == "lm" ? c.VocabSize : Classes;
            double n = TokensPerStep;
            double frozen = c.Layers * (4 * d * d + 2 * 4 * d * d) + d * head;
            double lora = Rank * (c.Layers * (4 * (d + d) + (d + 4 * d) + (4 * d + d)) + (d + head));
            double attention = 4.0 * c.Layers * Seq * d;
            double forward = 2 * n * (frozen + lora) + n * attention;
            return 3 * forward - 2 * n * frozen;
        }
    }
}

/// <summary>One measured run, in the peers' JSON line format (snake_case); the train/optimizer split only for OnnxLora.</summary>
public sealed record BenchResult
{
    public required string Peer { get; init; }
    public required string Preset { get; init; }
    public required string Task { get; init; }
    public int Batch { get; init; }
    public int Seq { get; init; }
    public int Rank { get; init; }
    public int Threads { get; init; }
    /// <summary>Mean seconds per timed step.</summary>
    public double StepS { get; init; }
    public double TokensPerS { get; init; }
    public long Trainable { get; init; }
    public long Total { get; init; }
    /// <summary>Peak resident memory of the process (VmHWM / ru_maxrss), MiB.</summary>
    public long PeakRssMb { get; init; }
    /// <summary>Mean seconds per step in the train session (forward + backward), OnnxLora only.</summary>
    public double? TrainS { get; init; }
    /// <summary>Mean seconds per step in the optimizer session, OnnxLora only.</summary>
    public double? OptimizerS { get; init; }
    /// <summary>
    /// Process CPU seconds (user + system, all threads) per timed step: on a shared machine a steadier measure of the
    /// work than wall time (it also counts spin-waiting: ORT's unless <c>session.intra_op.allow_spinning=0</c>, OpenMP's
    /// and OpenBLAS's in the peers).
    /// </summary>
    public double? CpuS { get; init; }
    /// <summary>Seconds to load the ORT sessions, OnnxLora only.</summary>
    public double? LoadS { get; init; }
    /// <summary>What the contestant ran on: CPU model, its avx2/fma/avx512*/amx* flags, the BLAS (library, kernel, threads).</summary>
    public string? Cpu { get; init; }
    public string? CpuFlags { get; init; }
    public string? Blas { get; init; }
    /// <summary>The contestant's own fp32 2048³ MatMul rate, measured in its process.</summary>
    public double? MatmulGflops { get; init; }
    /// <summary>The environment variables that steer its BLAS, as the contestant saw them (OPENBLAS_CORETYPE, …).</summary>
    public Dictionary<string, string>? Env { get; init; }

    public static readonly JsonSerializerOptions Json = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    };

    public string ToJsonLine() => JsonSerializer.Serialize(this, Json);

    /// <summary>The result line among a peer's output: the last line that parses as a result.</summary>
    public static BenchResult? FromOutput(string stdout)
    {
        foreach (var line in stdout.Split('\n').Reverse())
        {
            var t = line.Trim();
            if (!t.StartsWith('{')) continue;
            try { return JsonSerializer.Deserialize<BenchResult>(t, Json); }
            catch (JsonException) { }
        }
        return null;
    }
}

/// <summary>Builds the workload's training artifacts and runs the timed steps.</summary>
public static class BenchWorkload
{
    /// <summary>Written beside the artifacts: the parameter counts the child run reports.</summary>
    public const string CountsFile = "bench_counts.json";

    /// <summary>
    /// LoRA on every linear: all-linear, plus the vocabulary head for lm (for cls the head is the artifact builder's
    /// frozen seeded head with its own LoRA branch, <see cref="HeadMode.Lora"/>).
    /// </summary>
    public static LoraConfig LoraFor(BenchSpec spec) => new()
    {
        Rank = spec.Rank, Alpha = spec.Alpha, Seed = spec.Seed,
        TargetModules = spec.Task == "lm" ? [LoraConfig.AllLinear, "lm_head"] : [LoraConfig.AllLinear],
    };

    public static ArtifactOptions ArtifactsFor(BenchSpec spec)
    {
        var o = spec.Workload.Optimizer;
        var adamW = new ArtifactOptions { Optimizer = OptimizerKind.AdamW, Beta1 = o.Beta1, Beta2 = o.Beta2, Epsilon = o.Eps };
        return spec.Task == "lm"
            ? adamW with { Task = TrainingTask.Lm }
            : adamW with { Task = TrainingTask.Cls, Classes = spec.Classes, HeadMode = HeadMode.Lora, HeadSeed = spec.Seed };
    }

    /// <summary>Trainable and total parameters (frozen base + trainable + a frozen cls head), as the peers count them.</summary>
    public sealed record Counts(long Trainable, long Total);

    /// <summary>Builds the model in memory (random weights from the seed), rewrites it and saves the artifacts to <paramref name="dir"/>.</summary>
    public static Counts BuildArtifacts(BenchSpec spec, string dir)
    {
        var config = spec.ModelConfig;
        var model = GptBuilder.Build(config, GptWeights.Random(config, spec.Seed));
        var rewrite = LoraRewrite.Rewrite(model, LoraFor(spec), $"bench:{spec.Preset}", "");
        var artifacts = TrainingArtifacts.Build(rewrite.TrainingModel, rewrite.Manifest, ArtifactsFor(spec));
        artifacts.Save(dir);
        long trainable = artifacts.Spec.Params.Sum(p => p.Shape.Aggregate(1L, (a, b) => a * b));
        long frozenHead = spec.Task == "cls" ? (long)config.EmbedDim * spec.Classes : 0;
        var counts = new Counts(trainable, rewrite.BaseParameters + frozenHead + trainable);
        AtomicFile.WriteAllText(Path.Combine(dir, CountsFile), JsonSerializer.Serialize(counts, BenchResult.Json));
        return counts;
    }

    /// <summary>
    /// Runs <see cref="BenchSpec.Warmup"/> untimed and <see cref="BenchSpec.Steps"/> timed steps on the artifacts in
    /// <paramref name="dir"/>; <paramref name="progress"/> gets one line per step.
    /// </summary>
    public static BenchResult Run(BenchSpec spec, string dir, Action<string>? progress = null, Action<SessionOptions>? configure = null)
    {
        var counts = JsonSerializer.Deserialize<Counts>(File.ReadAllText(Path.Combine(dir, CountsFile)), BenchResult.Json)
                     ?? throw new InvalidDataException($"{dir}: empty {CountsFile}");
        var load = Stopwatch.StartNew();
        using var session = TrainingSession.Create(dir, ExecutionDevice.Cpu, spec.Threads, configure);
        load.Stop();
        progress?.Invoke($"sessions loaded in {load.Elapsed.TotalSeconds:F1} s");
        session.SetLearningRate(spec.Workload.Optimizer.Lr);
        session.WeightDecay = spec.Workload.Optimizer.WeightDecay;
        var batch = RandomBatch(spec, spec.ModelConfig.VocabSize);
        double train = 0, optimizer = 0;
        TimeSpan cpuAtStart = default;
        for (int i = 0; i < spec.Warmup + spec.Steps; i++)
        {
            bool timed = i >= spec.Warmup;
            if (i == spec.Warmup) cpuAtStart = Process.GetCurrentProcess().TotalProcessorTime;
            var t0 = Stopwatch.GetTimestamp();
            session.LazyResetGrad();
            var loss = session.TrainStep(batch).Loss;
            var t1 = Stopwatch.GetTimestamp();
            session.OptimizerStep();
            var t2 = Stopwatch.GetTimestamp();
            if (timed) { train += Stopwatch.GetElapsedTime(t0, t1).TotalSeconds; optimizer += Stopwatch.GetElapsedTime(t1, t2).TotalSeconds; }
            var label = timed ? $"step {i - spec.Warmup + 1}/{spec.Steps}" : $"warmup {i + 1}/{spec.Warmup}";
            progress?.Invoke($"{label}: {Stopwatch.GetElapsedTime(t0, t2).TotalSeconds:F2} s (train {Stopwatch.GetElapsedTime(t0, t1).TotalSeconds:F2} s, optimizer {Stopwatch.GetElapsedTime(t1, t2).TotalSeconds:F3} s), loss {loss:F4}");
        }
        double step = (train + optimizer) / spec.Steps;
        double cpuPerStep = (Process.GetCurrentProcess().TotalProcessorTime - cpuAtStart).TotalSeconds / spec.Steps;
        var (cpu, flags) = MachineInfo.Cpu();
        return new BenchResult
        {
            Peer = $"onnxlora (onnxruntime {OrtEnv.Instance().GetVersionString()})",
            Preset = spec.Preset, Task = spec.Task, Batch = spec.Batch, Seq = spec.Seq, Rank = spec.Rank, Threads = spec.Threads,
            StepS = Math.Round(step, 4), TokensPerS = Math.Round(spec.TokensPerStep / step, 1),
            Trainable = counts.Trainable, Total = counts.Total,
            PeakRssMb = (long)Math.Round(Trainer.PeakMemoryBytes() / (1024.0 * 1024.0)),
            TrainS = Math.Round(train / spec.Steps, 4), OptimizerS = Math.Round(optimizer / spec.Steps, 4), CpuS = Math.Round(cpuPerStep, 3), LoadS = Math.Round(load.Elapsed.TotalSeconds, 2),
            Cpu = cpu, CpuFlags = flags, Blas = $"{MachineInfo.MlasKernel()}, {spec.Threads} intra-op threads",
            MatmulGflops = Math.Round(MachineInfo.OrtMatMulGflops(spec.Threads).Gflops, 1),
        };
    }

    /// <summary>Random token ids (and random targets) from the seed; every sequence full length, as in the peers.</summary>
    public static Batch RandomBatch(BenchSpec spec, int vocab)
    {
        var rng = new Random(spec.Seed);
        int n = spec.Batch * spec.Seq;
        var ids = new long[n];
        var labels = new long[n];
        for (int i = 0; i < n; i++) ids[i] = rng.Next(vocab);
        for (int i = 0; i < n; i++) labels[i] = rng.Next(vocab);
        var lengths = Enumerable.Repeat((long)spec.Seq, spec.Batch).ToArray();
        var classes = Enumerable.Range(0, spec.Batch).Select(_ => (long)rng.Next(Math.Max(spec.Classes, 1))).ToArray();
        return new Batch(spec.Batch, spec.Seq, ids, labels, lengths, classes);
    }
}
