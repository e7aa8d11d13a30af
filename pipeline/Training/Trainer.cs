using System.Diagnostics;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.Pipeline.Training.Distributed;

namespace OnnxLora.Pipeline.Training;

/// <summary>Progress of a run, reported after every optimizer step.</summary>
public sealed record TrainProgress(int Step, int TotalSteps, int Epoch, double Loss, double Lr, double TokensPerSecond, TimeSpan Elapsed, double? EvalLoss);

/// <summary>What a finished (or stopped) run produced.</summary>
public sealed record TrainResult(string RunDir, int Steps, double FirstLoss, double LastLoss, double? BestEvalLoss, double? EvalAccuracy,
                                 TimeSpan Elapsed, double TokensPerSecond, long PeakMemoryBytes, string AdapterPath, bool EarlyStopped);

/// <summary>
/// The training loop: builds (or reuses) the artifacts in RUN_DIR, streams batches through a <see cref="TrainingSession"/>,
/// schedules the learning rate, evaluates, checkpoints atomically, logs metrics.jsonl, draws loss.png and writes the
/// final adapter. RUN_DIR layout (<see cref="RunLayout"/>): train_config.json, artifacts/, checkpoint.safetensors, metrics.jsonl,
/// loss.png, lora_config.json (copied from the rewrite), adapter.safetensors (OnnxLora layout) and adapter.onnx_adapter.
/// </summary>
public static class Trainer
{
    /// <summary>The verb name in a run folder's marker (<see cref="OutputFolder"/>).</summary>
    public const string Verb = "train";

    /// <summary>
    /// Starts a new run in <c>options.OutDir</c>: a new or empty folder, or (with <paramref name="overwrite"/>) an earlier
    /// run's folder, which is emptied. A start that fails before its first checkpoint removes what it wrote, so the same
    /// --out works again. Under an MPI launcher every process calls this with the same options; see <see cref="DataParallel"/>.
    /// </summary>
    public static TrainResult Train(TrainOptions options, IProgress<TrainProgress>? progress = null, CancellationToken cancel = default, bool overwrite = false)
    {
        options.Validate();
        var outDir = options.OutDir;
        var dp = DataParallel.Current;
        OutputFolder.CheckNotInput(outDir, [options.ModelDir, options.DataPath, options.EvalDataPath, options.InitAdapter], "--out");
        bool existed = Directory.Exists(outDir);
        bool replace = OutputFolder.Check(outDir, Verb, "--out", overwrite, hint: $"continue it with 'onnxlora train --resume {outDir}', or pass --overwrite to start it over");
        dp.Barrier();   // every rank has looked before rank 0 writes
        if (dp.IsRoot)
        {
            if (replace) OutputFolder.Clear(outDir);
            OutputFolder.RemoveStaleTemps(outDir);   // what a start killed at once left
            OutputFolder.Mark(outDir, Verb);
            options.Save();
        }
        try { return Run(options, resume: false, progress, cancel); }
        catch when (dp.IsRoot && !File.Exists(Path.Combine(outDir, RunLayout.Checkpoint)))
        {
            OutputFolder.Clear(outDir);
            File.Delete(Path.Combine(outDir, OutputFolder.MarkerFile));
            if (!existed) Directory.Delete(outDir);
            throw;
        }
    }

    /// <summary>
    /// Continues the run in <paramref name="runDir"/> from its last checkpoint (from step 0 when it stopped before the
    /// first one), after removing the temp files a killed run left there.
    /// </summary>
    public static TrainResult Resume(string runDir, IProgress<TrainProgress>? progress = null, CancellationToken cancel = default)
    {
        var options = TrainOptions.Load(runDir) with { OutDir = runDir };
        OutputFolder.RemoveStaleTemps(runDir);
        return Run(options, resume: true, progress, cancel);
    }

    static TrainResult Run(TrainOptions o, bool resume, IProgress<TrainProgress>? progress, CancellationToken cancel)
    {
        var manifestPath = Path.Combine(o.ModelDir, RunLayout.LoraConfig);
        var manifest = LoraManifest.Load(manifestPath);
        var dp = DataParallel.Current;
        if (dp.IsRoot) AtomicFile.WriteAllBytes(Path.Combine(o.OutDir, RunLayout.LoraConfig), File.ReadAllBytes(manifestPath));
        var device = ExecutionDevice.Parse(o.Device);

        var viewPath = Path.Combine(o.ModelDir, RunLayout.TrainingModel);
        var view = OnnxFile.Load(viewPath);
        ModelValidator.Check(view, viewPath);
        manifest.CheckAgainst(view, viewPath);
        int vocab = VocabSize(view);
        var train = LoadData(o, o.DataPath, vocab);
        if (o.Pack) train = SequencePacker.Pack(train, o.SeqLength, (ulong)o.Seed, o.Shuffle);
        var eval = o.EvalDataPath is null ? null : LoadData(o, o.EvalDataPath, vocab, train.ClassNames);
        int classes = o.Task == TrainingTask.Cls ? Math.Max(o.Classes, train.ClassNames.Count) : 0;
        var artifacts = dp.RootFirst(() => EnsureArtifacts(o, view, manifest, classes));

        using var session = TrainingSession.Create(artifacts, device, dp.ThreadsPerProcess(o.Threads));
        session.WeightDecay = o.WeightDecay;
        session.MaxGradNorm = o.Clip > 0 ? o.Clip : double.PositiveInfinity;

        // padding sits right of every sequence, so causal attention never lets it reach a counted position and its
        // labels are −100: any valid token id works; GPT-2's <|endoftext|> where the vocabulary has it
        int padId = vocab > TextTokenizer.Gpt2.EndOfText ? TextTokenizer.Gpt2.EndOfText : 0;
        var batcher = new Batcher(train, o.BatchSize, padId, o.Shuffle, (ulong)o.Seed, o.BucketByLength);
        int stepsPerEpoch = Math.Max(1, (batcher.BatchesPerEpoch + o.GradAccum - 1) / o.GradAccum);
        int totalSteps = o.MaxSteps > 0 ? o.MaxSteps : stepsPerEpoch * o.Epochs;
        var schedule = new LrSchedule(o.Lr, o.WarmupSteps, totalSteps, o.Schedule);

        int step = 0, epoch = 0, batchIndex = 0, evalsWithoutImprovement = 0;
        double best = double.PositiveInfinity;
        var hash = o.NumericsHash();
        var checkpointPath = Path.Combine(o.OutDir, RunLayout.Checkpoint);
        resume &= File.Exists(checkpointPath);   // a run stopped before its first checkpoint starts again from step 0
        if (resume)
        {
            var c = Checkpoint.Load(checkpointPath);
            if (c.ConfigHash != hash) throw new InvalidDataException($"{checkpointPath}: was written by a run with different settings than {RunLayout.TrainConfig}; refusing to resume");
            c.CheckTensors(session.GetState(withMoments: true).ToDictionary(kv => kv.Key, kv => kv.Value.Shape), checkpointPath);
            foreach (var (name, t) in c.Tensors) session.SetState(name, t.ToFloats());
            (step, epoch, batchIndex, best, evalsWithoutImprovement) = (c.Step, c.Epoch, c.BatchInEpoch, c.BestEvalLoss, c.EvalsWithoutImprovement);
            session.Step = step;
            // LoRA dropout: the fresh session's generators start at their seeds; replaying the counted runs on a
            // two-token batch moves them to where the checkpoint left them, so the masks (and the curve) continue
            if (manifest.DropoutTrainingModeInput is not null)
            {
                var tiny = Batcher.Pad([new Example([padId, padId], [padId, padId], ClassLabel: 0)], padId);
                for (ulong run = 0; run < c.RngState; run++) session.TrainStep(tiny);
                session.LazyResetGrad();
            }
        }
        else if (o.InitAdapter is not null) LoadInitAdapter(session, o.InitAdapter, manifest);

        using var metrics = new MetricsLog(dp.IsRoot ? Path.Combine(o.OutDir, RunLayout.Metrics) : null, resumeFromStep: resume ? step : 0);
        var clock = Stopwatch.StartNew();
        long tokens = 0;
        double firstLoss = double.NaN, lastLoss = double.NaN;
        double? lastEval = null, lastAccuracy = null;
        bool earlyStopped = false;
        var order = batcher.Order(epoch);

        string LastGood() => File.Exists(checkpointPath) ? $"{checkpointPath} keeps the last good state (lower --lr, or set --clip, then --resume)"
            : "no checkpoint was written yet (lower --lr, or set --clip)";

        void SaveCheckpoint() => new Checkpoint
        {
            Step = step, Epoch = epoch, BatchInEpoch = batchIndex, ConfigHash = hash, RngState = session.TrainRuns, BestEvalLoss = best, EvalsWithoutImprovement = evalsWithoutImprovement, WorldSize = dp.Size,
            Tensors = session.GetState(withMoments: true).ToDictionary(kv => kv.Key, kv => SafeTensor.FromFloats(kv.Value.Shape, kv.Value.Data)),
        }.Save(checkpointPath);

        while (step < totalSteps)
        {
            session.SetLearningRate(schedule.At(step));
            session.LazyResetGrad();
            double loss = 0;
            int micro = 0;
            long stepTokens = 0;
            var stepClock = Stopwatch.StartNew();
            for (; micro < o.GradAccum; micro++)
            {
                if (batchIndex >= batcher.BatchesPerEpoch)
                {
                    epoch++; batchIndex = 0; order = batcher.Order(epoch);
                    if (micro > 0) break;   // an epoch's last partial accumulation still makes a step
                }
                double microLoss;
                long microTokens;
                try { (microLoss, microTokens) = dp.TrainStep(session, batcher, epoch, batchIndex++, order); }
                catch (ArithmeticException e) { throw new InvalidDataException($"step {step + 1}: {e.Message}; training stopped and {LastGood()}", e); }
                loss += microLoss;
                stepTokens += microTokens;
            }
            dp.ReduceGradients(session);
            double gradNorm = session.OptimizerStep();
            step++;
            loss /= micro;
            if (!double.IsFinite(gradNorm))   // a non-finite loss already stopped the train step
                throw new InvalidDataException($"step {step}: the gradient norm is {gradNorm}; training stopped and {LastGood()}");
            tokens += stepTokens;
            if (double.IsNaN(firstLoss)) firstLoss = loss;
            lastLoss = loss;
            double tps = stepTokens / Math.Max(1e-9, stepClock.Elapsed.TotalSeconds);
            metrics.Add(new MetricsRow("train", step, epoch, loss, session.LearningRate, tps));

            bool epochEnd = batchIndex >= batcher.BatchesPerEpoch;
            if (eval is not null && ((o.EvalEvery > 0 && step % o.EvalEvery == 0) || (o.EvalEvery == 0 && epochEnd) || step == totalSteps))
            {
                var (evalLoss, accuracy) = Evaluate(session, eval, o, padId);
                lastEval = evalLoss; lastAccuracy = accuracy;
                metrics.Add(new MetricsRow("eval", step, epoch, evalLoss, Accuracy: accuracy));
                if (evalLoss < best - 1e-6) { best = evalLoss; evalsWithoutImprovement = 0; }
                else evalsWithoutImprovement++;
                if (o.EarlyStoppingPatience > 0 && evalsWithoutImprovement >= o.EarlyStoppingPatience) earlyStopped = true;
            }
            progress?.Report(new TrainProgress(step, totalSteps, epoch, loss, session.LearningRate, tokens / clock.Elapsed.TotalSeconds, clock.Elapsed, lastEval));

            bool last = step == totalSteps || earlyStopped, cancelled = dp.AnyRank(cancel.IsCancellationRequested);
            if (last || cancelled || (o.CheckpointEvery > 0 && step % o.CheckpointEvery == 0))
            {
                dp.VerifyReplicas(session);
                if (dp.IsRoot) SaveCheckpoint();
            }
            if (cancelled)
            {
                if (dp.IsRoot) LossPlot.Save(metrics.Rows, Path.Combine(o.OutDir, RunLayout.LossPlot));
                throw new OperationCanceledException($"interrupted after step {step}; the checkpoint is saved: continue with 'onnxlora train --resume {o.OutDir}'");
            }
            if (earlyStopped) break;
        }

        var adapterPath = Path.Combine(o.OutDir, RunLayout.Adapter);
        if (dp.IsRoot)
        {
            LossPlot.Save(metrics.Rows, Path.Combine(o.OutDir, RunLayout.LossPlot));
            WriteAdapter(session, manifest, o, artifacts, classes, train.ClassNames);
        }
        return new TrainResult(o.OutDir, step, firstLoss, lastLoss, double.IsInfinity(best) ? lastEval : best, lastAccuracy, clock.Elapsed,
            tokens / Math.Max(1e-9, clock.Elapsed.TotalSeconds), PeakMemoryBytes(), adapterPath, earlyStopped);
    }

    static Dataset LoadData(TrainOptions o, string path, int vocab, IReadOnlyList<string>? classNames = null)
    {
        var ds = DatasetLoader.Load(path, new DatasetOptions
        {
            Format = o.Format, Task = o.Task, SeqLength = o.SeqLength, VocabSize = vocab, SkipBadRows = o.SkipBadRows,
            ClassNames = classNames ?? o.ClassNames, ClassCount = o.Classes,
            Tokenizer = o.Tokenizer is null || o.Format == DataFormat.Tokens ? null : TextTokenizer.Load(o.Tokenizer),
        });
        if (o.Task == TrainingTask.Cls && o.Classes > 0 && ds.ClassNames.Count > o.Classes)
            throw new InvalidDataException($"{path}: has {ds.ClassNames.Count} labels ({string.Join(", ", ds.ClassNames)}) but --classes is {o.Classes}");
        return ds;
    }

    /// <summary>The vocabulary size from the training view's logits (its last dim), so data is checked against the model.</summary>
    static int VocabSize(Onnx.ModelProto model)
    {
        var logits = model.Graph.Output.FirstOrDefault(v => v.Name == "logits") ?? model.Graph.Output[0];
        var dims = ValueInfos.Dims(logits);
        // an encoder's last_hidden_state is [batch, seq, d]: only its token embedding tells the vocabulary
        if (!ClassHead.IsHiddenOutput(logits.Name) && dims is { Length: > 0 } && dims[^1].Value is long v and > 0 and <= int.MaxValue) return (int)v;
        // a symbolic vocabulary dim: the rows of the token embedding (the Gather that reads the ids) say it too
        var table = model.Graph.Node.Where(n => n.OpType == "Gather" && n.Input.Count == 2 && n.Input[1] == "input_ids")
            .Select(n => model.Graph.Initializer.FirstOrDefault(t => t.Name == n.Input[0])).FirstOrDefault(t => t is { Dims.Count: 2 });
        return table?.Dims[0] is long rows and > 0 and <= int.MaxValue ? (int)rows
            : throw new InvalidDataException($"{RunLayout.TrainingModel}: the vocabulary size (last dim of '{logits.Name}') is not fixed and no token embedding states it, so token ids cannot be checked against it");
    }

    static string EnsureArtifacts(TrainOptions o, Onnx.ModelProto view, LoraManifest manifest, int classes)
    {
        var dir = Path.Combine(o.OutDir, RunLayout.ArtifactsDir);
        if (File.Exists(Path.Combine(dir, RunLayout.ArtifactsSpec))) return dir;   // built by this run before (resume)
        var artifacts = TrainingArtifacts.Build(view, manifest, new ArtifactOptions
        {
            Task = o.Task,
            Classes = classes,
            HeadMode = o.HeadMode,
            Pooling = o.Pooling,
            FreezeLora = o.FreezeLora,
            Optimizer = o.Optimizer,
            HeadSeed = o.Seed,
            InputRoles = RoleOverride.ParseAll(o.InputRoles),
        });
        var tmp = dir + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        artifacts.Save(tmp);
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        Directory.Move(tmp, dir);
        return dir;
    }

    static void LoadInitAdapter(TrainingSession session, string path, LoraManifest manifest)
    {
        var adapter = path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) && !PeftAdapter.IsPeftDirectory(Path.GetDirectoryName(path) ?? ".")
            ? AdapterFiles.ReadSafeTensors(path, manifest)
            : AdapterFiles.Read(path, manifest);
        foreach (var (name, t) in adapter.LoraTensors.Concat(adapter.Extras))
        {
            if (!session.HasState(name)) throw new InvalidDataException($"{path}: tensor '{name}' is not a trainable parameter of this run");
            session.SetState(name, t.Data);
        }
    }

    /// <summary>The eval loss and accuracy; data-parallel ranks take every Size-th batch and sum, so all get one process's numbers.</summary>
    static (double Loss, double? Accuracy) Evaluate(TrainingSession session, Dataset eval, TrainOptions o, int padId)
    {
        var batcher = new Batcher(eval, o.BatchSize, padId, shuffle: false, 0);
        var loss = new Deployment.LossTally();
        int correct = 0, seen = 0;
        var dp = DataParallel.Current;
        for (int i = dp.Rank; i < batcher.BatchesPerEpoch; i += dp.Size)
        {
            var batch = batcher.Get(0, i);
            var r = session.EvalStep(batch);
            // LM loss is a mean over counted positions, classification a mean over rows: weight batches alike
            loss.Add(r.Loss, o.Task == TrainingTask.Lm ? CountedPositions(batch) : batch.BatchSize);
            if (r.ClassLogits is { } logits)
            {
                int classes = logits.Length / batch.BatchSize;
                for (int row = 0; row < batch.BatchSize; row++)
                {
                    if (Deployment.Sampler.ArgMax(logits.AsSpan(row * classes, classes)) == batch.ClassLabels[row]) correct++;
                    seen++;
                }
            }
        }
        Span<double> sums = [loss.Sum, loss.Weight, correct, seen];
        dp.Sum(sums);
        return (sums[1] > 0 ? Deployment.LossTally.From(sums[0], sums[1]).Mean : 0, sums[3] > 0 ? sums[2] / sums[3] : null);
    }

    static long CountedPositions(Batch b) => Math.Max(1, b.CountedTargets);

    /// <summary>
    /// Writes the trained adapter in OnnxLora's layout and as an .onnx_adapter for the deployable model. A classifier's
    /// adapter carries its head (a LoRA-adapted head with its frozen weight), pooling and label names, and the run folder
    /// gets the classifier's deployable model (deploy.onnx: the rewrite's, pooled, with the head as an overridable input).
    /// </summary>
    static string WriteAdapter(TrainingSession session, LoraManifest manifest, TrainOptions o, string artifactsDir, int classes, IReadOnlyList<string> classNames)
    {
        var state = session.GetState(withMoments: false).Select(kv => KeyValuePair.Create(kv.Key, SafeTensor.FromFloats(kv.Value.Shape, kv.Value.Data))).ToList();
        var path = Path.Combine(o.OutDir, RunLayout.Adapter);
        var metadata = new Dictionary<string, string> { ["format"] = "onnxlora.adapter/1", ["task"] = o.Task.ToString().ToLowerInvariant() };
        if (o.Task == TrainingTask.Cls)
        {
            metadata[ClassHead.MetadataKey] = ClassHead.ToJson(new ClassifierInfo { Classes = classes, Pooling = o.Pooling, Labels = classNames.Count == classes ? classNames : null });
            var spec = TrainingArtifacts.LoadSpec(artifactsDir);
            if (spec.FrozenExtras.Count > 0)   // a LoRA head's frozen weight, or frozen LoRA factors, live in the artifacts' initial values
            {
                var initial = OnnxFile.Load(Path.Combine(artifactsDir, RunLayout.InitialParams));
                foreach (var name in spec.FrozenExtras)
                {
                    var t = initial.Graph.Initializer.First(i => i.Name == name + ".init");
                    state.Add(KeyValuePair.Create(name, SafeTensor.FromFloats(t.Dims.ToArray(), Tensors.ToFloats(t))));
                }
            }
        }
        SafeTensorsFile.Write(path, state.OrderBy(kv => kv.Key, StringComparer.Ordinal), metadata);
        var adapter = AdapterFiles.ReadSafeTensors(path, manifest);
        string deployDir = o.ModelDir;
        if (o.Task == TrainingTask.Cls)
        {
            var deployPath = Path.Combine(o.ModelDir, RunLayout.DeployableModel);
            OnnxFile.Save(AdapterFiles.DeployableFor(adapter, OnnxFile.Load(deployPath), deployPath), Path.Combine(o.OutDir, RunLayout.DeployableModel));
            deployDir = o.OutDir;
        }
        AdapterFiles.Write(adapter, AdapterFormat.OnnxAdapter, Path.Combine(o.OutDir, RunLayout.OnnxAdapter), deployDir);
        return path;
    }

    /// <summary>The process's peak resident memory (VmHWM on Linux; the working-set peak elsewhere).</summary>
    public static long PeakMemoryBytes()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith("VmHWM:", StringComparison.Ordinal))
                    return long.Parse(line[6..].Trim().Split(' ')[0]) * 1024;
        }
        catch (IOException) { }
        return Process.GetCurrentProcess().PeakWorkingSet64;
    }
}
