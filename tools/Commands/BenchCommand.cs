using System.ComponentModel;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Models;
using OnnxLora.Tools.Bench;
using Spectre.Console;
using Spectre.Console.Cli;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// `onnxlora bench`: trains the LoRA workload of bench/peers/workload.json with OnnxLora and, with --peers, with the
/// PyTorch and TorchSharp peers, alternating runs, and prints medians and ratios measured in the same run. Each
/// contestant runs as its own child process, so its peak RSS is its own; OnnxLora's child is
/// <c>onnxlora bench --self-only</c>, which prints one JSON line in the peers' format.
/// </summary>
public sealed class BenchCommand(IAnsiConsole console) : Command<BenchCommand.Settings>
{
    /// <summary>The verb in a bench artifacts folder's marker.</summary>
    const string Verb = "bench";
    public const string Description = "Benchmark LoRA training steps (forward + backward + AdamW) against the PyTorch and TorchSharp peers, side by side.";

    public sealed class Settings : CommandSettings
    {
        [CommandOption("--preset <NAME>")][Description("Model shape from the workload (bench/peers/workload.json: tiny, small, gpt2, gpt2-medium, gpt2-large; default its shape for the task, gpt2), separate q/k/v projections, random weights. --generate: a GptBuilder preset (default gpt2).")]
        public string? Preset { get; init; }
        [CommandOption("--task <TASK>")][Description("cls (default: a frozen random head of --classes outputs at the last position, with LoRA) or lm (the full-vocabulary head, with LoRA).")]
        public string Task { get; init; } = "cls";
        [CommandOption("--classes <N>")][Description("Classes for --task cls (default: the workload's, 2).")]
        public int? Classes { get; init; }
        [CommandOption("--batch <B>")][Description("Sequences per step (default: the workload's shape for the task, 8).")]
        public int? Batch { get; init; }
        [CommandOption("--seq <T>")][Description("Tokens per sequence (default: the workload's shape for the task, 120 for cls, 128 for lm).")]
        public int? Seq { get; init; }
        [CommandOption("--rank <R>")][Description("LoRA rank on every linear layer (default: the workload's, 16).")]
        public int? Rank { get; init; }
        [CommandOption("--alpha <A>")][Description("LoRA alpha (default: the workload's, 16).")]
        public double? Alpha { get; init; }
        [CommandOption("--steps <N>")][Description("Timed steps per run (default 3).")]
        public int Steps { get; init; } = 3;
        [CommandOption("--warmup <N>")][Description("Untimed steps before them (default 1).")]
        public int Warmup { get; init; } = 1;
        [CommandOption("--threads <N>")][Description("Intra-op threads for every contestant (default 2).")]
        public int Threads { get; init; } = 2;
        [CommandOption("--seed <N>")][Description("Seed of the weights, LoRA init and token batch (default: the workload's, 123).")]
        public int? Seed { get; init; }
        [CommandOption("--workload <FILE>")][Description("The workload definition (default: workload.json in --peers, else the copy built into onnxlora, from bench/peers/).")]
        public string? WorkloadFile { get; init; }
        [CommandOption("--runs <N>")][Description("Alternating rounds (ours, pytorch, torchsharp, ours, …); the table shows medians (default 1).")]
        public int Runs { get; init; } = 1;
        [CommandOption("--peers <DIR>")][Description("Folder with the peers (bench/peers: workload.json, torch_peer.py, torchsharp/); without it only OnnxLora runs.")]
        public string? Peers { get; init; }
        [CommandOption("--python <PATH>")][Description("Python with torch for torch_peer.py (default /usr/bin/python3, else python3).")]
        public string? Python { get; init; }
        [CommandOption("--torchsharp <PATH>")][Description("The built TorchSharpPeer binary (default: DIR/torchsharp/bin/Release/net10.0/linux-x64/TorchSharpPeer when it exists).")]
        public string? TorchSharp { get; init; }
        [CommandOption("--json <FILE>")][Description("Also write every run and the summary as JSON (a new file).")]
        public string? Json { get; init; }
        [CommandOption("--overwrite")][Description("Replace an existing --json file.")]
        public bool Overwrite { get; init; }
        [CommandOption("--ort-config <KEY=VALUE>")][Description("ONNX Runtime session config entry for OnnxLora's sessions (repeatable), e.g. session.intra_op.allow_spinning=0.")]
        public string[] OrtConfig { get; init; } = [];
        [CommandOption("--graph-optimization <LEVEL>")][Description("ONNX Runtime graph optimization level for OnnxLora's sessions: disable, basic, extended or all (default all).")]
        public string GraphOptimization { get; init; } = "all";
        [CommandOption("--no-cpu-arena")][Description("Turn off ONNX Runtime's CPU memory arena for OnnxLora's sessions (lower peak memory).")]
        public bool NoCpuArena { get; init; }
        [CommandOption("--memory-pattern")][Description("Turn ONNX Runtime's memory pattern planning back on for OnnxLora's sessions (TrainingSession turns it off).")]
        public bool MemoryPattern { get; init; }
        [CommandOption("--profile <PREFIX>")][Description("Write ONNX Runtime profiles (PREFIX_*.json) of OnnxLora's sessions and print their per-op kernel totals (forward / backward) of the last step.")]
        public string? Profile { get; init; }
        [CommandOption("--generate")][Description("Benchmark generation instead of training: a with-past GPT-2 preset, batch 1 and --batch, no cache vs the KV cache, each on the base model, with an adapter and merged; time to first token and tokens/s.")]
        public bool Generate { get; init; }
        [CommandOption("--prompt-tokens <N>")][Description("--generate: prompt length (default 128).")]
        public int PromptTokens { get; init; } = 128;
        [CommandOption("--new-tokens <N>")][Description("--generate: tokens generated per row (default 128).")]
        public int NewTokens { get; init; } = 128;
        [CommandOption("--modes <LIST>")][Description("--generate: nocache, cache or both, comma-separated (default nocache,cache; nocache is O(n²) and slow on gpt2).")]
        public string Modes { get; init; } = "nocache,cache";
        [CommandOption("--variants <LIST>")][Description("--generate: base, adapter, merged, comma-separated (default all three).")]
        public string Variants { get; init; } = "base,adapter,merged";
        [CommandOption("--genai-tool <PATH>")][Description("--generate: also run ONNX Runtime GenAI (mode genai) on the exported genai folders, base / adapter / merged, with this built OnnxLora.GenAiBench.dll (tools/GenAiBench) in a child process.")]
        public string? GenAiTool { get; init; }
        [CommandOption("--self-only")][Description("Run only OnnxLora, in this process, and print one JSON line in the peers' format (what the child run does).")]
        public bool SelfOnly { get; init; }
        [CommandOption("--artifacts <DIR>")][Description("With --self-only: use the artifacts in DIR (with their bench_counts.json), or build them there and keep them.")]
        public string? Artifacts { get; init; }

        /// <summary>--workload, else --peers' workload.json, else the embedded copy; a bad file throws InvalidDataException (Validate reports it).</summary>
        internal Workload Workload => _workload ??= WorkloadPath is string path ? Workload.Load(path) : Workload.Embedded;
        Workload? _workload;

        /// <summary>The workload file every contestant reads (null: the embedded copy).</summary>
        internal string? WorkloadPath => WorkloadFile ?? (Peers is not null && File.Exists(Path.Combine(Peers, Workload.FileName)) ? Path.Combine(Peers, Workload.FileName) : null);

        Workload.Shape DefaultShape => Workload.Shapes[Task];
        internal string PresetName => Preset ?? (Generate ? "gpt2" : DefaultShape.Preset);
        internal int BatchSize => Batch ?? (Generate ? 8 : DefaultShape.Batch);
        internal int RankValue => Rank ?? Workload.Lora.Rank;
        internal int SeedValue => Seed ?? Workload.Seed;

        public override ValidationResult Validate()
        {
            // the spec, the child's command line and the peers' JSON carry the task as written: lm or cls, lower case
            if (Task is not ("cls" or "lm")) return ValidationResult.Error($"--task: task must be lm or cls (got '{Task}')");
            if (Peers is not null && !Directory.Exists(Peers)) return ValidationResult.Error($"--peers {Peers}: no such folder");
            if (WorkloadFile is not null && Peers is not null) return ValidationResult.Error("--workload goes without --peers (the peers read the workload.json beside them)");
            if (Peers is not null && !File.Exists(Path.Combine(Peers, Workload.FileName))) return ValidationResult.Error($"--peers {Peers}: no {Workload.FileName} (use bench/peers of the OnnxLora repository)");
            try { _ = Workload; }
            catch (InvalidDataException e) { return ValidationResult.Error($"--workload: {e.Message}"); }
            var presets = Generate ? GptConfig.PresetNames : Workload.Presets.Keys.ToList();
            if (!presets.Contains(PresetName)) return ValidationResult.Error($"--preset must be one of {string.Join(", ", presets)} (got '{PresetName}')");
            if (Task == "cls" && Classes < 2) return ValidationResult.Error($"--classes must be ≥ 2 (got {Classes})");
            foreach (var (name, value, min) in new[] { ("--batch", Batch, 1), ("--seq", Seq, 1), ("--rank", Rank, 1), ("--steps", Steps, 1), ("--warmup", Warmup, 0), ("--threads", Threads, 1), ("--runs", Runs, 1) })
                if (value < min) return ValidationResult.Error($"{name} must be ≥ {min} (got {value})");
            if (Alpha is <= 0) return ValidationResult.Error($"--alpha must be > 0 (got {Alpha})");
            if (Threads > Environment.ProcessorCount) return ValidationResult.Error($"--threads must be ≤ {Environment.ProcessorCount} (this machine's cores), got {Threads}");
            if (!Generate && Spec.Seq > Spec.ModelConfig.ContextLength) return ValidationResult.Error($"--seq {Spec.Seq} is longer than {PresetName}'s context ({Spec.ModelConfig.ContextLength})");
            if (GraphOptimization is not ("disable" or "basic" or "extended" or "all")) return ValidationResult.Error($"--graph-optimization must be disable, basic, extended or all (got '{GraphOptimization}')");
            if (Generate && (PromptTokens < 1 || NewTokens < 1)) return ValidationResult.Error("--prompt-tokens and --new-tokens must be ≥ 1");
            if (Generate && Modes.Split(',').Any(m => !GenerateBench.AllModes.Contains(m.Trim()))) return ValidationResult.Error($"--modes: use {string.Join(", ", GenerateBench.AllModes)} (got '{Modes}')");
            if (Generate && Variants.Split(',').Any(v => !GenerateBench.Variants.Contains(v.Trim()))) return ValidationResult.Error($"--variants: use {string.Join(", ", GenerateBench.Variants)} (got '{Variants}')");
            if (GenAiTool is not null && !Generate) return ValidationResult.Error("--genai-tool goes with --generate");
            if (GenAiTool is not null && !File.Exists(GenAiTool)) return ValidationResult.Error($"--genai-tool {GenAiTool}: no such file (build tools/GenAiBench: dotnet build tools/GenAiBench -c Release)");
            if (Generate && (Peers ?? Artifacts ?? WorkloadFile) is not null) return ValidationResult.Error("--generate runs OnnxLora only; leave out --peers, --workload and --artifacts");
            if (Artifacts is not null && !SelfOnly) return ValidationResult.Error("--artifacts goes with --self-only");
            foreach (var entry in OrtConfig)
                if (!entry.Contains('=')) return ValidationResult.Error($"--ort-config '{entry}' is not KEY=VALUE");
            return ValidationResult.Success();
        }

        internal BenchSpec Spec => new(PresetName, Task, Classes ?? Workload.Shapes["cls"].Classes!.Value, BatchSize, Seq ?? DefaultShape.Seq, RankValue,
                                       Alpha ?? Workload.Lora.Alpha, Steps, Warmup, Threads, SeedValue, Workload);
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        var spec = s.Spec;
        if (s.Generate) return Generate(s);
        if (s.SelfOnly) return SelfOnly(s, spec);

        var contestants = Contestants(s, spec, out var notes);
        console.MarkupLineInterpolated($"[bold]onnxlora bench[/]: {spec.Preset} (separate q/k/v), task {spec.Task}{(spec.Task == "cls" ? $" ({spec.Classes} classes)" : "")}, batch {spec.Batch} × {spec.Seq}, LoRA r={spec.Rank} alpha={spec.Alpha} on every linear, AdamW (lr {spec.Workload.Optimizer.Lr}, weight decay {spec.Workload.Optimizer.WeightDecay}); {spec.Warmup} warmup + {spec.Steps} timed steps, {spec.Threads} threads, {s.Runs} run(s)");
        foreach (var note in notes) console.MarkupLineInterpolated($"[yellow]note:[/] {note}");
        var (cpu, flags) = MachineInfo.Cpu();
        (double Gflops, double GflopsPerCpuSecond) peak = default;
        console.Status().Start("measuring ONNX Runtime's MatMul peak (2048³)…", _ => peak = MachineInfo.OrtMatMulGflops(spec.Threads));
        console.MarkupLineInterpolated($"machine: {cpu}, {Environment.ProcessorCount} cores, flags {flags}, load average {LoadAverage()}; ONNX Runtime MatMul 2048³ with {spec.Threads} threads: [bold]{peak.Gflops:F1} GFLOP/s[/], {peak.GflopsPerCpuSecond:F1} GFLOP per CPU-second (the peaks below)");
        console.MarkupLineInterpolated($"workload: {spec.TrainingFlops / 1e9:F1} GFLOP of matrix products per training step (3·forward − frozen weight gradients, docs/BENCHMARKS.md)");

        if (s.Json is not null) OutputFolder.CheckFile(s.Json, "--json", [s.Peers], s.Overwrite);   // before minutes of benchmarking
        var loadBefore = LoadAverage();
        var dir = Path.Combine(Path.GetTempPath(), $"onnxlora-bench-{Environment.ProcessId}-{Guid.NewGuid():N}"[..48]);
        try
        {
            OutputFolder.Mark(dir, Verb);
            var build = Stopwatch.StartNew();
            BenchWorkload.Counts counts = null!;
            console.Status().Start("building the model, LoRA rewrite and training artifacts…", _ => counts = BenchWorkload.BuildArtifacts(spec, dir));
            GC.Collect();   // the in-memory model is garbage now; do not hold it while the children run
            console.MarkupLineInterpolated($"artifacts built in {build.Elapsed.TotalSeconds:F1} s: {counts.Trainable:N0} trainable of {counts.Total:N0} parameters");
            contestants.Insert(0, SelfProcess(s, spec, dir));

            var started = DateTime.UtcNow;
            var runs = new List<(int Round, BenchProcess Who, BenchResult Result)>();
            for (int round = 1; round <= s.Runs; round++)
                foreach (var who in contestants)
                {
                    cancellationToken.ThrowIfCancellationRequested();
                    var clock = Stopwatch.StartNew();
                    BenchResult result = null!;
                    var label = $"run {round}/{s.Runs}: {who.Name}";
                    console.Status().Start(label, ctx =>
                        result = who.Run(line => ctx.Status(Markup.Escape($"{label} ({clock.Elapsed.TotalSeconds:F0} s) {Shorten(line)}")), cancellationToken));
                    runs.Add((round, who, result));
                    var load = LoadAverage();
                    console.MarkupLineInterpolated($"{label}: {result.StepS:F2} s/step, {result.TokensPerS:F1} tokens/s, peak {result.PeakRssMb:N0} MiB{(result.TrainS is double t ? $" (train {t:F2} s + optimizer {result.OptimizerS:F3} s, CPU {result.CpuS:F2} s)" : "")} [grey]({clock.Elapsed.TotalSeconds:F0} s, load {load})[/]");
                }

            var summary = Summarize(runs, contestants, spec.TrainingFlops, peak);
            PrintTable(summary, counts, peak);
            if (s.Profile is not null) ProfileSummary.Print(s.Profile, started, console.Profile.Out.Writer);
            if (s.Json is not null)
                AtomicFile.WriteAllText(s.Json, JsonSerializer.Serialize(new
                {
                    spec,
                    machine = new { cpu, cores = Environment.ProcessorCount, flags, load_average_before = loadBefore, load_average_after = LoadAverage(),
                                    ort_matmul_2048_gflops = Math.Round(peak.Gflops, 1), ort_matmul_2048_gflop_per_cpu_s = Math.Round(peak.GflopsPerCpuSecond, 1),
                                    training_gflop_per_step = Math.Round(spec.TrainingFlops / 1e9, 2) },
                    commands = contestants.Select(c => new { name = c.Name, command = c.CommandLine }),
                    runs = runs.Select(r => new { round = r.Round, name = r.Who.Name, result = r.Result }),
                    summary,
                }, new JsonSerializerOptions(BenchResult.Json) { WriteIndented = true }));
            return 0;
        }
        finally
        {
            try { if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true); }
            catch (IOException) { }
        }
    }

    /// <summary>The child's work: build (unless --artifacts) and run in this process; one JSON line on stdout, progress on stderr.</summary>
    int SelfOnly(Settings s, BenchSpec spec)
    {
        string dir = s.Artifacts ?? Path.Combine(Path.GetTempPath(), $"onnxlora-bench-self-{Environment.ProcessId}-{Guid.NewGuid():N}"[..50]);
        try
        {
            // --artifacts: a new folder, or one a bench built (reused); never a folder of the user's
            if (!OutputFolder.Check(dir, Verb, "--artifacts", overwrite: false, reuse: true)) OutputFolder.Mark(dir, Verb);
            if (!File.Exists(Path.Combine(dir, BenchWorkload.CountsFile))) BenchWorkload.BuildArtifacts(spec, dir);
            var started = DateTime.UtcNow;
            var result = BenchWorkload.Run(spec, dir, line => Console.Error.WriteLine(line), options =>
            {
                foreach (var entry in s.OrtConfig)
                {
                    int eq = entry.IndexOf('=');
                    options.AddSessionConfigEntry(entry[..eq], entry[(eq + 1)..]);
                }
                options.GraphOptimizationLevel = s.GraphOptimization switch
                {
                    "disable" => GraphOptimizationLevel.ORT_DISABLE_ALL, "basic" => GraphOptimizationLevel.ORT_ENABLE_BASIC,
                    "extended" => GraphOptimizationLevel.ORT_ENABLE_EXTENDED, _ => GraphOptimizationLevel.ORT_ENABLE_ALL,
                };
                if (s.NoCpuArena) options.EnableCpuMemArena = false;
                if (s.MemoryPattern) options.EnableMemoryPattern = true;
                if (s.Profile is not null) { options.ProfileOutputPathPrefix = s.Profile; options.EnableProfiling = true; }   // the prefix first: enabling reads it
            });
            if (s.Profile is not null) ProfileSummary.Print(s.Profile, started, Console.Error);   // ORT wrote the files when the sessions closed
            // the raw writer: a console would wrap the line at its width
            console.Profile.Out.Writer.WriteLine(result.ToJsonLine());
            console.Profile.Out.Writer.Flush();
            return 0;
        }
        finally
        {
            if (s.Artifacts is null && Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>OnnxLora's child: this same program (the apphost, or dotnet with onnxlora.dll) with --self-only.</summary>
    static BenchProcess SelfProcess(Settings s, BenchSpec spec, string artifacts)
    {
        var args = new List<string>();
        string host;
        var processPath = Environment.ProcessPath;
        if (processPath is not null && Path.GetFileNameWithoutExtension(processPath) == "onnxlora") host = processPath;
        else
        {
            host = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } h ? h : "dotnet";
            args.Add(typeof(Cli).Assembly.Location);
        }
        args.AddRange(["bench", "--self-only", "--artifacts", artifacts]);
        args.AddRange(CommonArgs(spec));
        args.AddRange(["--seed", spec.Seed.ToString(CultureInfo.InvariantCulture), "--alpha", spec.Alpha.ToString("R", CultureInfo.InvariantCulture)]);
        if (s.WorkloadPath is string workload) args.AddRange(["--workload", Path.GetFullPath(workload)]);
        foreach (var entry in s.OrtConfig) args.AddRange(["--ort-config", entry]);
        if (s.Profile is not null) args.AddRange(["--profile", s.Profile]);
        if (s.NoCpuArena) args.Add("--no-cpu-arena");
        if (s.GraphOptimization != "all") args.AddRange(["--graph-optimization", s.GraphOptimization]);
        if (s.MemoryPattern) args.Add("--memory-pattern");
        return new BenchProcess("onnxlora", host, args);
    }

    static IEnumerable<string> CommonArgs(BenchSpec spec)
    {
        string I(int v) => v.ToString(CultureInfo.InvariantCulture);
        return ["--preset", spec.Preset, "--task", spec.Task, "--classes", I(spec.Classes), "--batch", I(spec.Batch), "--seq", I(spec.Seq),
                "--rank", I(spec.Rank), "--steps", I(spec.Steps), "--warmup", I(spec.Warmup), "--threads", I(spec.Threads)];
    }

    /// <summary>The peers found under --peers (PyTorch) and at --torchsharp or its default path (TorchSharp).</summary>
    static List<BenchProcess> Contestants(Settings s, BenchSpec spec, out List<string> notes)
    {
        notes = [];
        var list = new List<BenchProcess>();
        var peerArgs = CommonArgs(spec).Concat(["--alpha", spec.Alpha.ToString("R", CultureInfo.InvariantCulture), "--seed", spec.Seed.ToString(CultureInfo.InvariantCulture)]).ToList();
        if (s.Peers is not null)
        {
            var script = Path.Combine(Path.GetFullPath(s.Peers), "torch_peer.py");
            if (!File.Exists(script)) notes.Add($"no {script}: the PyTorch peer is skipped");
            else
            {
                var python = s.Python ?? (File.Exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3");
                // never a handicapped peer: an inherited OPENBLAS_CORETYPE (e.g. Haswell) pins OpenBLAS to older kernels
                list.Add(new BenchProcess("pytorch", python, [script, .. peerArgs], new Dictionary<string, string?> { ["OPENBLAS_CORETYPE"] = null, ["OPENBLAS_L2_SIZE"] = null }));
            }
        }
        var torchSharp = s.TorchSharp ?? (s.Peers is null ? null : Path.Combine(Path.GetFullPath(s.Peers), "torchsharp", "bin", "Release", "net10.0", "linux-x64", "TorchSharpPeer"));
        if (torchSharp is not null)
        {
            if (File.Exists(torchSharp)) list.Add(new BenchProcess("torchsharp", Path.GetFullPath(torchSharp), peerArgs));
            else notes.Add($"no TorchSharp peer at {torchSharp} (build it as the peers' README says, or pass --torchsharp PATH): skipped");
        }
        return list;
    }

    /// <summary>Medians per contestant over the rounds.</summary>
    /// <summary>
    /// Medians per contestant; <see cref="Gflops"/> = the workload's training FLOPs ÷ the median step,
    /// <see cref="PeakFraction"/> = that ÷ the measured ORT MatMul peak; <see cref="CpuS"/> the median CPU seconds per
    /// step and <see cref="CpuPeakFraction"/> = (FLOPs ÷ CPU-second) ÷ the MatMul's FLOPs per CPU-second.
    /// </summary>
    public sealed record Summary(string Name, string Peer, int Runs, double StepS, double TokensPerS, double PeakRssMb, long Trainable, long Total, double? TrainS, double? OptimizerS,
                                 double Gflops, double PeakFraction, double? CpuS, double? CpuPeakFraction, BenchResult Machine);

    static List<Summary> Summarize(List<(int Round, BenchProcess Who, BenchResult Result)> runs, List<BenchProcess> contestants, double flops, (double Gflops, double GflopsPerCpuSecond) peak) =>
        contestants.Select(c =>
        {
            var rs = runs.Where(r => r.Who == c).Select(r => r.Result).ToList();
            double? MedianOrNull(Func<BenchResult, double?> f) => rs.All(r => f(r) is not null) ? Median(rs.Select(r => f(r)!.Value)) : null;
            double step = Median(rs.Select(r => r.StepS));
            return new Summary(c.Name, rs[0].Peer, rs.Count, step, Median(rs.Select(r => r.TokensPerS)), Median(rs.Select(r => (double)r.PeakRssMb)),
                               rs[0].Trainable, rs[0].Total, MedianOrNull(r => r.TrainS), MedianOrNull(r => r.OptimizerS),
                               flops / step / 1e9, flops / step / 1e9 / peak.Gflops, MedianOrNull(r => r.CpuS),
                               MedianOrNull(r => r.CpuS) is double cpu ? flops / cpu / 1e9 / peak.GflopsPerCpuSecond : null, rs[^1]);
        }).ToList();

    internal static double Median(IEnumerable<double> values)
    {
        var v = values.Order().ToArray();
        return v.Length % 2 == 1 ? v[v.Length / 2] : (v[v.Length / 2 - 1] + v[v.Length / 2]) / 2;
    }

    void PrintTable(List<Summary> summary, BenchWorkload.Counts counts, (double Gflops, double GflopsPerCpuSecond) peak)
    {
        var ours = summary[0];
        // redirected to a file, Spectre assumes 80 columns and would break every cell: the table is the record
        if (Console.IsOutputRedirected) console.Profile.Width = Math.Max(console.Profile.Width, 140);
        var table = new Table().Title($"medians of {ours.Runs} run(s)").AddColumns("", "s/step", "tokens/s", "GFLOP/s", "% peak", "CPU s", "% peak/CPU", "peak MiB", "speed ×", "mem ×");
        foreach (var r in summary)
        {
            bool self = ReferenceEquals(r, ours);
            table.AddRow(Markup.Escape(r.Name), $"{r.StepS:F2}", $"{r.TokensPerS:F1}", $"{r.Gflops:F1}", $"{100 * r.PeakFraction:F0}", $"{r.CpuS:F2}", r.CpuPeakFraction is double f ? $"{100 * f:F0}" : "", $"{r.PeakRssMb:N0}",
                         self ? "" : $"{ours.TokensPerS / r.TokensPerS:F2}", self ? "" : $"{ours.PeakRssMb / r.PeakRssMb:F2}");
        }
        table.Border(TableBorder.Simple);
        console.Write(table);
        console.MarkupLineInterpolated($"% peak: GFLOP/s ÷ ONNX Runtime's MatMul 2048³ measured here before the runs ({peak.Gflops:F1} GFLOP/s); CPU s: process CPU seconds per step; % peak/CPU: GFLOP per CPU-second ÷ the MatMul's ({peak.GflopsPerCpuSecond:F1}), steadier on a shared machine");
        console.MarkupLineInterpolated($"trainable parameters: {string.Join(", ", summary.Select(r => $"{r.Name} {r.Trainable:N0}"))}");
        foreach (var r in summary)
        {
            var m = r.Machine;
            var env = m.Env is { Count: > 0 } e ? string.Join(" ", e.Select(kv => $"{kv.Key}={kv.Value}")) : "";
            console.MarkupLineInterpolated($"{r.Name}: {r.Peer}, {r.Total:N0} parameters; {m.Threads} threads; BLAS {m.Blas ?? "?"}; its own MatMul 2048³ {m.MatmulGflops?.ToString("F1", CultureInfo.InvariantCulture) ?? "?"} GFLOP/s; CPU {m.Cpu ?? "?"} ({m.CpuFlags ?? "?"}){(env.Length > 0 ? $"; env {env}" : "")}");
        }
        if (ours.TrainS is double t && ours.OptimizerS is double o)
            console.MarkupLineInterpolated($"OnnxLora step: train session (forward + backward) {t:F2} s, optimizer session {o:F3} s");
        foreach (var r in summary.Skip(1).Where(r => r.Trainable != counts.Trainable))
            console.MarkupLineInterpolated($"[yellow]note:[/] {r.Name} trains {r.Trainable:N0} parameters, OnnxLora {counts.Trainable:N0}: not the same workload");
        if (summary.Count > 1)
            console.MarkupLine("speed × = OnnxLora tokens/s ÷ the peer's (> 1: OnnxLora faster); mem × = OnnxLora peak RSS ÷ the peer's (< 1: OnnxLora smaller).");
    }

    /// <summary>The 1-minute load average (/proc/loadavg), "?" elsewhere: every bench line on a shared machine should carry it.</summary>
    internal static string LoadAverage()
    {
        try { return File.ReadAllText("/proc/loadavg").Split(' ')[0]; }
        catch (IOException) { return "?"; }
    }

    static string Shorten(string line) => line.Length > 90 ? line[..90] + "…" : line;

    int Generate(Settings s)
    {
        var spec = new GenerateBench.Spec(s.PresetName, s.PromptTokens, s.NewTokens, new[] { 1, s.BatchSize }.Distinct().ToList(),
            s.Modes.Split(',').Select(m => m.Trim()).Distinct().ToList(), s.Variants.Split(',').Select(v => v.Trim()).Distinct().ToList(), s.RankValue, s.Threads, s.SeedValue,
            s.GenAiTool is null ? null : Path.GetFullPath(s.GenAiTool));
        console.MarkupLineInterpolated($"[bold]onnxlora bench --generate[/]: {spec.Preset} with past, prompt {spec.PromptTokens} + {spec.NewTokens} new tokens, greedy, batch {string.Join(" and ", spec.Batches)}, {s.Threads} threads, {string.Join(" vs ", spec.Modes)}{(spec.GenAiTool is null ? "" : " vs ONNX Runtime GenAI")}");
        if (s.Json is not null) OutputFolder.CheckFile(s.Json, "--json", [], s.Overwrite);
        var dir = Path.Combine(Path.GetTempPath(), $"onnxlora-bench-{Environment.ProcessId}-{Guid.NewGuid():N}"[..48]);
        try
        {
            OutputFolder.Mark(dir, Verb);
            var results = GenerateBench.Run(spec, dir, line => console.WriteLine(line));
            var table = new Table().AddColumns("batch", "mode", "variant", "first token ms", "tokens/s", "total s");
            foreach (var r in results)
                table.AddRow(r.Batch.ToString(CultureInfo.InvariantCulture), r.Mode, r.Variant, (r.FirstTokenS * 1000).ToString("F1", CultureInfo.InvariantCulture),
                             r.TokensPerS.ToString("F1", CultureInfo.InvariantCulture), r.TotalS.ToString("F2", CultureInfo.InvariantCulture));
            console.Write(table);
            foreach (var batch in spec.Batches)
                foreach (var variant in GenerateBench.Variants)
                {
                    var pair = results.Where(r => r.Batch == batch && r.Variant == variant).ToDictionary(r => r.Mode);
                    if (pair.TryGetValue("cache", out var c) && pair.TryGetValue("nocache", out var n))
                        console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"batch {batch}, {variant}: the cache is {n.TotalS / c.TotalS:F1}× faster"));
                    if (pair.TryGetValue("cache", out c) && pair.TryGetValue("genai", out var g))
                        console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"batch {batch}, {variant}: ours with the cache ÷ GenAI tokens/s = {c.TokensPerS / g.TokensPerS:F2}, tokens {(g.SameTokensAsOurs == true ? "equal" : "DIFFER")}"));
                }
            if (s.Json is not null) AtomicFile.WriteAllText(s.Json, JsonSerializer.Serialize(new { spec, results = results.Select(r => new { r.Batch, r.Mode, r.Variant, r.PromptTokens, r.NewTokens, r.FirstTokenS, r.TotalS, r.TokensPerS, r.SameTokensAsOurs, r.Tokens }) }, new JsonSerializerOptions { WriteIndented = true }));
            return 0;
        }
        finally { if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true); }
    }
}
