using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Runtime;

namespace OnnxLora.Pipeline.Training;

/// <summary>
/// An ONNX Runtime training session over the artifacts that <see cref="TrainingArtifacts"/> writes, shaped like ORT's
/// on-device training API: <see cref="TrainStep"/>, <see cref="EvalStep"/>, <see cref="OptimizerStep"/>,
/// <see cref="LazyResetGrad"/>, <see cref="SetLearningRate"/>, and parameter export.
/// <para>
/// Ownership: the session owns three InferenceSessions (train, eval, optimizer) and every OrtValue that holds a
/// parameter, gradient or moment. Those values live in the execution device's memory for the session's whole life;
/// each step binds them with IOBinding and writes results into a second, preallocated set that is then swapped in,
/// so per step only the batch goes in and the loss (and class logits) come back to the host. Dispose the session to
/// free them all. Not thread-safe: one training loop drives one session.
/// </para>
/// </summary>
public sealed class TrainingSession : IDisposable
{
    readonly ArtifactsSpec _spec;
    readonly ExecutionDevice _device;
    readonly SessionOptions _options;
    readonly InferenceSession _train, _optimizer;
    readonly OrtIoBinding _trainBinding, _optimizerBinding;
    // the eval session holds its own copy of the frozen weights (~0.5 GB for GPT-2 124M): opened at the first EvalStep
    readonly string _evalPath;
    InferenceSession? _eval;
    OrtIoBinding? _evalBinding;
    readonly RunOptions _run = new();
    readonly DeviceBuffers _buffers;
    readonly OrtMemoryInfo _host = OrtMemoryInfo.DefaultInstance;
    readonly HashSet<string> _logitsOutputs;
    bool _resetGrad = true;
    int _microBatches;

    TrainingSession(string dir, ArtifactsSpec spec, ExecutionDevice device, int threads, Action<SessionOptions>? configure)
    {
        _spec = spec;
        _device = device;
        _logitsOutputs = spec.Train.Outputs.Concat(spec.Eval.Outputs).Where(o => o.Role == IoRole.Logits).Select(o => o.Name).ToHashSet();
        _options = device.CreateSessionOptions(threads);
        // No memory pattern: after the first step ORT would plan one block for all of a step's activations on top of
        // what its arena already holds; for GPT-2 124M (batch 8 × 120) that raised the peak from 4.4 GB to 7.3 GB at
        // no measurable speed gain (docs/BENCHMARKS.md).
        _options.EnableMemoryPattern = false;
        // No weight prepacking: MLAS would keep a packed copy of every frozen weight beside the original. Off, GPT-2 124M
        // LoRA peaks ~0.5 GB lower (2.46 → 1.98 GB cls, 3.5 → 3.0 GB lm) for 0–6 % step time (docs/BENCHMARKS.md).
        _options.AddSessionConfigEntry("session.disable_prepacking", "1");
        try
        {
            configure?.Invoke(_options);
            try
            {
                _train = new InferenceSession(Path.Combine(dir, spec.Files["train"]), _options);
                _evalPath = Path.Combine(dir, spec.Files["eval"]);
                if (!File.Exists(_evalPath)) throw new FileNotFoundException($"{_evalPath}: missing; rebuild the training artifacts", _evalPath);
                _optimizer = new InferenceSession(Path.Combine(dir, spec.Files["optimizer"]), _options);
            }
            catch (OnnxRuntimeException e)
            {
                throw new InvalidDataException($"{dir}: ONNX Runtime cannot load the training artifacts ({e.Message}); rebuild them", e);
            }
            _trainBinding = _train.CreateIoBinding();
            _optimizerBinding = _optimizer.CreateIoBinding();
            _buffers = new DeviceBuffers(spec, device, _train);
            var initial = OnnxFile.Load(Path.Combine(dir, spec.Files["initial_params"]));
            foreach (var t in initial.Graph.Initializer)
            {
                var name = t.Name.EndsWith(".init", StringComparison.Ordinal) ? t.Name[..^5] : t.Name;
                if (_buffers.Has(name)) _buffers.Upload(name, Tensors.ToFloats(t));
            }
        }
        catch
        {
            Dispose();   // a later file that fails to load must not leak the sessions opened before it
            throw;
        }
    }

    /// <summary>
    /// Opens the artifacts in <paramref name="artifactsDir"/> on <paramref name="device"/> (threads 0 = all cores).
    /// <paramref name="configure"/>, if given, adjusts the session options of all three sessions before they load
    /// (profiling, session config entries; used by <c>onnxlora bench</c>).
    /// </summary>
    public static TrainingSession Create(string artifactsDir, ExecutionDevice device, int threads = 0, Action<SessionOptions>? configure = null) =>
        new(artifactsDir, TrainingArtifacts.LoadSpec(artifactsDir), device, threads, configure);

    public ArtifactsSpec Spec => _spec;
    public ExecutionDevice Device => _device;
    public double LearningRate { get; private set; } = 1e-3;
    public double WeightDecay { get; set; }
    /// <summary>Global-norm clipping threshold; +∞ turns clipping off.</summary>
    public double MaxGradNorm { get; set; } = double.PositiveInfinity;
    /// <summary>Optimizer steps taken (AdamW's bias correction counts them).</summary>
    public int Step { get; set; }
    /// <summary>
    /// Runs of the train graph so far: the state of its Dropout nodes, whose generators ONNX Runtime keeps inside the
    /// kernels (seeded by each node's seed attribute; the CPU kernel draws one seed per run).
    /// </summary>
    public ulong TrainRuns { get; private set; }

    public void SetLearningRate(double lr) => LearningRate = lr;

    /// <summary>Forward + backward on one micro-batch; gradients add up until <see cref="LazyResetGrad"/>. Returns the loss (and class logits for cls).</summary>
    public StepResult TrainStep(Batch batch)
    {
        var b = _trainBinding;
        b.ClearBoundInputs(); b.ClearBoundOutputs();
        using var feeds = BindBatch(b, _spec.Train, batch);
        using var reset = OrtValue.CreateTensorValueFromMemory(new[] { _resetGrad }, []);
        foreach (var io in _spec.Train.Inputs)
        {
            switch (io.Role)
            {
                case IoRole.Param: b.BindInput(io.Name, _buffers.Param(io.Param!)); break;
                case IoRole.GradIn: b.BindInput(io.Name, _buffers.Grad(io.Param!)); break;
                case IoRole.ResetGrad: b.BindInput(io.Name, reset); break;
            }
        }
        foreach (var io in _spec.Train.Outputs)
        {
            if (io.Role == IoRole.Grad) b.BindOutput(io.Name, _buffers.NextGrad(io.Param!));
            else b.BindOutputToDevice(io.Name, _host);
        }
        var result = Run(_train, b, "train step");
        _buffers.SwapGrads();
        _resetGrad = false;
        _microBatches++;
        TrainRuns++;
        return result;
    }

    /// <summary>
    /// Forward only: the loss (and class logits for cls) with the current parameters; with <paramref name="withLogits"/>
    /// an LM's logits [batch, seq, vocab] come back too (a vocabulary-sized copy to the host, so only when asked).
    /// </summary>
    public StepResult EvalStep(Batch batch, bool withLogits = false)
    {
        if (_eval is null)
        {
            try { _eval = new InferenceSession(_evalPath, _options); }
            catch (OnnxRuntimeException e) { throw new InvalidDataException($"{_evalPath}: ONNX Runtime cannot load the eval model ({e.Message}); rebuild the artifacts", e); }
            _evalBinding = _eval.CreateIoBinding();
        }
        var b = _evalBinding!;
        b.ClearBoundInputs(); b.ClearBoundOutputs();
        using var feeds = BindBatch(b, _spec.Eval, batch);
        foreach (var io in _spec.Eval.Inputs.Where(i => i.Role == IoRole.Param)) b.BindInput(io.Name, _buffers.Param(io.Param!));
        foreach (var io in _spec.Eval.Outputs.Where(o => o.Role == IoRole.Loss || (o.Role == IoRole.Logits && (_spec.Task == TrainingTask.Cls || withLogits))))
            b.BindOutputToDevice(io.Name, _host);
        return Run(_eval, b, "eval step");
    }

    /// <summary>Applies the optimizer to the accumulated gradients (averaged over the micro-batches since the last reset). Returns the gradient norm before clipping.</summary>
    public double OptimizerStep()
    {
        if (_microBatches == 0) throw new InvalidOperationException("OptimizerStep before any TrainStep: there are no gradients");
        Step++;
        var b = _optimizerBinding;
        b.ClearBoundInputs(); b.ClearBoundOutputs();
        using var lr = Scalar((float)LearningRate);
        using var wd = Scalar((float)WeightDecay);
        using var scale = Scalar(1f / _microBatches);
        using var clip = Scalar(double.IsPositiveInfinity(MaxGradNorm) ? float.PositiveInfinity : (float)MaxGradNorm);
        using var step = OrtValue.CreateTensorValueFromMemory(new long[] { Step }, []);
        foreach (var io in _spec.OptimizerModel.Inputs)
        {
            var value = io.Role switch
            {
                IoRole.LearningRate => lr,
                IoRole.WeightDecay => wd,
                IoRole.GradScale => scale,
                IoRole.MaxGradNorm => clip,
                IoRole.Step => step,
                IoRole.Param => _buffers.Param(io.Param!),
                IoRole.Grad => _buffers.Grad(io.Param!),
                IoRole.Moment => _buffers.Value(io.Name),
                _ => throw new InvalidDataException($"optimizer input '{io.Name}' has role '{io.Role.Name()}', which this session does not know; rebuild the artifacts"),
            };
            b.BindInput(io.Name, value);
        }
        foreach (var io in _spec.OptimizerModel.Outputs)
        {
            switch (io.Role)
            {
                case IoRole.UpdatedParam: b.BindOutput(io.Name, _buffers.NextParam(io.Param!)); break;
                case IoRole.UpdatedMoment: b.BindOutput(io.Name, _buffers.NextValue(io.Name[..^".updated".Length])); break;
                default: b.BindOutputToDevice(io.Name, _host); break;
            }
        }
        using var outputs = RunRaw(_optimizer, b, "optimizer step");
        _buffers.SwapParamsAndMoments();
        var names = b.GetOutputNames();
        int normIndex = Array.IndexOf(names, Optimizers.GradNorm);
        if (normIndex < 0) throw new InvalidDataException($"the optimizer model has no '{Optimizers.GradNorm}' output; rebuild the artifacts");
        return outputs[normIndex].GetTensorDataAsSpan<float>()[0];
    }

    /// <summary>The next <see cref="TrainStep"/> starts a fresh gradient sum (ORT's LazyResetGrad).</summary>
    public void LazyResetGrad()
    {
        _resetGrad = true;
        _microBatches = 0;
    }

    /// <summary>How many gradient values there are: the trainable parameters' elements, in <see cref="ArtifactsSpec.Params"/> order.</summary>
    internal int GradientLength => _buffers.GradLength;

    /// <summary>Copies the current gradients (the sum since <see cref="LazyResetGrad"/>) to the host, parameter after parameter in <see cref="ArtifactsSpec.Params"/> order.</summary>
    internal void CopyGradientsTo(Span<float> flat) => _buffers.DownloadGrads(flat);

    /// <summary>
    /// Replaces the gradients by <paramref name="flat"/> (same layout), taken as the sum over <paramref name="microBatches"/>
    /// micro-batches for the next <see cref="OptimizerStep"/>: data-parallel training puts the all-reduced sum here.
    /// </summary>
    internal void SetGradients(ReadOnlySpan<float> flat, int microBatches)
    {
        _buffers.UploadGrads(flat);
        _microBatches = microBatches;
    }

    /// <summary>Copies every trainable parameter (and, with <paramref name="withMoments"/>, optimizer moment) to the host.</summary>
    public Dictionary<string, (long[] Shape, float[] Data)> GetState(bool withMoments) => _buffers.Download(withMoments);

    /// <summary>Overwrites parameters or moments by name (from a checkpoint or an initial adapter).</summary>
    public void SetState(string name, float[] data) => _buffers.Upload(name, data);

    public bool HasState(string name) => _buffers.Has(name);

    // the batch is right-padded: attention_mask 0 on padding, position_ids 0..len−1, an empty cache for a with-past graph
    OrtValueBag BindBatch(OrtIoBinding b, ModelSpec model, Batch batch)
    {
        var bag = new OrtValueBag();
        var tokens = PaddedTokens.RightPadded(batch.InputIds, batch.Lengths, batch.SeqLength);
        foreach (var io in model.Inputs)
        {
            OrtValue? v = io.Role switch
            {
                IoRole.Labels when _spec.Task == TrainingTask.Lm => OrtValue.CreateTensorValueFromMemory(batch.Labels, [batch.BatchSize, batch.SeqLength]),
                IoRole.Labels => OrtValue.CreateTensorValueFromMemory(batch.ClassLabels, [batch.BatchSize]),
                IoRole.Lengths => OrtValue.CreateTensorValueFromMemory(batch.Lengths, [batch.BatchSize]),
                _ when SignatureFeeds.Feeds(io.Role) => SignatureFeeds.Create(io.ToEntry(), tokens),
                _ => null,
            };
            if (v is null) continue;
            bag.Add(v);
            b.BindInput(io.Name, v);
        }
        return bag;
    }

    StepResult Run(InferenceSession session, OrtIoBinding b, string what)
    {
        using var outputs = RunRaw(session, b, what);
        var names = b.GetOutputNames();
        double? loss = null;
        float[]? logits = null;
        for (int i = 0; i < names.Length; i++)
        {
            if (names[i] == TrainingArtifacts.Loss) loss = outputs[i].GetTensorDataAsSpan<float>()[0];
            else if (_logitsOutputs.Contains(names[i])) logits = outputs[i].GetTensorDataAsSpan<float>().ToArray();
        }
        if (loss is not double l) throw new InvalidDataException($"{what}: the model has no '{TrainingArtifacts.Loss}' output; rebuild the artifacts");
        if (!double.IsFinite(l)) throw new ArithmeticException($"{what}: the loss is {l} (learning rate too high, or bad data?)");
        return new StepResult(l, logits, IsClassification: _spec.Task == TrainingTask.Cls);
    }

    IDisposableReadOnlyCollection<OrtValue> RunRaw(InferenceSession session, OrtIoBinding b, string what)
    {
        try
        {
            session.RunWithBinding(_run, b);
            return b.GetOutputValues();
        }
        catch (OnnxRuntimeException e)
        {
            throw new InvalidOperationException($"{what} failed in ONNX Runtime: {e.Message}", e);
        }
    }

    static OrtValue Scalar(float v) => OrtValue.CreateTensorValueFromMemory(new[] { v }, []);

    public void Dispose()
    {
        // null-tolerant: the constructor calls this when a later load fails
        _buffers?.Dispose();
        _trainBinding?.Dispose(); _evalBinding?.Dispose(); _optimizerBinding?.Dispose();
        _train?.Dispose(); _eval?.Dispose(); _optimizer?.Dispose();
        _run.Dispose();
        _options.Dispose();
    }

    sealed class OrtValueBag : List<OrtValue>, IDisposable
    {
        public void Dispose() { foreach (var v in this) v.Dispose(); }
    }
}

/// <summary>
/// What a train or eval step returns: the mean loss, and the logits when they came back: class logits [batch, classes]
/// for classification, LM logits [batch, seq, vocab] from <see cref="TrainingSession.EvalStep"/> when asked.
/// </summary>
public sealed record StepResult(double Loss, float[]? Logits, bool IsClassification)
{
    /// <summary>The class logits [batch, classes] of a classification step; null for LM, whose logits are LM logits.</summary>
    public float[]? ClassLogits => IsClassification ? Logits : null;
}
