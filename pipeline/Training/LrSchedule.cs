using System.Text.Json.Serialization;

namespace OnnxLora.Pipeline.Training;

/// <summary>Decay after warmup; the names are those of --schedule, train.schedule and train_config.json.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<ScheduleKind>))]
public enum ScheduleKind
{
    [JsonStringEnumMemberName("constant")] Constant,
    [JsonStringEnumMemberName("linear")] Linear,
    [JsonStringEnumMemberName("cosine")] Cosine,
}

/// <summary>
/// Learning rate for optimizer step s (0-based): linear warmup from 0 over <c>warmup</c> steps, then constant,
/// linear or cosine decay to 0 at <c>total</c> steps (Hugging Face's get_*_schedule_with_warmup).
/// </summary>
public sealed record LrSchedule(double PeakLr, int WarmupSteps, int TotalSteps, ScheduleKind Kind)
{
    public double At(int step)
    {
        if (WarmupSteps > 0 && step < WarmupSteps) return PeakLr * (step + 1) / WarmupSteps;
        if (Kind == ScheduleKind.Constant) return PeakLr;
        double progress = TotalSteps <= WarmupSteps ? 1 : (double)(step - WarmupSteps) / (TotalSteps - WarmupSteps);
        progress = Math.Clamp(progress, 0, 1);
        return Kind == ScheduleKind.Linear ? PeakLr * (1 - progress) : PeakLr * 0.5 * (1 + Math.Cos(Math.PI * progress));
    }
}
