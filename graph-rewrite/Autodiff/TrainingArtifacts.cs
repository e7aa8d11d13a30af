using System.Text.Json;
using System.Text.Json.Serialization;
using Google.Protobuf;
using Onnx;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Autodiff;

/// <summary>What the model is trained for.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<TrainingTask>))]
public enum TrainingTask
{
    /// <summary>Causal language modelling on the model's own logits.</summary>
    Lm,
    /// <summary>Sequence classification by a new head on the last non-padding position.</summary>
    Cls,
}

/// <summary>How a classification head is trained.</summary>
public enum HeadMode
{
    /// <summary>The head weight [d, classes] is trained fully (PEFT's modules_to_save).</summary>
    Full,
    /// <summary>The head weight is frozen at its seeded init and gets a LoRA branch (A [d, r], B [r, classes]).</summary>
    Lora,
}

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
    /// accumulation in the same graph; see README.md); when false it outputs each step's gradients alone.
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
public sealed class TrainingArtifacts
{
    public const string SpecFile = "artifacts.json", TrainFile = "train.onnx", EvalFile = "eval.onnx",
                        OptimizerFile = "optimizer.onnx", InitialParamsFile = "initial_params.onnx";
    public const string Labels = "labels", Lengths = "lengths", Loss = "loss", ClassLogits = ClassHead.Output, ResetGrad = "reset_grad";
    public const string HeadWeight = ClassHead.Weight, HeadLoraA = ClassHead.LoraA, HeadLoraB = ClassHead.LoraB;
    public static string GradIn(string p) => p + ".grad.in";

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
        return new Builder(trainingView, manifest, options).Run();
    }

    /// <summary>Writes the four models and artifacts.json into <paramref name="dir"/> (created if needed), each file atomically.</summary>
    public void Save(string dir)
    {
        Directory.CreateDirectory(dir);
        OnnxFile.Save(TrainModel, Path.Combine(dir, TrainFile));
        OnnxFile.Save(EvalModel, Path.Combine(dir, EvalFile));
        OnnxFile.Save(OptimizerModel, Path.Combine(dir, OptimizerFile));
        OnnxFile.Save(InitialParams, Path.Combine(dir, InitialParamsFile));
        AtomicFile.WriteAllText(Path.Combine(dir, SpecFile), JsonSerializer.Serialize(Spec, ArtifactsSpec.Json));
    }

    /// <summary>Reads artifacts.json from an artifacts folder, checking its format tag.</summary>
    public static ArtifactsSpec LoadSpec(string dir)
    {
        var path = Path.Combine(dir, SpecFile);
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file; build the training artifacts first", path);
        ArtifactsSpec? spec;
        try { spec = JsonSerializer.Deserialize<ArtifactsSpec>(File.ReadAllText(path), ArtifactsSpec.Json); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not a valid {SpecFile} ({e.Message})", e); }
        if (spec is null || spec.Format != ArtifactsSpec.CurrentFormat)
            throw new InvalidDataException($"{path}: format '{spec?.Format}' is not '{ArtifactsSpec.CurrentFormat}'; rebuild the artifacts");
        return spec;
    }

    sealed class Builder(ModelProto view, LoraManifest manifest, ArtifactOptions options)
    {
        readonly List<ParamSpec> _params = new();
        readonly Dictionary<string, TensorProto> _initial = new();
        readonly Dictionary<string, (IoRole Role, string? Param, int? Layer)> _roles = new();
        readonly List<TensorProto> _frozenExtras = new();
        // the view's fed inputs (token ids, mask, positions, cache …) by role; the logits output
        readonly ModelRoles _signature = SignatureRoles.Decide(view, options.InputRoles, "the training view");
        string InputIds => options.InputIds ?? _signature.InputIds;
        string Logits => options.Logits ?? _signature.Logits;

        public TrainingArtifacts Run()
        {
            var g = new GraphEditor(view);
            if (!g.IsGraphInput(InputIds)) throw new ArgumentException($"the training view has no input '{InputIds}'; re-run 'onnxlora rewrite'");
            if (!g.IsGraphOutput(Logits)) throw new ArgumentException($"the training view has no output '{Logits}'; re-run 'onnxlora rewrite'");
            foreach (var t in manifest.Targets)
                foreach (var (name, kind) in new[] { (t.LoraA, "lora_a"), (t.LoraB, "lora_b") })
                {
                    if (!g.IsGraphInput(name) || g.Initializer(name) is not { } init)
                        throw new ArgumentException($"'{name}' ({t.Module}) from {LoraManifest.FileName} is not an input with an initializer of the training view; re-run 'onnxlora rewrite'");
                    if (options.FreezeLora) _frozenExtras.Add(init.Clone());   // a constant of the models, still part of the adapter
                    else AddParam(name, kind, t.Module, init.Clone());
                }
            if (options.Task == TrainingTask.Cls) AddHeadParams(g);
            foreach (var io in _signature.Inputs) _roles[io.Name] = (io.Role, null, io.Layer);
            _roles[InputIds] = (IoRole.InputIds, null, null);
            if (manifest.DropoutTrainingModeInput is { } dropout) _roles[dropout] = (IoRole.DropoutTrainingMode, null, null);

            var train = Compose(train: true);
            var eval = Compose(train: false);
            var infos = _params.Select(p => new ParamInfo(p.Name, (int)DataType.Float, p.Shape)).ToList();
            var optimizer = Optimizers.Build(options.Optimizer, infos, options.Beta1, options.Beta2, options.Epsilon);
            foreach (var p in _params)
            {
                _roles[p.Name] = (IoRole.Param, p.Name, null);
                _roles[Optimizers.Grad(p.Name)] = (IoRole.Grad, p.Name, null);
                _roles[Optimizers.Updated(p.Name)] = (IoRole.UpdatedParam, p.Name, null);
                foreach (var m in Optimizers.Moments(options.Optimizer, p.Name)) { _roles[m] = (IoRole.Moment, p.Name, null); _roles[Optimizers.Updated(m)] = (IoRole.UpdatedMoment, p.Name, null); }
            }
            foreach (var (s, role) in new[] { (Optimizers.LearningRate, IoRole.LearningRate), (Optimizers.Step, IoRole.Step), (Optimizers.WeightDecay, IoRole.WeightDecay),
                                              (Optimizers.GradScale, IoRole.GradScale), (Optimizers.MaxGradNorm, IoRole.MaxGradNorm), (Optimizers.GradNorm, IoRole.GradNorm) })
                _roles[s] = (role, null, null);
            var spec = new ArtifactsSpec
            {
                Task = options.Task == TrainingTask.Lm ? "lm" : "cls",
                Classes = options.Task == TrainingTask.Cls ? options.Classes : null,
                HeadMode = options.Task == TrainingTask.Cls ? options.HeadMode.ToString().ToLowerInvariant() : null,
                Pooling = options.Task == TrainingTask.Cls ? options.Pooling.Name() : null,
                Optimizer = options.Optimizer == OptimizerKind.AdamW ? "adamw" : "sgd",
                Beta1 = options.Beta1, Beta2 = options.Beta2, Epsilon = options.Epsilon,
                AccumulateGradients = options.AccumulateGradients,
                Params = _params,
                FrozenExtras = _frozenExtras.Select(t => t.Name).ToList(),
                Train = Describe(train), Eval = Describe(eval), OptimizerModel = Describe(optimizer),
            };
            return new TrainingArtifacts(train, eval, optimizer, InitialParamsModel(), spec);
        }

        void AddParam(string name, string kind, string module, TensorProto init)
        {
            if (init.DataType != (int)DataType.Float)
                throw new NotSupportedException($"trainable '{name}' is {(DataType)init.DataType}; training artifacts keep parameters in float32");
            _params.Add(new ParamSpec { Name = name, Kind = kind, Module = module, Shape = init.Dims.ToArray(), Moments = Optimizers.Moments(options.Optimizer, name) });
            _initial[name] = init;
        }

        // the task head: W [d, classes] trained fully, or frozen W plus A [d, r]·B [r, classes]
        void AddHeadParams(GraphEditor g)
        {
            var (hidden, _) = ClassHead.FindHidden(g, Logits);
            var d = ClassHead.HiddenWidth(view, hidden);
            var w = Tensors.Float(HeadWeight, [d, options.Classes], SeededNormal(d * options.Classes, options.HeadSeed, options.HeadInitStd));
            if (options.HeadMode == HeadMode.Full) { AddParam(HeadWeight, "head", "score", w); return; }
            _frozenExtras.Add(w);
            int r = manifest.Rank;
            var a = LoraInitialValues.A(d, r, LoraInit.Kaiming, manifest.Seed, "score");
            AddParam(HeadLoraA, "head_lora_a", "score", Tensors.FromDoubles(HeadLoraA, DataType.Float, [d, r], a));
            AddParam(HeadLoraB, "head_lora_b", "score", Tensors.Float(HeadLoraB, [r, options.Classes], new float[r * options.Classes]));
        }

        static float[] SeededNormal(long count, int seed, double std)
        {
            var rng = new Random(seed);
            var v = new float[count];
            for (long i = 0; i < count; i++)
            {
                double u1 = 1 - rng.NextDouble(), u2 = rng.NextDouble();
                v[i] = (float)(std * Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2));
            }
            return v;
        }

        ModelProto Compose(bool train)
        {
            var m = view.Clone();
            m.Graph.Output.Clear();
            var g = new GraphEditor(m);
            foreach (var p in _params) g.RemoveInitializer(p.Name);
            foreach (var t in _frozenExtras) if (m.Graph.Input.FirstOrDefault(i => i.Name == t.Name) is { } frozen) m.Graph.Input.Remove(frozen);
            if (train && manifest.DropoutTrainingModeInput is { } dm && g.Initializer(dm) is not null)
            {
                g.RemoveInitializer(dm);
                g.AddInitializer(Tensors.Bool(dm, [], [true]));   // train: dropout on unless fed false
            }
            var inputIdsDims = ValueInfos.Dims(m.Graph.Input.First(i => i.Name == InputIds)) ?? [new Dim(null, "batch"), new Dim(null, "seq")];
            Losses.CrossEntropy ce;
            string logitsOut;
            if (options.Task == TrainingTask.Lm)
            {
                g.AddInput(ValueInfos.Tensor(Labels, DataType.Int64, inputIdsDims));
                _roles[Labels] = (IoRole.Labels, null, null);
                ce = Losses.CausalLm(Losses.Emitter(m, "loss/"), Logits, Labels);
                logitsOut = Logits;
            }
            else
            {
                g.AddInput(ValueInfos.Tensor(Labels, DataType.Int64, inputIdsDims[0]));
                g.AddInput(ValueInfos.Tensor(Lengths, DataType.Int64, inputIdsDims[0]));
                _roles[Labels] = (IoRole.Labels, null, null); _roles[Lengths] = (IoRole.Lengths, null, null);
                AddClassHead(m, g, inputIdsDims[0]);
                ce = Losses.Classification(Losses.Emitter(m, "loss/"), ClassLogits, Labels);
                logitsOut = ClassLogits;
            }
            var editor = new GraphEditor(m);
            editor.AddNode("Identity", [ce.Loss], [Loss], Loss);
            editor.AddOutput(ValueInfos.Tensor(Loss, DataType.Float));
            _roles[Loss] = (IoRole.Loss, null, null);
            var logitsDims = ShapeInference.Infer(m).GetValueOrDefault(logitsOut)?.Dims;
            if (!train || options.Task == TrainingTask.Cls)
            {
                editor.AddOutput(ValueInfos.Tensor(logitsOut, (int)DataType.Float, logitsDims));
                _roles[logitsOut] = (IoRole.Logits, null, null);
            }
            // LoRA parameters are inputs of the view already; a head's parameters are new
            foreach (var p in _params.Where(p => !editor.IsGraphInput(p.Name)))
                editor.AddInput(ValueInfos.Tensor(p.Name, DataType.Float, p.Shape.Select(d => new Dim(d)).ToArray()));
            if (train) AddBackward(m, ce);
            var final = new GraphEditor(m);
            final.RemoveDeadNodes();
            final.SortTopologically();
            m.Graph.Name = train ? "train_step" : "eval_step";
            return m;
        }

        void AddBackward(ModelProto m, Losses.CrossEntropy ce)
        {
            var e = Losses.Emitter(m, "loss_grad/");
            var dz = Losses.LogitsGradient(e, ce);
            var grads = GradientBuilder.Build(m, new Dictionary<string, string> { [ce.Logits] = dz }, _params.Select(p => p.Name).ToList());
            var g = new GraphEditor(m);
            if (options.AccumulateGradients)
            {
                g.AddInput(ValueInfos.Tensor(ResetGrad, DataType.Bool));
                _roles[ResetGrad] = (IoRole.ResetGrad, null, null);
            }
            foreach (var p in _params)
            {
                var dims = p.Shape.Select(d => new Dim(d)).ToArray();
                var grad = grads[p.Name];
                if (options.AccumulateGradients)
                {
                    g.AddInput(ValueInfos.Tensor(GradIn(p.Name), DataType.Float, dims));
                    _roles[GradIn(p.Name)] = (IoRole.GradIn, p.Name, null);
                    grad = g.Op("Where", [ResetGrad, grad, g.Op("Add", [grad, GradIn(p.Name)], "grad/accumulate")], "grad/accumulate");
                }
                g.AddNode("Identity", [grad], [Optimizers.Grad(p.Name)], Optimizers.Grad(p.Name));
                g.AddOutput(ValueInfos.Tensor(Optimizers.Grad(p.Name), DataType.Float, dims));
            }
        }

        // class_logits [batch, classes] from the pooled hidden state; the mask of real tokens comes from lengths (right padding)
        void AddClassHead(ModelProto m, GraphEditor g, Dim batch)
        {
            var (hidden, _) = ClassHead.FindHidden(g, Logits);
            var seqLen = g.Op("Gather", [g.Op("Shape", [InputIds], "head/ids_shape"), g.AddConstant("head/one", Tensors.Int64("", [], [1]))], "head/seq");
            var positions = g.Op("Range", [g.AddConstant("head/zero", Tensors.Int64("", [], [0])), seqLen, g.AddConstant("head/step", Tensors.Int64("", [], [1]))], "head/positions");
            var row = g.Op("Unsqueeze", [positions, g.AddConstant("head/axis0", Tensors.Int64Vector("", 0))], "head/pos2");   // [1, seq]
            var lengths = g.Op("Unsqueeze", [Lengths, g.AddConstant("head/axis1", Tensors.Int64Vector("", 1))], "head/lengths2");   // [batch, 1]
            var mask = g.Op("Cast", [g.Op("Less", [row, lengths], "head/is_real")], "head/mask", attributes: Attr.Int("to", (int)DataType.Float));
            var lastHidden = ClassHead.Pool(m, g, hidden, InputIds, mask, options.Pooling);
            string logits;
            if (options.HeadMode == HeadMode.Full) logits = g.Op("MatMul", [lastHidden, HeadWeight], "head/logits");
            else
            {
                g.AddInitializer(_frozenExtras.First(t => t.Name == HeadWeight).Clone());
                var scale = LoraManifest.ScaleFor(manifest.Scaling, manifest.Alpha, manifest.Rank);
                var branch = g.Op("MatMul", [g.Op("MatMul", [lastHidden, HeadLoraA], "head/lora_h"), HeadLoraB], "head/lora");
                if (scale != 1) branch = g.Op("Mul", [branch, g.AddConstant("head/lora_scale", Tensors.Scalar("", DataType.Float, scale))], "head/lora_scaled");
                logits = g.Op("Add", [g.Op("MatMul", [lastHidden, HeadWeight], "head/base"), branch], "head/logits");
            }
            g.AddNode("Identity", [logits], [ClassLogits], ClassLogits);
            m.Graph.ValueInfo.Add(ValueInfos.Tensor(ClassLogits, DataType.Float, batch, new Dim(options.Classes)));
        }

        ModelProto InitialParamsModel()
        {
            var m = new ModelProto { IrVersion = 8, ProducerName = "onnxlora", Graph = new GraphProto { Name = "initial_params" } };
            m.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
            var g = new GraphEditor(m);
            foreach (var t in _params.Select(p => _initial[p.Name]).Concat(_frozenExtras))
            {
                var init = t.Clone(); init.Name = t.Name + ".init";
                g.AddInitializer(init);
                g.AddNode("Identity", [init.Name], [t.Name], t.Name);
                g.AddOutput(ValueInfos.Tensor(t.Name, t.DataType, t.Dims.Select(d => new Dim(d)).ToArray()));
            }
            return m;
        }

        ModelSpec Describe(ModelProto m) => new()
        {
            Inputs = m.Graph.Input.Select(Io).ToList(),
            Outputs = m.Graph.Output.Select(Io).ToList(),
        };

        IoSpec Io(ValueInfoProto v)
        {
            var (role, param, layer) = _roles.TryGetValue(v.Name, out var r) ? r
                : throw new InvalidOperationException($"artifact input or output '{v.Name}' has no role");
            return new IoSpec
            {
                Name = v.Name, Role = role, Param = param, Layer = layer,
                ElemType = ((DataType)ValueInfos.ElemType(v)).ToString().ToLowerInvariant(),
                Shape = ValueInfos.Dims(v)?.Select(d => d.ToString()).ToList(),
            };
        }
    }
}

/// <summary>
/// artifacts.json: the contract between the artifact builder and the training session. Every input and output of
/// the three models is listed with its role; see graph-rewrite/Autodiff/README.md for the roles.
/// </summary>
public sealed record ArtifactsSpec
{
    public const string CurrentFormat = "onnxlora.artifacts/1";
    public string Format { get; init; } = CurrentFormat;
    /// <summary>"lm" or "cls".</summary>
    public required string Task { get; init; }
    public int? Classes { get; init; }
    /// <summary>"full" or "lora" (cls only).</summary>
    public string? HeadMode { get; init; }
    /// <summary>"last", "first" or "mean" (cls only): which hidden state the head reads.</summary>
    public string? Pooling { get; init; }
    /// <summary>"adamw" or "sgd".</summary>
    public required string Optimizer { get; init; }
    public double Beta1 { get; init; }
    public double Beta2 { get; init; }
    public double Epsilon { get; init; }
    public bool AccumulateGradients { get; init; }
    public Dictionary<string, string> Files { get; init; } = new()
    {
        ["train"] = TrainingArtifacts.TrainFile, ["eval"] = TrainingArtifacts.EvalFile,
        ["optimizer"] = TrainingArtifacts.OptimizerFile, ["initial_params"] = TrainingArtifacts.InitialParamsFile,
    };
    /// <summary>Trainable tensors, in the order the models list them.</summary>
    public required IReadOnlyList<ParamSpec> Params { get; init; }
    /// <summary>Frozen tensors that belong to the adapter (a LoRA-adapted head's seeded weight), values in initial_params.onnx.</summary>
    public IReadOnlyList<string> FrozenExtras { get; init; } = [];
    public required ModelSpec Train { get; init; }
    public required ModelSpec Eval { get; init; }
    [JsonPropertyName("optimizer_model")]
    public required ModelSpec OptimizerModel { get; init; }

    internal static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    };
}

/// <summary>One trainable tensor: kind is lora_a, lora_b, head, head_lora_a or head_lora_b.</summary>
public sealed record ParamSpec
{
    public required string Name { get; init; }
    public required string Kind { get; init; }
    public required string Module { get; init; }
    public required long[] Shape { get; init; }
    /// <summary>Optimizer state tensor names (exp_avg, exp_avg_sq for AdamW).</summary>
    public required IReadOnlyList<string> Moments { get; init; }
}

/// <summary>Inputs and outputs of one model.</summary>
public sealed record ModelSpec
{
    public required IReadOnlyList<IoSpec> Inputs { get; init; }
    public required IReadOnlyList<IoSpec> Outputs { get; init; }
}

/// <summary>One input or output: its name, role, the parameter it belongs to (or a cache input's layer), element type and dims (numbers or symbols).</summary>
public sealed record IoSpec
{
    public required string Name { get; init; }
    public required IoRole Role { get; init; }
    public string? Param { get; init; }
    /// <summary>The layer of a past (KV-cache) input.</summary>
    public int? Layer { get; init; }
    public required string ElemType { get; init; }
    public IReadOnlyList<string>? Shape { get; init; }

    /// <summary>This entry as the signature readers take it (element type and dims parsed back).</summary>
    public SignatureEntry ToEntry() => new(Name, Role, Layer, Enum.Parse<DataType>(ElemType, ignoreCase: true),
        Shape?.Select(d => long.TryParse(d, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var v) ? new Dim(v) : new Dim(null, d)).ToList());
}
