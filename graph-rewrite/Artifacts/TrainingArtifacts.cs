using System.Text.Json;
using Onnx;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Signature;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Artifacts;

/// <summary>Options of <see cref="TrainingArtifacts.Build"/>.</summary>
public sealed record ArtifactOptions
{
    public TrainingTask Task { get; init; } = TrainingTask.Lm;
    /// <summary>Number of classes for <see cref="TrainingTask.Cls"/> (≥ 2).</summary>
    public int Classes { get; init; }
    public HeadMode HeadMode { get; init; } = HeadMode.Full;
    /// <summary>Which hidden state the classification head reads.</summary>
    public Pooling Pooling { get; init; } = Pooling.Last;
    /// <summary>Keeps the LoRA factors at their initial values (B = 0: the frozen base) and trains the head alone: the baseline of a LoRA run.</summary>
    public bool FreezeLora { get; init; }
    public OptimizerKind Optimizer { get; init; } = OptimizerKind.AdamW;
    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.999;
    public double Epsilon { get; init; } = 1e-8;
    /// <summary>
    /// When true the train model adds its gradients to <c>p.grad.in</c> unless <c>reset_grad</c> is true (micro-batch
    /// accumulation in the same graph; see <see cref="BackwardPass"/>); when false it outputs each step's gradients alone.
    /// </summary>
    public bool AccumulateGradients { get; init; } = true;
    /// <summary>Seed of the classification head's initial weight (normal, std <see cref="HeadInitStd"/>).</summary>
    public int HeadSeed { get; init; }
    /// <summary>Standard deviation of the head's initial weight; 0 starts it at zero.</summary>
    public double HeadInitStd { get; init; } = 0.02;
    /// <summary>The token input of the training view; null = the input whose role is input_ids.</summary>
    public string? InputIds { get; init; }
    /// <summary>The logits output of the training view; null = the output whose role is logits.</summary>
    public string? Logits { get; init; }
    /// <summary>Roles the user gives inputs the names do not tell (<c>--input-role</c>); the view's metadata may hold more.</summary>
    public IReadOnlyDictionary<string, RoleOverride>? InputRoles { get; init; }
}

/// <summary>
/// Training artifacts built from a LoRA training view (see <see cref="InjectLora"/>): the train model (forward, loss,
/// backward; outputs the loss and gradients), the eval model (loss and logits, no backward), the optimizer model
/// (<see cref="Optimizers"/>) and the trainable parameters' initial values. <see cref="Save"/> writes them with an
/// artifacts.json (<see cref="ArtifactsSpec"/>) that names every input and output and its role.
/// </summary>
/// <remarks>
/// The build reads as its steps: choose what trains (<see cref="Trainables"/>: the manifest's LoRA factors, the task's
/// head), then per model the forward view with the parameters as inputs, the task's loss (for cls after the
/// <see cref="ClassHead"/>), the <see cref="BackwardPass"/> (train only), and last the spec, whose roles
/// <see cref="SpecWriter"/> derives from the built models.
/// </remarks>
public sealed class TrainingArtifacts
{
    public const string Labels = "labels", Lengths = "lengths", Loss = "loss", ClassLogits = ClassHead.Output, ResetGrad = BackwardPass.ResetGrad;
    public const string HeadWeight = ClassHead.Weight, HeadLoraA = ClassHead.LoraA, HeadLoraB = ClassHead.LoraB;
    public static string GradIn(string p) => BackwardPass.GradIn(p);

    TrainingArtifacts(ModelProto train, ModelProto eval, ModelProto optimizer, ModelProto initialParams, ArtifactsSpec spec)
    {
        TrainModel = train; EvalModel = eval; OptimizerModel = optimizer; InitialParams = initialParams; Spec = spec;
    }

    public ModelProto TrainModel { get; }
    public ModelProto EvalModel { get; }
    public ModelProto OptimizerModel { get; }
    /// <summary>A model with no inputs whose outputs are the trainable parameters' initial values (and frozen head weights).</summary>
    public ModelProto InitialParams { get; }
    public ArtifactsSpec Spec { get; }

    /// <summary>Builds the artifacts. <paramref name="trainingView"/> is not changed.</summary>
    public static TrainingArtifacts Build(ModelProto trainingView, LoraManifest manifest, ArtifactOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(trainingView);
        ArgumentNullException.ThrowIfNull(manifest);
        options ??= new ArtifactOptions();
        if (options.Task == TrainingTask.Cls && options.Classes < 2)
            throw new ArgumentException($"{nameof(ArtifactOptions.Classes)} must be ≥ 2 for the classification task, got {options.Classes}", nameof(options));
        var signature = SignatureRoles.Decide(trainingView, options.InputRoles, "the training view");
        var io = new ViewIo(options.InputIds ?? signature.InputIds, options.Logits ?? signature.Logits, manifest.DropoutTrainingModeInput);
        var view = new GraphEditor(trainingView);
        if (!view.IsGraphInput(io.InputIds)) throw new ArgumentException($"the training view has no input '{io.InputIds}'; re-run 'onnxlora rewrite'");
        if (!view.IsGraphOutput(io.Logits)) throw new ArgumentException($"the training view has no output '{io.Logits}'; re-run 'onnxlora rewrite'");

        var trainables = Trainables.Choose(view, manifest, options, io.Logits);
        var composer = new Composer(trainingView, manifest, options, io, trainables);
        var train = composer.Compose(train: true);
        var eval = composer.Compose(train: false);
        var optimizer = Optimizers.Build(options.Optimizer, trainables.Params.Select(p => p.Info).ToList(), options.Beta1, options.Beta2, options.Epsilon);
        var spec = new SpecWriter(options, trainables, signature, io).Write(train, eval, optimizer);
        return new TrainingArtifacts(train, eval, optimizer, trainables.InitialValuesModel(), spec);
    }

    /// <summary>Writes the four models and artifacts.json into <paramref name="dir"/> (created if needed), each file atomically.</summary>
    public void Save(string dir)
    {
        Directory.CreateDirectory(dir);
        OnnxFile.Save(TrainModel, Path.Combine(dir, RunLayout.TrainModel));
        OnnxFile.Save(EvalModel, Path.Combine(dir, RunLayout.EvalModel));
        OnnxFile.Save(OptimizerModel, Path.Combine(dir, RunLayout.OptimizerModel));
        OnnxFile.Save(InitialParams, Path.Combine(dir, RunLayout.InitialParams));
        AtomicFile.WriteAllText(Path.Combine(dir, RunLayout.ArtifactsSpec), JsonSerializer.Serialize(Spec, ArtifactsSpec.Json));
    }

    /// <summary>Reads artifacts.json from an artifacts folder, checking its format tag.</summary>
    public static ArtifactsSpec LoadSpec(string dir)
    {
        var path = Path.Combine(dir, RunLayout.ArtifactsSpec);
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file; build the training artifacts first", path);
        ArtifactsSpec? spec;
        try { spec = JsonSerializer.Deserialize<ArtifactsSpec>(File.ReadAllText(path), ArtifactsSpec.Json); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not a valid {RunLayout.ArtifactsSpec} ({e.Message})", e); }
        if (spec is null || spec.Format != ArtifactsSpec.CurrentFormat)
            throw new InvalidDataException($"{path}: format '{spec?.Format}' is not '{ArtifactsSpec.CurrentFormat}'; rebuild the artifacts");
        // the enum converters also take numbers; only the names are the contract
        if (!Enum.IsDefined(spec.Task) || !Enum.IsDefined(spec.Optimizer) || (spec.HeadMode is { } h && !Enum.IsDefined(h)) || (spec.Pooling is { } p && !Enum.IsDefined(p)))
            throw new InvalidDataException($"{path}: task, optimizer, head_mode or pooling is not one of its names ({spec.Task}, {spec.Optimizer}, {spec.HeadMode}, {spec.Pooling}); rebuild the artifacts");
        return spec;
    }

    /// <summary>The training view's token input, logits output and (with LoRA dropout) its training-mode input.</summary>
    internal sealed record ViewIo(string InputIds, string Logits, string? DropoutTrainingMode);

    /// <summary>One train or eval model: forward view → task loss → outputs → backward (train only).</summary>
    sealed class Composer(ModelProto view, LoraManifest manifest, ArtifactOptions options, ViewIo io, Trainables trainables)
    {
        public ModelProto Compose(bool train)
        {
            var m = view.Clone();
            m.Graph.Output.Clear();
            var g = new GraphEditor(m);
            Forward(m, g, train);
            var inputIdsDims = ValueInfos.Dims(m.Graph.Input.First(i => i.Name == io.InputIds)) ?? [new Dim(null, "batch"), new Dim(null, "seq")];
            var (loss, logits) = options.Task == TrainingTask.Lm ? LmLoss(m, g, inputIdsDims) : ClsLoss(m, g, inputIdsDims[0]);
            var editor = new GraphEditor(m);
            editor.AddNode("Identity", [loss.Loss], [Loss], Loss);
            editor.AddOutput(ValueInfos.Tensor(Loss, DataType.Float));
            // the train model of an LM leaves out the vocabulary-sized logits: nothing reads them during training
            if (!train || options.Task == TrainingTask.Cls)
                editor.AddOutput(ValueInfos.Tensor(logits, (int)DataType.Float, ShapeInference.Infer(m).GetValueOrDefault(logits)?.Dims));
            // LoRA parameters are inputs of the view already; a head's parameters are new
            foreach (var p in trainables.Params.Where(p => !editor.IsGraphInput(p.Name)))
                editor.AddInput(ValueInfos.Tensor(p.Name, DataType.Float, p.Shape.Select(d => new Dim(d)).ToArray()));
            if (train) BackwardPass.Add(m, loss, trainables.Params.Select(p => p.Info).ToList(), options.AccumulateGradients);
            var final = new GraphEditor(m);
            final.RemoveDeadNodes();
            final.SortTopologically();
            m.Graph.Name = train ? "train_step" : "eval_step";
            return m;
        }

        // parameters become plain inputs (no initializers); frozen tensors stay initializers (ORT pre-packs them)
        void Forward(ModelProto m, GraphEditor g, bool train)
        {
            foreach (var p in trainables.Params) g.RemoveInitializer(p.Name);
            foreach (var t in trainables.Frozen) if (m.Graph.Input.FirstOrDefault(i => i.Name == t.Name) is { } frozen) m.Graph.Input.Remove(frozen);
            if (train && io.DropoutTrainingMode is { } dm && g.Initializer(dm) is not null)
            {
                g.RemoveInitializer(dm);
                g.AddInitializer(Tensors.Bool(dm, [], [true]));   // train: dropout on unless fed false
            }
        }

        // lm: labels [batch, seq] are the ids themselves; the loss shifts them (position t predicts labels[t+1])
        (Losses.CrossEntropy, string Logits) LmLoss(ModelProto m, GraphEditor g, Dim[] inputIdsDims)
        {
            g.AddInput(ValueInfos.Tensor(Labels, DataType.Int64, inputIdsDims));
            return (Losses.CausalLm(Losses.Emitter(m, "loss/"), io.Logits, Labels), io.Logits);
        }

        // cls: one label and one length per row; the head's class logits from the hidden state under the LM head
        (Losses.CrossEntropy, string Logits) ClsLoss(ModelProto m, GraphEditor g, Dim batch)
        {
            g.AddInput(ValueInfos.Tensor(Labels, DataType.Int64, batch));
            g.AddInput(ValueInfos.Tensor(Lengths, DataType.Int64, batch));
            var lora = options.HeadMode == HeadMode.Lora
                ? new ClassHead.LoraBranch(trainables.Frozen.First(t => t.Name == HeadWeight), LoraManifest.ScaleFor(manifest.Scaling, manifest.Alpha, manifest.Rank))
                : null;
            ClassHead.AddTrainingHead(m, g, io.Logits, io.InputIds, Lengths, batch, options.Classes, options.Pooling, lora);
            return (Losses.Classification(Losses.Emitter(m, "loss/"), ClassLogits, Labels), ClassLogits);
        }
    }
}
