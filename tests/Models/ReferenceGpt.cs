using OnnxLora.Models;

namespace OnnxLora.Tests.Models;

/// <summary>
/// A plain float64 GPT-2 forward pass, written from the math with loops and nothing shared with the ONNX builder,
/// so a test can hold the builder's graph (run by ONNX Runtime) against it.
/// </summary>
static class ReferenceGpt
{
    /// <summary>Logits [batch, seq, vocab], flattened row-major.</summary>
    public static double[] Forward(GptWeights w, int heads, double epsilon, long[,] inputIds)
    {
        int batch = inputIds.GetLength(0), seq = inputIds.GetLength(1);
        var wte = w["transformer.wte.weight"].Values;   // [vocab, d]
        var wpe = w["transformer.wpe.weight"].Values;   // [context, d]
        int vocab = (int)w["transformer.wte.weight"].Shape[0], d = (int)w["transformer.wte.weight"].Shape[1];
        int layers = 0;
        while (w.Contains($"transformer.h.{layers}.ln_1.weight")) layers++;
        var logits = new double[batch * seq * vocab];
        for (int b = 0; b < batch; b++)
        {
            var x = Rows(seq, d);
            for (int t = 0; t < seq; t++)
                for (int c = 0; c < d; c++)
                    x[t][c] = wte[inputIds[b, t] * d + c] + wpe[t * d + c];
            for (int l = 0; l < layers; l++)
            {
                string p = $"transformer.h.{l}.";
                var a = LayerNorm(x, w[p + "ln_1.weight"].Values, w[p + "ln_1.bias"].Values, epsilon);
                var bias = w.Contains(p + "attn.c_attn.bias") ? w[p + "attn.c_attn.bias"].Values : new float[3 * d];
                var qkv = Linear(a, w[p + "attn.c_attn.weight"].Values, bias, 3 * d);
                var attn = Linear(CausalSelfAttention(qkv, heads, d), w[p + "attn.c_proj.weight"].Values, w[p + "attn.c_proj.bias"].Values, d);
                AddInPlace(x, attn);
                a = LayerNorm(x, w[p + "ln_2.weight"].Values, w[p + "ln_2.bias"].Values, epsilon);
                var h = Linear(a, w[p + "mlp.c_fc.weight"].Values, w[p + "mlp.c_fc.bias"].Values, 4 * d);
                for (int t = 0; t < seq; t++)
                    for (int j = 0; j < 4 * d; j++)
                    {
                        double v = h[t][j];
                        h[t][j] = 0.5 * v * (1 + Math.Tanh(Math.Sqrt(2 / Math.PI) * (v + 0.044715 * v * v * v)));
                    }
                AddInPlace(x, Linear(h, w[p + "mlp.c_proj.weight"].Values, w[p + "mlp.c_proj.bias"].Values, d));
            }
            var f = LayerNorm(x, w["transformer.ln_f.weight"].Values, w["transformer.ln_f.bias"].Values, epsilon);
            // tied head: logit v = f · (row v of wte); tokens inside, so each wte row is read from memory once
            for (int v = 0; v < vocab; v++)
                for (int t = 0; t < seq; t++)
                {
                    double sum = 0;
                    var row = f[t];
                    for (int c = 0; c < d; c++) sum += row[c] * wte[v * d + c];
                    logits[(b * seq + t) * vocab + v] = sum;
                }
        }
        return logits;
    }

    static double[][] Rows(int count, int width) => Enumerable.Range(0, count).Select(_ => new double[width]).ToArray();

    static double[][] LayerNorm(double[][] x, float[] gamma, float[] beta, double epsilon)
    {
        int seq = x.Length, d = x[0].Length;
        var y = Rows(seq, d);
        for (int t = 0; t < seq; t++)
        {
            double mean = 0, variance = 0;
            for (int c = 0; c < d; c++) mean += x[t][c];
            mean /= d;
            for (int c = 0; c < d; c++) variance += (x[t][c] - mean) * (x[t][c] - mean);
            variance /= d;
            for (int c = 0; c < d; c++) y[t][c] = (x[t][c] - mean) / Math.Sqrt(variance + epsilon) * gamma[c] + beta[c];
        }
        return y;
    }

    // y = x · W + b with W stored [in, out] (Conv1D); tokens inside, so each weight row is read from memory once
    static double[][] Linear(double[][] x, float[] weight, float[] bias, int outDim)
    {
        int seq = x.Length, inDim = x[0].Length;
        var y = Rows(seq, outDim);
        for (int t = 0; t < seq; t++)
            for (int o = 0; o < outDim; o++) y[t][o] = bias[o];
        for (int i = 0; i < inDim; i++)
        {
            int offset = i * outDim;
            for (int t = 0; t < seq; t++)
            {
                double xi = x[t][i];
                var row = y[t];
                for (int o = 0; o < outDim; o++) row[o] += xi * weight[offset + o];
            }
        }
        return y;
    }

    // qkv [seq, 3d] = q | k | v; each head attends to positions ≤ its own
    static double[][] CausalSelfAttention(double[][] qkv, int heads, int d)
    {
        int seq = qkv.Length, hd = d / heads;
        var context = Rows(seq, d);
        var weights = new double[seq];
        for (int h = 0; h < heads; h++)
            for (int t = 0; t < seq; t++)
            {
                double max = double.NegativeInfinity;
                for (int u = 0; u <= t; u++)
                {
                    double dot = 0;
                    for (int j = 0; j < hd; j++) dot += qkv[t][h * hd + j] * qkv[u][d + h * hd + j];
                    weights[u] = dot / Math.Sqrt(hd);
                    max = Math.Max(max, weights[u]);
                }
                double total = 0;
                for (int u = 0; u <= t; u++) total += weights[u] = Math.Exp(weights[u] - max);
                for (int j = 0; j < hd; j++)
                {
                    double sum = 0;
                    for (int u = 0; u <= t; u++) sum += weights[u] / total * qkv[u][2 * d + h * hd + j];
                    context[t][h * hd + j] = sum;
                }
            }
        return context;
    }

    static void AddInPlace(double[][] x, double[][] y)
    {
        for (int t = 0; t < x.Length; t++)
            for (int c = 0; c < x[t].Length; c++) x[t][c] += y[t][c];
    }
}
