using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Pipeline.Training;

/// <summary>Draws train and eval loss against step to a PNG (ScottPlot).</summary>
public static class LossPlot
{
    public static void Save(IReadOnlyList<MetricsRow> rows, string path, string title = "LoRA fine-tuning")
    {
        var plot = new ScottPlot.Plot();
        var train = rows.Where(r => r.Kind == "train").ToList();
        var eval = rows.Where(r => r.Kind == "eval").ToList();
        if (train.Count > 0)
        {
            var s = plot.Add.Scatter(train.Select(r => (double)r.Step).ToArray(), train.Select(r => r.Loss).ToArray());
            s.LegendText = "train loss";
            s.MarkerSize = train.Count > 60 ? 0 : 3;
        }
        if (eval.Count > 0)
        {
            var s = plot.Add.Scatter(eval.Select(r => (double)r.Step).ToArray(), eval.Select(r => r.Loss).ToArray());
            s.LegendText = "eval loss";
            s.MarkerSize = 6;
        }
        plot.Title(title);
        plot.XLabel("optimizer step");
        plot.YLabel("cross-entropy loss");
        plot.ShowLegend();
        var bytes = plot.GetImageBytes(900, 500, ScottPlot.ImageFormat.Png);
        AtomicFile.WriteAllBytes(path, bytes);
    }
}
