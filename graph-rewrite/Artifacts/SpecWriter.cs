using Onnx;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Artifacts;

/// <summary>
/// artifacts.json from the built models: every input and output of the train, eval and optimizer models gets its role
/// from what its name is (a parameter or one of its gradients and moments, an optimizer scalar, a name of the
/// artifacts, or a fed input of the training view); a name that is none of these is a bug of the builder.
/// </summary>
internal sealed class SpecWriter(ArtifactOptions options, Trainables trainables, ModelRoles view, TrainingArtifacts.ViewIo io)
{
    static readonly Dictionary<string, IoRole> OptimizerScalars = new()
    {
        [Optimizers.LearningRate] = IoRole.LearningRate, [Optimizers.Step] = IoRole.Step, [Optimizers.WeightDecay] = IoRole.WeightDecay,
        [Optimizers.GradScale] = IoRole.GradScale, [Optimizers.MaxGradNorm] = IoRole.MaxGradNorm, [Optimizers.GradNorm] = IoRole.GradNorm,
    };

    readonly Dictionary<string, (IoRole Role, string Param)> _perParam = PerParam(trainables, options.AccumulateGradients);

    public ArtifactsSpec Write(ModelProto train, ModelProto eval, ModelProto optimizer)
    {
        bool cls = options.Task == TrainingTask.Cls;
        return new ArtifactsSpec
        {
            Task = options.Task,
            Classes = cls ? options.Classes : null,
            HeadMode = cls ? options.HeadMode : null,
            Pooling = cls ? options.Pooling : null,
            Optimizer = options.Optimizer,
            Beta1 = options.Beta1, Beta2 = options.Beta2, Epsilon = options.Epsilon,
            AccumulateGradients = options.AccumulateGradients,
            Params = trainables.Params.Select(p => p.Spec).ToList(),
            FrozenExtras = trainables.Frozen.Select(t => t.Name).ToList(),
            Train = Describe(train), Eval = Describe(eval), OptimizerModel = Describe(optimizer),
        };
    }

    // each parameter's own names: itself, its gradient (and running sum), its update, its moments and their updates
    static Dictionary<string, (IoRole, string)> PerParam(Trainables trainables, bool accumulate)
    {
        var roles = new Dictionary<string, (IoRole, string)>();
        foreach (var p in trainables.Params)
        {
            roles[p.Name] = (IoRole.Param, p.Name);
            roles[Optimizers.Grad(p.Name)] = (IoRole.Grad, p.Name);
            if (accumulate) roles[BackwardPass.GradIn(p.Name)] = (IoRole.GradIn, p.Name);
            roles[Optimizers.Updated(p.Name)] = (IoRole.UpdatedParam, p.Name);
            foreach (var m in p.Spec.Moments) { roles[m] = (IoRole.Moment, p.Name); roles[Optimizers.Updated(m)] = (IoRole.UpdatedMoment, p.Name); }
        }
        return roles;
    }

    (IoRole Role, string? Param, int? Layer) RoleOf(string name, bool isOutput)
    {
        if (_perParam.TryGetValue(name, out var own)) return (own.Role, own.Param, null);
        if (OptimizerScalars.TryGetValue(name, out var scalar)) return (scalar, null, null);
        bool cls = options.Task == TrainingTask.Cls;
        if (name == BackwardPass.ResetGrad && options.AccumulateGradients) return (IoRole.ResetGrad, null, null);
        if (name == TrainingArtifacts.Loss) return (IoRole.Loss, null, null);
        if (isOutput && name == (cls ? TrainingArtifacts.ClassLogits : io.Logits)) return (IoRole.Logits, null, null);
        if (name == TrainingArtifacts.Labels) return (IoRole.Labels, null, null);
        if (cls && name == TrainingArtifacts.Lengths) return (IoRole.Lengths, null, null);
        if (name == io.DropoutTrainingMode) return (IoRole.DropoutTrainingMode, null, null);
        if (name == io.InputIds) return (IoRole.InputIds, null, null);
        if (view.Inputs.FirstOrDefault(i => i.Name == name) is { } fed) return (fed.Role, null, fed.Layer);
        throw new InvalidOperationException($"artifact {(isOutput ? "output" : "input")} '{name}' has no role");
    }

    ModelSpec Describe(ModelProto m) => new()
    {
        Inputs = m.Graph.Input.Select(v => Io(v, isOutput: false)).ToList(),
        Outputs = m.Graph.Output.Select(v => Io(v, isOutput: true)).ToList(),
    };

    IoSpec Io(ValueInfoProto v, bool isOutput)
    {
        var (role, param, layer) = RoleOf(v.Name, isOutput);
        return new IoSpec
        {
            Name = v.Name, Role = role, Param = param, Layer = layer,
            ElemType = ((DataType)ValueInfos.ElemType(v)).ToString().ToLowerInvariant(),
            Shape = ValueInfos.Dims(v)?.Select(d => d.ToString()).ToList(),
        };
    }
}
