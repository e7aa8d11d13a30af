using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.GraphRewrite.Autodiff.Rules;

/// <summary>Y = A + B  ⇒  dA = unbroadcast(dY), dB = unbroadcast(dY).</summary>
sealed class AddRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        for (int i = 0; i < 2; i++) if (g.NeedsInputGrad(i)) g.SetInputGrad(i, g.Unbroadcast(g.OutputGrad(0)!, g.Input(i)));
    }
}

/// <summary>Y = ΣXᵢ (variadic)  ⇒  dXᵢ = unbroadcast(dY).</summary>
sealed class SumRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        for (int i = 0; i < g.Node.Input.Count; i++) if (g.NeedsInputGrad(i)) g.SetInputGrad(i, g.Unbroadcast(g.OutputGrad(0)!, g.Input(i)));
    }
}

/// <summary>Y = A − B  ⇒  dA = unbroadcast(dY), dB = −unbroadcast(dY).</summary>
sealed class SubRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        if (g.NeedsInputGrad(0)) g.SetInputGrad(0, g.Unbroadcast(g.OutputGrad(0)!, g.Input(0)));
        if (g.NeedsInputGrad(1)) g.SetInputGrad(1, g.Neg(g.Unbroadcast(g.OutputGrad(0)!, g.Input(1))));
    }
}

/// <summary>Y = A·B  ⇒  dA = unbroadcast(dY·B), dB = unbroadcast(dY·A).</summary>
sealed class MulRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        if (g.NeedsInputGrad(0)) g.SetInputGrad(0, g.Unbroadcast(g.Mul(g.OutputGrad(0)!, g.Input(1)), g.Input(0)));
        if (g.NeedsInputGrad(1)) g.SetInputGrad(1, g.Unbroadcast(g.Mul(g.OutputGrad(0)!, g.Input(0)), g.Input(1)));
    }
}

/// <summary>Y = A / B  ⇒  dA = unbroadcast(dY / B), dB = −unbroadcast(dY·Y / B).</summary>
sealed class DivRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        var dyOverB = g.Div(g.OutputGrad(0)!, g.Input(1));
        if (g.NeedsInputGrad(0)) g.SetInputGrad(0, g.Unbroadcast(dyOverB, g.Input(0)));
        if (g.NeedsInputGrad(1)) g.SetInputGrad(1, g.Neg(g.Unbroadcast(g.Mul(dyOverB, g.Output(0)), g.Input(1))));
    }
}

/// <summary>
/// Y = max(A, B) (or min), two inputs, as PyTorch's maximum/minimum differentiate: the larger (smaller) input gets dY,
/// ties split it in half  ⇒  dA = unbroadcast(dY·w), dB = unbroadcast(dY·(1 − w)), w = [A wins] + ½[A = B]. Older
/// transformers' Llama clamps the masked scores with torch.max(scores, finfo.min).
/// </summary>
sealed class MaxMinRule(bool max) : IGradientRule
{
    public void Build(GradientContext g)
    {
        if (g.Node.Input.Count != 2)
            throw new GradientException($"{g.Node.Describe()}: {g.Node.OpType} with {g.Node.Input.Count} inputs has no gradient rule (two inputs only)");
        string a = g.Input(0), b = g.Input(1);
        int type = g.ElemTypeOf(a);
        var wins = g.CastTo(g.Op(max ? "Greater" : "Less", [a, b]), type);
        var ties = g.CastTo(g.Op("Equal", [a, b]), type);
        var w = g.Add(wins, g.Mul(ties, g.Scalar(0.5, a)));
        var dy = g.OutputGrad(0)!;
        if (g.NeedsInputGrad(0)) g.SetInputGrad(0, g.Unbroadcast(g.Mul(dy, w), a));
        if (g.NeedsInputGrad(1)) g.SetInputGrad(1, g.Unbroadcast(g.Mul(dy, g.Sub(g.Scalar(1, a), w)), b));
    }
}

/// <summary>Y = −X  ⇒  dX = −dY.</summary>
sealed class NegRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.Neg(g.OutputGrad(0)!));
}

/// <summary>Y = X (Identity)  ⇒  dX = dY.</summary>
sealed class IdentityRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.OutputGrad(0)!);
}

/// <summary>Y = cast(X)  ⇒  dX = cast(dY) back to X's element type.</summary>
sealed class CastRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.CastTo(g.OutputGrad(0)!, g.ElemTypeOf(g.Input(0))));
}

/// <summary>Y = X^p  ⇒  dX = dY·p·X^(p−1), dp = unbroadcast(dY·Y·ln X).</summary>
sealed class PowRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string x = g.Input(0), p = g.Input(1), dy = g.OutputGrad(0)!;
        if (g.ElemTypeOf(p) != g.ElemTypeOf(x)) p = g.CastTo(p, g.ElemTypeOf(x));
        if (g.NeedsInputGrad(0))
        {
            var xpm1 = g.Op("Pow", [x, g.Sub(p, g.Scalar(1, x))]);
            g.SetInputGrad(0, g.Unbroadcast(g.Mul(dy, g.Mul(p, xpm1)), x));
        }
        if (g.NeedsInputGrad(1))
            g.SetInputGrad(1, g.Unbroadcast(g.Mul(g.Mul(dy, g.Output(0)), g.Op("Log", [x])), g.Input(1)));
    }
}

/// <summary>Y = √X  ⇒  dX = dY·0.5 / Y.</summary>
sealed class SqrtRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.Div(g.Mul(g.OutputGrad(0)!, g.Scalar(0.5, g.Input(0))), g.Output(0)));
}

/// <summary>Y = 1/X  ⇒  dX = −dY·Y².</summary>
sealed class ReciprocalRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.Neg(g.Mul(g.OutputGrad(0)!, g.Mul(g.Output(0), g.Output(0)))));
}

/// <summary>Y = eˣ  ⇒  dX = dY·Y.</summary>
sealed class ExpRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.Mul(g.OutputGrad(0)!, g.Output(0)));
}

/// <summary>Y = ln X  ⇒  dX = dY / X.</summary>
sealed class LogRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.Div(g.OutputGrad(0)!, g.Input(0)));
}

/// <summary>Where(c, A, B)  ⇒  dA = unbroadcast(where(c, dY, 0)), dB = unbroadcast(where(c, 0, dY)).</summary>
sealed class WhereRule : IGradientRule
{
    public void Build(GradientContext g)
    {
        string c = g.Input(0), dy = g.OutputGrad(0)!, zero = g.Scalar(0, g.Output(0));
        if (g.NeedsInputGrad(1)) g.SetInputGrad(1, g.Unbroadcast(g.Op("Where", [c, dy, zero]), g.Input(1)));
        if (g.NeedsInputGrad(2)) g.SetInputGrad(2, g.Unbroadcast(g.Op("Where", [c, zero, dy]), g.Input(2)));
    }
}

/// <summary>Y = expand(X, shape)  ⇒  dX = unbroadcast(dY).</summary>
sealed class ExpandRule : IGradientRule
{
    public void Build(GradientContext g) => g.SetInputGrad(0, g.Unbroadcast(g.OutputGrad(0)!, g.Input(0)));
}
