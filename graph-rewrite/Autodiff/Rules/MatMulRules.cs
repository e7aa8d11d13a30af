using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.GraphRewrite.Autodiff.Rules;

/// <summary>Shared by MatMul and FusedMatMul: Y = α·op(A)·op(B), op = transpose of the last two dims.</summary>
static class MatMulGrad
{
    // dop(A) = α·dY·op(B)ᵀ and dop(B) = α·op(A)ᵀ·dY, transposed back when the operand was; batch dims unbroadcast
    public static void Build(GradientContext g, bool transA, bool transB, double alpha)
    {
        string a = g.Input(0), b = g.Input(1), dy = g.OutputGrad(0)!;
        int ra = g.RankOf(a), rb = g.RankOf(b);
        if (ra < 2 || rb < 2) throw new GradientException($"{g.Node.Describe()}: 1-D MatMul operands have no gradient rule; reshape to 2-D");
        if (g.NeedsInputGrad(0))
        {
            var da = transA ? g.MatMul(b, dy, transA: transB, transB: true, alpha) : g.MatMul(dy, b, transB: !transB, alpha: alpha);
            g.SetInputGrad(0, Unbatch(g, da, a));
        }
        if (!g.NeedsInputGrad(1)) return;
        if (rb == 2 && ra > 2 && !transA)
        {
            // a 2-D weight under batched activations: one GEMM over batch×tokens on flattened views: [k, N]·[N, n]
            string a2 = g.Flatten2D(a), dy2 = g.Flatten2D(dy);
            g.SetInputGrad(1, transB ? g.MatMul(dy2, a2, transA: true, alpha: alpha) : g.MatMul(a2, dy2, transA: true, alpha: alpha));
            return;
        }
        var db = transB ? g.MatMul(dy, a, transA: true, transB: transA, alpha: alpha) : g.MatMul(a, dy, transA: !transA, alpha: alpha);
        g.SetInputGrad(1, Unbatch(g, db, b));
    }

    // the gradient has Y's batch dims and the operand's matrix dims; sum the batch dims the operand broadcast
    static string Unbatch(GradientContext g, string grad, string operand)
    {
        var y = g.ShapeOf(g.Output(0))?.Dims;
        var x = g.ShapeOf(operand)?.Dims;
        if (y is not null && x is not null)
            g.Emit.Declare(grad, new ValueShape(g.ElemTypeOf(operand), y[..^2].Concat(x[^2..]).ToArray()));
        return g.Unbroadcast(grad, operand, gradLike: grad);
    }
}

/// <summary>Y = A·B  ⇒  dA = dY·Bᵀ (FusedMatMul transB, no transposed weight), dB = Σ_batch Aᵀ·dY.</summary>
sealed class MatMulRule : IGradientRule
{
    public void Build(GradientContext g) => MatMulGrad.Build(g, false, false, 1);
}

/// <summary>com.microsoft.FusedMatMul: Y = α·op(A)·op(B); batch transposes are not supported.</summary>
sealed class FusedMatMulRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        if (g.Node.GetInt("transBatchA", 0) != 0 || g.Node.GetInt("transBatchB", 0) != 0)
            throw new GradientException($"{g.Node.Describe()}: FusedMatMul with transBatchA/B has no gradient rule");
        MatMulGrad.Build(g, g.Node.GetInt("transA", 0) != 0, g.Node.GetInt("transB", 0) != 0, g.Node.GetFloat("alpha", 1));
    }
}

/// <summary>
/// Y = α·op(A)·op(B) + β·C (2-D)  ⇒  dop(A) = α·dY·op(B)ᵀ, dop(B) = α·op(A)ᵀ·dY, dC = β·Σ dY; written as Gemm.
/// </summary>
sealed class GemmRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        bool ta = g.Node.GetInt("transA", 0) != 0, tb = g.Node.GetInt("transB", 0) != 0;
        float alpha = g.Node.GetFloat("alpha", 1), beta = g.Node.GetFloat("beta", 1);
        string a = g.Input(0), b = g.Input(1), dy = g.OutputGrad(0)!;
        if (g.NeedsInputGrad(0))
            g.SetInputGrad(0, ta ? Gemm(g, b, dy, tb, true, alpha) : Gemm(g, dy, b, false, !tb, alpha));
        if (g.NeedsInputGrad(1))
            g.SetInputGrad(1, tb ? Gemm(g, dy, a, true, ta, alpha) : Gemm(g, a, dy, !ta, false, alpha));
        if (g.InputOrNull(2) is { } c && g.NeedsInputGrad(2))
        {
            var dc = g.Unbroadcast(dy, c);
            g.SetInputGrad(2, beta == 1 ? dc : g.Mul(dc, g.Scalar(beta, c)));
        }
    }

    static string Gemm(GradientContext g, string a, string b, bool ta, bool tb, float alpha) =>
        g.Op("Gemm", [a, b], Attr.Int("transA", ta ? 1 : 0), Attr.Int("transB", tb ? 1 : 0), Attr.Float("alpha", alpha));
}
