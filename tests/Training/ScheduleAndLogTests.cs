using OnnxLora.Pipeline.Training;

namespace OnnxLora.Tests.Training;

public class ScheduleAndLogTests
{
    [Test]
    public void WarmupThenCosineOrLinearDecay()
    {
        var cos = new LrSchedule(1.0, 10, 110, ScheduleKind.Cosine);
        Assert.That(cos.At(0), Is.EqualTo(0.1).Within(1e-12));
        Assert.That(cos.At(9), Is.EqualTo(1.0).Within(1e-12));
        Assert.That(cos.At(60), Is.EqualTo(0.5).Within(1e-12));
        Assert.That(cos.At(110), Is.EqualTo(0.0).Within(1e-12));
        var lin = new LrSchedule(2.0, 0, 100, ScheduleKind.Linear);
        Assert.That(lin.At(25), Is.EqualTo(1.5).Within(1e-12));
        Assert.That(new LrSchedule(3.0, 0, 100, ScheduleKind.Constant).At(99), Is.EqualTo(3.0));
    }

    [Test]
    public void MetricsSurviveReopenAndResumeDropsLaterRows()
    {
        using var dir = new TempDir();
        var path = dir.File("metrics.jsonl");
        using (var log = new MetricsLog(path))
            for (int s = 1; s <= 5; s++) log.Add(new MetricsRow("train", s, 0, 5.0 / s, 1e-3, 100));
        using (var log = new MetricsLog(path, resumeFromStep: 3))
        {
            Assert.That(log.Rows.Select(r => r.Step), Is.EqualTo(new[] { 1, 2, 3 }));
            log.Add(new MetricsRow("eval", 4, 0, 0.9, Accuracy: 0.75));
        }
        var lines = File.ReadAllLines(path);
        Assert.That(lines, Has.Length.EqualTo(4));
        Assert.That(lines[3], Does.Contain("\"kind\":\"eval\"").And.Contain("\"accuracy\":0.75"));
    }

    [Test]
    public void LossPlotIsAPng()
    {
        using var dir = new TempDir();
        var rows = Enumerable.Range(1, 20).Select(s => new MetricsRow("train", s, 0, 3.0 / s)).Append(new MetricsRow("eval", 20, 0, 0.4)).ToList();
        var path = dir.File("loss.png");
        LossPlot.Save(rows, path);
        var bytes = File.ReadAllBytes(path);
        Assert.That(bytes[..4], Is.EqualTo(new byte[] { 0x89, 0x50, 0x4E, 0x47 }));
        Assert.That(bytes.Length, Is.GreaterThan(5000));
    }
}
