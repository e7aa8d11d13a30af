using System.Globalization;
using OnnxLora.Models;

namespace OnnxLora.Pipeline.Training;

/// <summary>
/// A resumable training state: trainable parameters, optimizer moments (any named float tensors) and the
/// counters that make a resumed run continue the same loss curve (step, epoch, batch position, RNG state).
/// Stored as safetensors with a "format" tag in its metadata, checked before anything else is read.
/// </summary>
public sealed record Checkpoint
{
    public const string FormatTag = "onnxlora.checkpoint/1";

    /// <summary>Optimizer steps taken.</summary>
    public required int Step { get; init; }
    /// <summary>The epoch of the next batch.</summary>
    public required int Epoch { get; init; }
    /// <summary>The next batch's index within <see cref="Epoch"/>.</summary>
    public required int BatchInEpoch { get; init; }
    /// <summary>State of the dropout/sampling generator.</summary>
    public ulong RngState { get; init; }
    /// <summary>Content hash of the training configuration; a resume with a different one is refused.</summary>
    public string ConfigHash { get; init; } = "";
    public double BestEvalLoss { get; init; } = double.PositiveInfinity;
    public int EvalsWithoutImprovement { get; init; }
    /// <summary>Processes that trained it (data parallelism); a resume on another count continues the same numbers, up to rounding.</summary>
    public int WorldSize { get; init; } = 1;
    /// <summary>Tensors by name: parameters under their own names, moments as "&lt;param&gt;.exp_avg" etc.</summary>
    public required IReadOnlyDictionary<string, SafeTensor> Tensors { get; init; }

    /// <summary>
    /// Writes the checkpoint atomically (temp, fsync, rename: a failed write keeps the previous file). A state with a
    /// non-finite value is refused, so the file on disk always holds the last good state.
    /// </summary>
    public void Save(string path)
    {
        foreach (var (name, t) in Tensors)
            if (FirstNonFinite(t) is long i)
                throw new InvalidDataException($"step {Step}: '{name}' became non-finite (element {i}); training stopped and {path} keeps the last good state (lower --lr, or --clip, then --resume)");
        var meta = new Dictionary<string, string>
        {
            ["format"] = FormatTag,
            ["step"] = Step.ToString(CultureInfo.InvariantCulture),
            ["epoch"] = Epoch.ToString(CultureInfo.InvariantCulture),
            ["batch_in_epoch"] = BatchInEpoch.ToString(CultureInfo.InvariantCulture),
            ["rng_state"] = RngState.ToString(CultureInfo.InvariantCulture),
            ["config_hash"] = ConfigHash,
            ["best_eval_loss"] = BestEvalLoss.ToString("R", CultureInfo.InvariantCulture),
            ["evals_without_improvement"] = EvalsWithoutImprovement.ToString(CultureInfo.InvariantCulture),
            ["world_size"] = WorldSize.ToString(CultureInfo.InvariantCulture),
        };
        SafeTensorsFile.Write(path, Tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal), meta);
    }

    /// <summary>
    /// Reads and checks a checkpoint: the format tag first, then counters (whole numbers ≥ 0), then every tensor (F32,
    /// finite). Each failure is one line naming the file and the key or tensor.
    /// </summary>
    public static Checkpoint Load(string path)
    {
        var (tensors, meta) = SafeTensorsFile.Read(path);
        if (meta.GetValueOrDefault("format") != FormatTag)
            throw new InvalidDataException($"{path}: not an OnnxLora checkpoint (format '{meta.GetValueOrDefault("format")}', expected '{FormatTag}')");
        string Text(string key, string? fallback = null) => meta.GetValueOrDefault(key) ?? fallback ?? throw new InvalidDataException($"{path}: checkpoint metadata lacks '{key}'");
        int Count(string key, string? fallback = null) =>
            int.TryParse(Text(key, fallback), NumberStyles.None, CultureInfo.InvariantCulture, out int v) ? v
                : throw new InvalidDataException($"{path}: checkpoint metadata '{key}' is '{Text(key, fallback)}', expected a whole number ≥ 0");
        var rng = Text("rng_state", "0");
        var best = Text("best_eval_loss", "Infinity");
        foreach (var (name, t) in tensors)
        {
            if (t.DType != "F32") throw new InvalidDataException($"{path}: tensor '{name}' is {t.DType}; checkpoints hold F32");
            if (FirstNonFinite(t) is long i) throw new InvalidDataException($"{path}: tensor '{name}' holds a non-finite value (element {i}); the checkpoint is corrupt");
        }
        return new Checkpoint
        {
            Step = Count("step"),
            Epoch = Count("epoch"),
            BatchInEpoch = Count("batch_in_epoch"),
            RngState = ulong.TryParse(rng, NumberStyles.None, CultureInfo.InvariantCulture, out var r) ? r
                : throw new InvalidDataException($"{path}: checkpoint metadata 'rng_state' is '{rng}', expected a whole number"),
            ConfigHash = Text("config_hash", ""),
            BestEvalLoss = double.TryParse(best, NumberStyles.Float, CultureInfo.InvariantCulture, out var b) && !double.IsNaN(b) ? b
                : throw new InvalidDataException($"{path}: checkpoint metadata 'best_eval_loss' is '{best}', expected a number"),
            EvalsWithoutImprovement = Count("evals_without_improvement", "0"),
            WorldSize = Count("world_size", "1") is > 0 and var w ? w : throw new InvalidDataException($"{path}: checkpoint metadata 'world_size' is 0, expected at least 1"),
            Tensors = tensors,
        };
    }

    /// <summary>
    /// Checks the tensors against the run's own state (<paramref name="expected"/>: every parameter and optimizer moment
    /// with its shape): none missing, none unknown, every shape equal (a transposed tensor has the right size but not the
    /// right shape).
    /// </summary>
    public void CheckTensors(IReadOnlyDictionary<string, long[]> expected, string path)
    {
        foreach (var (name, t) in Tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            if (!expected.TryGetValue(name, out var shape))
                throw new InvalidDataException($"{path}: tensor '{name}' is not a parameter or optimizer moment of this run");
            if (!shape.SequenceEqual(t.Shape))
                throw new InvalidDataException($"{path}: tensor '{name}' is [{string.Join(", ", t.Shape)}], this run's is [{string.Join(", ", shape)}]");
        }
        if (expected.Keys.Where(k => !Tensors.ContainsKey(k)).Order(StringComparer.Ordinal).FirstOrDefault() is { } missing)
            throw new InvalidDataException($"{path}: lacks tensor '{missing}' (a parameter or optimizer moment of this run)");
    }

    static long? FirstNonFinite(SafeTensor t)
    {
        var values = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(t.Data);
        for (int i = 0; i < values.Length; i++)
            if (!float.IsFinite(values[i])) return i;
        return null;
    }
}
