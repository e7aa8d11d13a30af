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

    public void Save(string path)
    {
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

    public static Checkpoint Load(string path)
    {
        var (tensors, meta) = SafeTensorsFile.Read(path);
        if (meta.GetValueOrDefault("format") != FormatTag)
            throw new InvalidDataException($"{path}: not an OnnxLora checkpoint (format '{meta.GetValueOrDefault("format")}', expected '{FormatTag}')");
        int Int(string key) => int.Parse(meta.GetValueOrDefault(key) ?? throw new InvalidDataException($"{path}: checkpoint metadata lacks '{key}'"), CultureInfo.InvariantCulture);
        return new Checkpoint
        {
            Step = Int("step"),
            Epoch = Int("epoch"),
            BatchInEpoch = Int("batch_in_epoch"),
            RngState = ulong.Parse(meta.GetValueOrDefault("rng_state", "0"), CultureInfo.InvariantCulture),
            ConfigHash = meta.GetValueOrDefault("config_hash", ""),
            BestEvalLoss = double.Parse(meta.GetValueOrDefault("best_eval_loss", "Infinity"), CultureInfo.InvariantCulture),
            EvalsWithoutImprovement = int.Parse(meta.GetValueOrDefault("evals_without_improvement", "0"), CultureInfo.InvariantCulture),
            WorldSize = int.Parse(meta.GetValueOrDefault("world_size", "1"), CultureInfo.InvariantCulture),
            Tensors = tensors,
        };
    }
}
