using System.Text.Json;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Autodiff;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Autodiff;

/// <summary>
/// The optimizer graphs against torch.optim's own numbers (tests/fixtures/optim, made by
/// tools/fixtures/make_optim_golden.py): 4 steps of AdamW (with and without global-norm clipping) and SGD, fed the
/// same gradients, compared after every step with torch's float32 run to 1e-5 relative (+1e-7 absolute).
/// </summary>
public class OptimizerTests
{
    [TestCase("adamw_golden.json", "adamw")]
    [TestCase("adamw_golden.json", "adamw_clip0.5")]
    [TestCase("sgd_golden.json", "sgd")]
    public void MatchesTorchOptim(string file, string caseName)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "optim", file)));
        var c = doc.RootElement.GetProperty("cases").EnumerateArray().First(x => x.GetProperty("name").GetString() == caseName);
        var kind = c.GetProperty("optimizer").GetString() == "adamw" ? OptimizerKind.AdamW : OptimizerKind.Sgd;
        var hp = c.GetProperty("hyperparameters");
        var names = c.GetProperty("shapes").EnumerateObject().Select(p => p.Name).ToList();
        var shapes = c.GetProperty("shapes").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.EnumerateArray().Select(x => x.GetInt64()).ToArray());
        double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
        if (kind == OptimizerKind.AdamW)
        {
            beta1 = hp.GetProperty("betas")[0].GetDouble(); beta2 = hp.GetProperty("betas")[1].GetDouble(); eps = hp.GetProperty("eps").GetDouble();
        }
        float lr = (float)hp.GetProperty("lr").GetDouble();
        float wd = hp.TryGetProperty("weight_decay", out var w) ? (float)w.GetDouble() : 0;
        float clip = hp.TryGetProperty("clip_max_norm", out var cm) && cm.ValueKind == JsonValueKind.Number ? (float)cm.GetDouble() : float.PositiveInfinity;

        var model = Optimizers.Build(kind, names.Select(n => new ParamInfo(n, (int)DataType.Float, shapes[n])).ToList(), beta1, beta2, eps);
        using var session = new InferenceSession(model.ToByteArray());
        float[] Floats(JsonElement e) => e.EnumerateArray().Select(x => (float)x.GetDouble()).ToArray();
        var state = names.ToDictionary(n => n, n => Floats(c.GetProperty("initial").GetProperty(n)));
        foreach (var n in names)
            foreach (var m in Optimizers.Moments(kind, n)) state[m] = new float[state[n].Length];

        var grads = c.GetProperty("grads").EnumerateArray().ToList();
        var golden = c.GetProperty("float32").EnumerateArray().ToList();
        for (int step = 0; step < grads.Count; step++)
        {
            var feeds = new Dictionary<string, OrtValue>
            {
                [Optimizers.LearningRate] = OrtValue.CreateTensorValueFromMemory(new[] { lr }, []),
                [Optimizers.WeightDecay] = OrtValue.CreateTensorValueFromMemory(new[] { wd }, []),
                [Optimizers.GradScale] = OrtValue.CreateTensorValueFromMemory(new[] { 1f }, []),
                [Optimizers.MaxGradNorm] = OrtValue.CreateTensorValueFromMemory(new[] { clip }, []),
                [Optimizers.Step] = OrtValue.CreateTensorValueFromMemory(new[] { (long)step + 1 }, []),
            };
            foreach (var n in names)
            {
                feeds[n] = OrtValue.CreateTensorValueFromMemory(state[n], shapes[n]);
                feeds[Optimizers.Grad(n)] = OrtValue.CreateTensorValueFromMemory(Floats(grads[step].GetProperty(n)), shapes[n]);
                foreach (var m in Optimizers.Moments(kind, n)) feeds[m] = OrtValue.CreateTensorValueFromMemory(state[m], shapes[n]);
            }
            var outputs = session.OutputNames.ToList();
            using var runOptions = new RunOptions();
            using var results = session.Run(runOptions, feeds.Keys.ToList(), feeds.Values.ToList(), outputs);
            foreach (var v in feeds.Values) v.Dispose();
            var got = outputs.Zip(results).ToDictionary(p => p.First, p => p.Second.GetTensorDataAsSpan<float>().ToArray());
            var g = golden[step];
            if (g.TryGetProperty("grad_total_norm", out var norm))
                Assert.That(got[Optimizers.GradNorm][0], Is.EqualTo(norm.GetDouble()).Within(1e-5).Percent.Or.EqualTo(norm.GetDouble()).Within(1e-5 * Math.Abs(norm.GetDouble())), $"step {step + 1}: grad norm");
            foreach (var n in names)
            {
                Compare(got[Optimizers.Updated(n)], Floats(g.GetProperty("params").GetProperty(n)), $"{caseName} step {step + 1}: {n}");
                state[n] = got[Optimizers.Updated(n)];
                if (kind != OptimizerKind.AdamW) continue;
                Compare(got[Optimizers.Updated(Optimizers.ExpAvg(n))], Floats(g.GetProperty("exp_avg").GetProperty(n)), $"{caseName} step {step + 1}: exp_avg {n}");
                Compare(got[Optimizers.Updated(Optimizers.ExpAvgSq(n))], Floats(g.GetProperty("exp_avg_sq").GetProperty(n)), $"{caseName} step {step + 1}: exp_avg_sq {n}");
                state[Optimizers.ExpAvg(n)] = got[Optimizers.Updated(Optimizers.ExpAvg(n))];
                state[Optimizers.ExpAvgSq(n)] = got[Optimizers.Updated(Optimizers.ExpAvgSq(n))];
            }
        }
    }

    static void Compare(float[] actual, float[] expected, string what)
    {
        Assert.That(actual.Length, Is.EqualTo(expected.Length), what);
        double worst = 0; int at = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            double err = Math.Abs(actual[i] - expected[i]) / (Math.Abs(expected[i]) + 1e-2);
            if (err > worst) { worst = err; at = i; }
        }
        Assert.That(worst, Is.LessThanOrEqualTo(1e-5), $"{what}: max relative error {worst:G3} at [{at}]: {actual[at]:R} vs torch {expected[at]:R}");
    }
}
