using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.GraphRewrite.Autodiff.Rules;

/// <summary>Y = tanh X  ⇒  dX = dY·(1 − Y²).</summary>
sealed class TanhRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string y = g.Output(0);
        g.SetInputGrad(0, g.Mul(g.OutputGrad(0)!, g.Sub(g.Scalar(1, y), g.Mul(y, y))));
    }
}

/// <summary>Y = erf X  ⇒  dX = dY·(2/√π)·e^(−X²).</summary>
sealed class ErfRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string x = g.Input(0);
        var e = g.Op("Exp", [g.Neg(g.Mul(x, x))]);
        g.SetInputGrad(0, g.Mul(g.OutputGrad(0)!, g.Mul(e, g.Scalar(2 / Math.Sqrt(Math.PI), x))));
    }
}

/// <summary>Y = sin X  ⇒  dX = dY·cos X (rotary embeddings of trainable positions or angles).</summary>
sealed class SinRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.Mul(g.OutputGrad(0)!, g.Op("Cos", [g.Input(0)])));
}

/// <summary>Y = cos X  ⇒  dX = −dY·sin X.</summary>
sealed class CosRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.Neg(g.Mul(g.OutputGrad(0)!, g.Op("Sin", [g.Input(0)]))));
}

/// <summary>Y = σ(X)  ⇒  dX = dY·Y·(1 − Y).</summary>
sealed class SigmoidRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string y = g.Output(0);
        g.SetInputGrad(0, g.Mul(g.OutputGrad(0)!, g.Mul(y, g.Sub(g.Scalar(1, y), y))));
    }
}

/// <summary>Y = max(X, 0)  ⇒  dX = where(X > 0, dY, 0).</summary>
sealed class ReluRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string x = g.Input(0);
        g.SetInputGrad(0, g.Op("Where", [g.Op("Greater", [x, g.Scalar(0, x)]), g.OutputGrad(0)!, g.Scalar(0, x)]));
    }
}

/// <summary>
/// Gelu (opset 20 and com.microsoft). Exact: Y = x·Φ(x)  ⇒  dX = dY·(Φ(x) + x·φ(x)), φ(x) = e^(−x²/2)/√(2π).
/// approximate="tanh": see <see cref="FastGeluRule.TanhGeluDerivative"/>.
/// </summary>
sealed class GeluRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string x = g.Input(0);
        string S(double v) => g.Scalar(v, x);
        string dydx;
        if (g.Node.GetString("approximate", "none") == "tanh") dydx = FastGeluRule.TanhGeluDerivative(g, x);
        else
        {
            var cdf = g.Mul(S(0.5), g.Add(S(1), g.Op("Erf", [g.Mul(x, S(1 / Math.Sqrt(2)))])));
            var pdf = g.Mul(S(1 / Math.Sqrt(2 * Math.PI)), g.Op("Exp", [g.Mul(g.Mul(x, x), S(-0.5))]));
            dydx = g.Add(cdf, g.Mul(x, pdf));
        }
        g.SetInputGrad(0, g.Mul(g.OutputGrad(0)!, dydx));
    }
}

/// <summary>
/// com.microsoft FastGelu: Y = tanh-GELU(X + bias) (bias optional; what <see cref="GeluFusion"/> turns the exported
/// tanh-GELU subgraph into). dX = dY·GELU′(X + bias), dbias = the same summed to bias's shape.
/// </summary>
sealed class FastGeluRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        var x = g.InputOrNull(1) is { } bias ? g.Add(g.Input(0), bias) : g.Input(0);
        var dx = g.Mul(g.OutputGrad(0)!, TanhGeluDerivative(g, x));
        g.SetInputGrad(0, g.Unbroadcast(dx, g.Input(0)));
        if (g.InputOrNull(1) is { } b) g.SetInputGrad(1, g.Unbroadcast(dx, b));
    }

    /// <summary>
    /// d/dx of ½x(1 + t), t = tanh(u), u = c·(x + a·x³), c = √(2/π), a = 0.044715:
    /// ½(1 + t) + ½x(1 − t²)·c(1 + 3a·x²) = ½(1 + t)·(1 + x(1 − t)·c(1 + 3a·x²)): 14 elementwise ops over x's size
    /// (the forward's tanh is recomputed: the fused forward keeps none of its intermediates alive).
    /// </summary>
    public static string TanhGeluDerivative(GradientContext g, string x)
    {
        string S(double v) => g.Scalar(v, x);
        double c = Math.Sqrt(2 / Math.PI), a = 0.044715;
        var x2 = g.Mul(x, x);
        var t = g.Op("Tanh", [g.Mul(x, g.Add(g.Mul(x2, S(c * a)), S(c)))]);
        var du = g.Add(g.Mul(x2, S(3 * c * a)), S(c));
        var halfOnePlusT = g.Add(g.Mul(t, S(0.5)), S(0.5));
        return g.Mul(halfOnePlusT, g.Add(g.Mul(g.Mul(x, g.Sub(S(1), t)), du), S(1)));
    }
}

/// <summary>Y = softmax(X, a)  ⇒  dX = Y ⊙ (dY − Σₐ(dY ⊙ Y)).</summary>
sealed class SoftmaxRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string y = g.Output(0), dy = g.OutputGrad(0)!;
        var axis = SoftmaxAxis.Of(g);
        var dot = g.ReduceSum(g.Mul(dy, y), [axis], keepDims: true);
        g.SetInputGrad(0, g.Mul(y, g.Sub(dy, dot)));
    }
}

/// <summary>Y = logsoftmax(X, a)  ⇒  dX = dY − e^Y ⊙ Σₐ dY.</summary>
sealed class LogSoftmaxRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string y = g.Output(0), dy = g.OutputGrad(0)!;
        var axis = SoftmaxAxis.Of(g);
        g.SetInputGrad(0, g.Sub(dy, g.Mul(g.Op("Exp", [y]), g.ReduceSum(dy, [axis], keepDims: true))));
    }
}

static class SoftmaxAxis
{
    // before opset 13 softmax flattens to 2-D at `axis`; that equals the per-axis form only on the last axis
    public static long Of(GradientContext g)
    {
        if (g.Emit.Opset >= 13) return g.Node.GetInt("axis", -1);
        int rank = g.RankOf(g.Input(0));
        int axis = g.Axis(g.Node.GetInt("axis", 1), g.Input(0));
        if (axis != rank - 1) throw new GradientException($"{g.Node.Describe()}: opset<13 {g.Node.OpType} over axes {axis}.. has no gradient rule");
        return axis;
    }
}

/// <summary>
/// Dropout in training mode: Y = X ⊙ mask / (1 − r)  ⇒  dX = dY ⊙ mask / (1 − r), reusing the forward mask
/// (added as the node's second output when absent). Without training_mode it is the identity.
/// </summary>
sealed class DropoutRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string x = g.Input(0), dy = g.OutputGrad(0)!;
        var training = g.InputOrNull(2);
        if (training is null || g.ConstInts(training) is [0]) { g.SetInputGrad(0, dy); return; }
        var mask = g.CastTo(g.EnsureForwardOutput(1, g.Output(0) + "_mask"), g.ElemTypeOf(x));
        var ratio = g.InputOrNull(1) is { } r ? g.CastTo(r, g.ElemTypeOf(x)) : g.Scalar(0.5, x);
        var scale = g.Op("Where", [training, g.Div(g.Scalar(1, x), g.Sub(g.Scalar(1, x), ratio)), g.Scalar(1, x)]);
        g.SetInputGrad(0, g.Mul(g.Mul(dy, mask), scale));
    }
}
