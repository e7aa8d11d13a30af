using Onnx;
using OnnxLora.GraphRewrite.Autodiff.Rules;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.GraphRewrite.Autodiff;

/// <summary>
/// Every op the backward pass knows, alphabetically, one line each: a rule, <see cref="NoGradient"/> (shape and
/// index computation, comparisons: nothing flows back) or <see cref="NotDifferentiable"/> (an error if a parameter
/// needs a gradient through it). An op with no entry fails with its node and the path from the loss.
/// </summary>
public static class GradientRegistry
{
    /// <summary>The op carries no gradient (its outputs are indices, shapes or booleans).</summary>
    public static IGradientRule NoGradient { get; } = new NoGradientRule();
    /// <summary>A parameter must not need a gradient through this op.</summary>
    public static IGradientRule NotDifferentiable { get; } = new NotDifferentiableRule();

    // (declared after NoGradient/NotDifferentiable: static fields initialize in text order)
    static readonly Dictionary<string, IGradientRule> Rules = new()
    {
        ["Add"] = new AddRule(),
        ["And"] = NoGradient,
        ["ArgMax"] = NoGradient,
        ["ArgMin"] = NoGradient,
        ["Cast"] = new CastRule(),
        ["Ceil"] = NoGradient,
        ["Concat"] = new ConcatRule(),
        ["Constant"] = NoGradient,
        ["Cos"] = new CosRule(),
        ["ConstantOfShape"] = NoGradient,
        ["Div"] = new DivRule(),
        ["Dropout"] = new DropoutRule(),
        ["Equal"] = NoGradient,
        ["Erf"] = new ErfRule(),
        ["Exp"] = new ExpRule(),
        ["Expand"] = new ExpandRule(),
        ["EyeLike"] = NoGradient,
        ["Flatten"] = new ReshapeLikeInputRule(),
        ["Floor"] = NoGradient,
        ["Gather"] = new GatherRule(),
        ["Gelu"] = new GeluRule(),
        ["Gemm"] = new GemmRule(),
        ["Greater"] = NoGradient,
        ["GreaterOrEqual"] = NoGradient,
        ["Identity"] = new IdentityRule(),
        ["If"] = NotDifferentiable,
        ["IsInf"] = NoGradient,
        ["IsNaN"] = NoGradient,
        ["LayerNormalization"] = new LayerNormalizationRule(),
        ["Less"] = NoGradient,
        ["LessOrEqual"] = NoGradient,
        ["Log"] = new LogRule(),
        ["LogSoftmax"] = new LogSoftmaxRule(),
        ["Loop"] = NotDifferentiable,
        ["MatMul"] = new MatMulRule(),
        ["Max"] = new MaxMinRule(max: true),
        ["Min"] = new MaxMinRule(max: false),
        ["Mod"] = NotDifferentiable,
        ["Mul"] = new MulRule(),
        ["Neg"] = new NegRule(),
        ["NonZero"] = NoGradient,
        ["Not"] = NoGradient,
        ["OneHot"] = NoGradient,
        ["Or"] = NoGradient,
        ["Pow"] = new PowRule(),
        ["RandomNormal"] = NoGradient,
        ["RandomNormalLike"] = NoGradient,
        ["RandomUniform"] = NoGradient,
        ["RandomUniformLike"] = NoGradient,
        ["Range"] = NoGradient,
        ["Reciprocal"] = new ReciprocalRule(),
        ["ReduceMean"] = new ReduceRule(mean: true),
        ["ReduceSum"] = new ReduceRule(mean: false),
        ["Relu"] = new ReluRule(),
        ["Reshape"] = new ReshapeLikeInputRule(),
        ["Round"] = NoGradient,
        ["Scan"] = NotDifferentiable,
        ["Shape"] = NoGradient,
        ["Sigmoid"] = new SigmoidRule(),
        ["Sign"] = NoGradient,
        ["Sin"] = new SinRule(),
        ["Size"] = NoGradient,
        ["Slice"] = new SliceRule(),
        ["Softmax"] = new SoftmaxRule(),
        ["Split"] = new SplitRule(),
        ["Sqrt"] = new SqrtRule(),
        ["Squeeze"] = new ReshapeLikeInputRule(),
        ["Sub"] = new SubRule(),
        ["Sum"] = new SumRule(),
        ["Tanh"] = new TanhRule(),
        ["Transpose"] = new TransposeRule(),
        ["Trilu"] = NoGradient,
        ["Unsqueeze"] = new ReshapeLikeInputRule(),
        ["Where"] = new WhereRule(),
        ["Xor"] = NoGradient,
        ["com.microsoft.FusedMatMul"] = new FusedMatMulRule(),
        ["com.microsoft.Gelu"] = new GeluRule(),
        ["com.microsoft.FastGelu"] = new FastGeluRule(),
    };

    /// <summary>The entry for a node's op, or null when none is registered.</summary>
    public static IGradientRule? Find(NodeProto node) => Rules.GetValueOrDefault(NodeAttributes.OpKey(node.Domain, node.OpType));

    /// <summary>True when the op has an entry (a rule, no-gradient or not-differentiable).</summary>
    public static bool IsRegistered(string domain, string opType) => Rules.ContainsKey(NodeAttributes.OpKey(domain, opType));

    /// <summary>Registered op keys ("Op" or "domain.Op").</summary>
    public static IEnumerable<string> Ops => Rules.Keys;

    sealed class NoGradientRule : IGradientRule
    {
        public void Build(GradientContext g) { }
    }

    sealed class NotDifferentiableRule : IGradientRule
    {
        public void Build(GradientContext g) =>
            throw new GradientException($"{g.Node.Describe()} is not differentiable, but a parameter that requires grad lies behind it; freeze that parameter");
    }
}
