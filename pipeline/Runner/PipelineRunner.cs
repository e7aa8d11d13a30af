using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.ML.OnnxRuntime;
using TrainingSession = OnnxLora.Pipeline.Training.TrainingSession;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Contracts;
using OnnxLora.GraphRewrite.Autodiff;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Models;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.Pipeline.Training;
using OnnxLora.Pipeline.Training.Distributed;

namespace OnnxLora.Pipeline.Runner;

/// <summary>One example answered by the base model and by the adapted one.</summary>
public sealed record SideBySide(string Input, string Expected, string Base, string Adapted);

/// <summary>One stage of a run: its name, whether it was reused (its inputs' hash matched), and its output.</summary>
public sealed record StageResult(string Stage, bool Skipped, string Detail);

/// <summary>The loss (and accuracy, for a classifier) of the deployed model without and with the adapter, and examples answered by both.</summary>
public sealed record BeforeAfter(double BaseLoss, double AdaptedLoss, double? BaseAccuracy, double? AdaptedAccuracy, IReadOnlyList<SideBySide> Examples);

/// <summary>What `onnxlora run` did: per stage whether it ran or was reused, the metric before and after, examples and paths.</summary>
public sealed record PipelineReport(
    string RunDir, IReadOnlyList<StageResult> Stages, string Metric,
    double BaseLoss, double AdaptedLoss, double? BaseAccuracy, double? AdaptedAccuracy,
    IReadOnlyList<SideBySide> Examples, IReadOnlyDictionary<string, string> Outputs, double? DeployMaxAbsDiff, TimeSpan Elapsed);

/// <summary>
/// The whole pipeline from one config: model → data → rewrite → train → evaluate → export → deploy check. Each stage
/// writes into the run folder and records a hash of its inputs in stages.json; a stage whose hash and outputs are
/// already there is skipped, and an interrupted training stage resumes from its checkpoint, so rerunning after a crash
/// continues where it stopped.
/// </summary>
public sealed class PipelineRunner(PipelineConfig config, Action<string>? log = null, IProgress<TrainProgress>? trainProgress = null)
{
    const string Verb = "run";
    readonly List<StageResult> _stages = new();
    JsonObject _done = new();
    long[] _sampleIds = [];   // a real input from the eval data, for the deploy check
    string _runDir = "";

    /// <summary>Checks the config's values before any work starts (unknown keys were refused on parsing).</summary>
    public void Validate()
    {
        if (config.String("model.path") is null && config.String("model.preset") is null && config.String("model.weights") is null && config.String("model.from") is null)
            throw new InvalidDataException($"{config.Source}: give model.path (an ONNX file), model.from (a Hugging Face folder) or model.preset (and optionally model.weights)");
        if (config.Required("model.arch") is not ("gpt2" or "llama"))
            throw new InvalidDataException($"{config.Source}: model.arch must be gpt2 or llama (got '{config.String("model.arch")}')");
        if (config.String("data.generate") is { } g && g != DemoData.Name)
            throw new InvalidDataException($"{config.Source}: data.generate must be '{DemoData.Name}' (got '{g}')");
        if (config.String("data.generate") is null && config.String("data.train") is null)
            throw new InvalidDataException($"{config.Source}: give data.train (a data file) or data.generate: {DemoData.Name}");
        foreach (var f in config.List("export.formats")) AdapterFiles.ParseFormat(f);
        _ = LoraConfigFromSection();
        _ = InputRoles();
        _ = TrainOptionsFrom("/", "/", "/", null);   // every train value parses
        ExecutionDevice.Parse(config.Required("train.device"));
    }

    public PipelineReport Run(CancellationToken cancel = default)
    {
        Validate();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        _runDir = config.Path("run_dir")!;
        // the run folder is new or an earlier run's (reused: finished stages are kept); it never holds an input
        OutputFolder.CheckNotInput(_runDir, new[] { "model.path", "model.weights", "data.train", "data.eval", "train.init_adapter" }.Select(config.Path), "run_dir");
        // under mpiexec rank 0 makes the model, data and rewrite first; the other ranks then find them up to date, and
        // all train together; evaluation, export and the deploy check are rank 0's alone
        var dp = DataParallel.Current;
        if (!dp.IsRoot) dp.Barrier();
        else
        {
            if (!OutputFolder.Check(_runDir, Verb, "run_dir", overwrite: false, reuse: true)) OutputFolder.Mark(_runDir, Verb);
            OutputFolder.RemoveStaleTemps(_runDir);
        }
        var stagesPath = Path.Combine(_runDir, RunLayout.Stages);
        _done = File.Exists(stagesPath) ? ReadStages(stagesPath) : new JsonObject();

        var modelHash = config.Hash("model");
        var modelPath = Stage("model", modelHash, () => BuildModel(), p => File.Exists(p));
        var (trainData, evalData) = Data();
        var rewriteHash = Combine(modelHash, config.Hash("lora"));
        var rewriteDir = Stage("rewrite", rewriteHash, () => Rewrite(modelPath), d => File.Exists(Path.Combine(d, RunLayout.LoraConfig)));
        if (dp.IsRoot) dp.Barrier();
        var trainHash = Combine(rewriteHash, config.Hash("data", "train"), FileHash(trainData), evalData is null ? "" : FileHash(evalData));
        var runDir = Stage("train", trainHash, () => Train(rewriteDir, trainData, evalData, cancel), d => File.Exists(Path.Combine(d, RunLayout.Adapter)));
        if (!dp.IsRoot)
            return new PipelineReport(_runDir, _stages.ToList(), "", double.NaN, double.NaN, null, null, [],
                new Dictionary<string, string>(), double.NaN, clock.Elapsed);
        var manifest = LoraManifest.Load(Path.Combine(rewriteDir, RunLayout.LoraConfig));
        var adapter = AdapterFiles.ReadSafeTensors(Path.Combine(runDir, RunLayout.Adapter), manifest);

        var scores = Evaluate(runDir, rewriteDir, evalData ?? trainData, adapter);
        var outputs = Export(adapter, rewriteDir, trainHash);
        double? deployDiff = DeployCheck(DeployModelOf(runDir, rewriteDir, adapter), outputs);
        return new PipelineReport(_runDir, _stages.ToList(), Task() == TrainingTask.Cls ? "accuracy" : "perplexity",
            scores.BaseLoss, scores.AdaptedLoss, scores.BaseAccuracy, scores.AdaptedAccuracy, scores.Examples, outputs, deployDiff, clock.Elapsed);
    }

    /// <summary>stages.json as this runner writes it: stage → {"hash": string, "output": string}; anything else is refused.</summary>
    static JsonObject ReadStages(string path)
    {
        InvalidDataException Corrupt(string what) => new($"{path}: {what}; delete it to run every stage again");
        JsonNode? json;
        try { json = JsonNode.Parse(File.ReadAllText(path), documentOptions: new JsonDocumentOptions { AllowDuplicateProperties = false }); }
        catch (JsonException e) { throw Corrupt($"not valid JSON ({e.Message})"); }
        if (json is not JsonObject stages) throw Corrupt("expected a JSON object of stages");
        foreach (var (name, entry) in stages)
            if (entry is not JsonObject o || o["hash"] is not JsonValue h || !h.TryGetValue<string>(out _) || o["output"] is not JsonValue v || !v.TryGetValue<string>(out _))
                throw Corrupt($"stage '{name}' is not {{\"hash\": \"…\", \"output\": \"…\"}}");
        return stages;
    }

    /// <summary>Runs <paramref name="work"/> unless stages.json says it ran with the same inputs and its output is still there.</summary>
    string Stage(string name, string hash, Func<string> work, Func<string, bool> outputExists)
    {
        if (_done[name] is JsonObject prior && (string?)prior["hash"] == hash && (string?)prior["output"] is { } output && outputExists(output))
        {
            _stages.Add(new StageResult(name, true, output));
            log?.Invoke($"{name}: up to date ({output})");
            return output;
        }
        log?.Invoke($"{name}: running");
        var result = work();
        _done[name] = new JsonObject { ["hash"] = hash, ["output"] = result };
        if (DataParallel.Current.IsRoot) AtomicFile.WriteAllText(Path.Combine(_runDir, RunLayout.Stages), _done.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        _stages.Add(new StageResult(name, false, result));
        return result;
    }

    string BuildModel()
    {
        if (config.Path("model.path") is { } path)
        {
            if (!File.Exists(path)) throw new FileNotFoundException($"{config.Source}: model.path '{path}' does not exist", path);
            return path;
        }
        var output = Path.Combine(_runDir, RunLayout.ModelDir, RunLayout.BaseModel);
        if (config.Path("model.from") is { } folder)
        {
            OnnxFile.Save(HfModels.Build(folder).Model, output);
            return output;
        }
        if (config.Required("model.arch") == "llama")
        {
            OnnxFile.Save(LlamaBuilder.Build(LlamaWeights.Random(LlamaConfig.Preset(config.Required("model.preset")), config.Int("model.seed"))), output);
            return output;
        }
        var weights = config.Path("model.weights");
        var preset = config.String("model.preset");
        var gpt = weights is not null ? GptWeights.FromSafeTensors(weights, preset is null ? null : GptConfig.Preset(preset))
                                      : GptWeights.Random(GptConfig.Preset(preset!), config.Int("model.seed"));
        OnnxFile.Save(GptBuilder.Build(gpt.Config, gpt), output);
        return output;
    }

    (string Train, string? Eval) Data()
    {
        if (config.String("data.generate") is not null)
        {
            var (train, eval) = DemoData.Write(Path.Combine(_runDir, RunLayout.DataDir));
            return (train, eval);
        }
        return (config.Path("data.train")!, config.Path("data.eval"));
    }

    LoraConfig LoraConfigFromSection()
    {
        int rank = config.Int("lora.rank");
        return new LoraConfig
        {
            Rank = rank,
            Alpha = config.String("lora.alpha") is null ? rank : config.Double("lora.alpha"),
            TargetModules = config.List("lora.targets"),
            ExcludeModules = config.List("lora.exclude"),
            LayersToTransform = config.String("lora.layers") is { } l ? LoraConfig.ParseLayers(l) : null,
            Scaling = Key("lora.scaling", () => WireNames.Parse<LoraScaling>(config.Required("lora.scaling"), "scaling")),
            Init = Key("lora.init", () => WireNames.Parse<LoraInit>(config.Required("lora.init"), "init")),
            Dropout = config.Double("lora.dropout"),
            Seed = config.Int("lora.seed"),
        };
    }

    // model.input_roles: [NAME=ROLE, …], recorded in the rewritten models so training and deployment feed them
    Dictionary<string, RoleOverride> InputRoles()
    {
        try { return RoleOverride.ParseAll(config.List("model.input_roles")); }
        catch (ArgumentException e) { throw new InvalidDataException($"{config.Source}: model.input_roles: {e.Message}", e); }
    }

    string Rewrite(string modelPath)
    {
        var dir = Path.Combine(_runDir, RunLayout.RewriteDir);
        var result = LoraRewrite.RewriteFile(modelPath, LoraConfigFromSection(), dir, overwrite: true, InputRoles());   // an earlier config's rewrite
        log?.Invoke($"  {result.Targets.Count} targets; {result.ParameterLine}");
        return dir;
    }

    TrainOptions TrainOptionsFrom(string rewriteDir, string trainData, string outDir, string? evalData)
    {
        var task = Task();
        var options = new TrainOptions
        {
            ModelDir = rewriteDir, DataPath = trainData, EvalDataPath = evalData, OutDir = outDir, Task = task,
            Format = config.String("data.format") is { } f
                ? Key("data.format", () => DatasetLoader.ParseFormat(f))
                : task == TrainingTask.Cls ? DataFormat.Tsv : Path.GetExtension(trainData) == ".jsonl" ? DataFormat.Jsonl : DataFormat.Text,
            Classes = config.Int("data.classes"),
            ClassNames = config.String("data.generate") is not null ? DemoData.Labels : DatasetLoader.ParseClassNames(config.String("data.labels"), "data.labels"),
            SeqLength = config.Int("data.seq"), SkipBadRows = config.Bool("data.skip_bad_rows"), Pack = config.Bool("data.pack"), Tokenizer = config.Path("data.tokenizer"),
            Optimizer = Key("train.optimizer", () => WireNames.Parse<OptimizerKind>(config.Required("train.optimizer"), "optimizer")), Lr = config.Double("train.lr"), WeightDecay = config.Double("train.weight_decay"),
            WarmupSteps = config.Int("train.warmup"),
            Schedule = Key("train.schedule", () => WireNames.Parse<ScheduleKind>(config.Required("train.schedule"), "schedule")),
            Epochs = config.Int("train.epochs"), MaxSteps = config.Int("train.max_steps"), BatchSize = config.Int("train.batch"),
            GradAccum = config.Int("train.grad_accum"), Clip = config.Double("train.clip"), Device = config.Required("train.device"),
            Threads = config.Int("train.threads"), Seed = config.Int("train.seed"), Shuffle = config.Bool("train.shuffle"),
            EvalEvery = config.Int("train.eval_every"), EarlyStoppingPatience = config.Int("train.early_stopping"),
            HeadMode = Key("train.head", () => WireNames.Parse<HeadMode>(config.Required("train.head"), "head")),
            Pooling = Key("train.pooling", () => WireNames.Parse<Pooling>(config.Required("train.pooling"), "pooling")), CheckpointEvery = config.Int("train.checkpoint_every"),
            InitAdapter = config.Path("train.init_adapter"),
        };
        try { options.Validate(); }
        catch (ArgumentException e) { throw new InvalidDataException($"{config.Source}: {e.Message.Replace("--", "train.").Replace('-', '_')}", e); }
        return options;
    }

    TrainingTask Task() => Key("data.task", () => WireNames.Parse<TrainingTask>(config.Required("data.task"), "task"));

    /// <summary>Runs a shared parser and names the config key in its message.</summary>
    T Key<T>(string key, Func<T> parse)
    {
        try { return parse(); }
        catch (ArgumentException e) { throw new InvalidDataException($"{config.Source}: {key}: {e.Message}", e); }
    }

    string Train(string rewriteDir, string trainData, string? evalData, CancellationToken cancel)
    {
        var dir = Path.Combine(_runDir, RunLayout.TrainDir);
        var options = TrainOptionsFrom(rewriteDir, trainData, dir, evalData);
        TrainResult result;
        if (File.Exists(Path.Combine(dir, RunLayout.TrainConfig)) && File.Exists(Path.Combine(dir, RunLayout.Checkpoint))
            && TrainOptions.Load(dir).NumericsHash() == (options with { OutDir = dir }).NumericsHash())
        {
            log?.Invoke("  resuming the interrupted run from its checkpoint");
            result = Trainer.Resume(dir, trainProgress, cancel);
        }
        else result = Trainer.Train(options, trainProgress, cancel, overwrite: true);   // another config's run (only ever one Trainer made): start over
        log?.Invoke($"  {result.Steps} steps in {result.Elapsed.TotalSeconds:F1} s, {result.TokensPerSecond:F0} tokens/s, loss {result.FirstLoss:F3} → {result.LastLoss:F3}");
        return dir;
    }

    /// <summary>The deployable model an adapter runs on: the training run's classifier (deploy.onnx) or the rewrite's deploy.onnx.</summary>
    static string DeployModelOf(string runDir, string rewriteDir, LoraAdapter adapter) =>
        Path.Combine(adapter.Classifier is null ? rewriteDir : runDir, RunLayout.DeployableModel);

    /// <summary>
    /// The metric before (the deployed model with no adapter: the base model, or a zero head) and after training (with
    /// the trained adapter through ONNX Runtime's LoRA API), on the eval data, plus examples side by side. Scored by
    /// <see cref="Evaluator"/>, as 'onnxlora eval' scores.
    /// </summary>
    BeforeAfter Evaluate(string runDir, string rewriteDir, string evalData, LoraAdapter adapter)
    {
        var options = TrainOptions.Load(runDir);
        var tokenizer = TokenizerOf(options);
        var data = DatasetLoader.Load(evalData, new DatasetOptions { Format = options.Format, Task = options.Task, SeqLength = options.SeqLength, ClassNames = adapter.Classifier?.Labels ?? options.ClassNames, SkipBadRows = options.SkipBadRows, Tokenizer = tokenizer });
        _sampleIds = data.Examples[0].InputIds.Select(i => (long)i).ToArray();
        using var host = AdapterHost.Create(DeployModelOf(runDir, rewriteDir, adapter), new AdapterHostOptions { Device = ExecutionDevice.Parse(options.Device) });
        host.AddAdapter("adapted", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(adapter)));
        var examples = new List<SideBySide>();
        int count = config.Int("evaluate.examples");
        double beforeLoss, afterLoss;
        double? beforeAccuracy = null, afterAccuracy = null;
        if (options.Task == TrainingTask.Cls)
        {
            var classifier = new Classifier(host, options: new ClassifierOptions { Labels = data.ClassNames, PadTokenId = 0 });
            var before = Evaluator.Classification(classifier, null, data, options.BatchSize);
            var after = Evaluator.Classification(classifier, "adapted", data, options.BatchSize);
            (beforeLoss, afterLoss, beforeAccuracy, afterAccuracy) = (before.MeanLoss!.Value, after.MeanLoss!.Value, before.Accuracy, after.Accuracy);
            var rows = data.Examples.Take(count).Select(e => (IReadOnlyList<int>)e.InputIds).ToList();
            if (rows.Count > 0)
            {
                string Show(ClassificationResult r) => $"{r.LabelName} ({r.Probabilities[r.Label]:P0})";
                var b = classifier.ClassifyBatch(rows); var a = classifier.ClassifyBatch(rows, "adapted");
                for (int i = 0; i < rows.Count; i++)
                    examples.Add(new SideBySide(tokenizer.Decode(rows[i]), data.ClassNames[data.Examples[i].ClassLabel], Show(b[i]), Show(a[i])));
            }
        }
        else
        {
            int padId = host.Outputs.Values.First().Dimensions[^1] == 50257 ? TextGenerator.Gpt2EndOfText : 0;
            beforeLoss = Evaluator.LanguageModel(host, null, data, options.BatchSize, padId).MeanLoss;
            afterLoss = Evaluator.LanguageModel(host, "adapted", data, options.BatchSize, padId).MeanLoss;
            examples.AddRange(Generations(rewriteDir, data, adapter, count, showIds: options.Format == DataFormat.Tokens, tokenizer));
        }
        log?.Invoke($"evaluate (deployed model): loss {beforeLoss:F4} → {afterLoss:F4}" + (beforeAccuracy is double x ? $", accuracy {x:P1} → {afterAccuracy:P1}" : ""));
        _stages.Add(new StageResult("evaluate", false, Path.Combine(_runDir, RunLayout.Evaluation)));
        AtomicFile.WriteAllText(Path.Combine(_runDir, RunLayout.Evaluation), new JsonObject
        {
            ["base_loss"] = beforeLoss, ["adapted_loss"] = afterLoss, ["base_accuracy"] = beforeAccuracy, ["adapted_accuracy"] = afterAccuracy,
            ["examples"] = new JsonArray(examples.Select(e => (JsonNode?)new JsonObject { ["input"] = e.Input, ["expected"] = e.Expected, ["base"] = e.Base, ["adapted"] = e.Adapted }).ToArray()),
        }.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        return new BeforeAfter(beforeLoss, afterLoss, beforeAccuracy, afterAccuracy, examples);
    }

    /// <summary>Greedy continuations of eval prompts by the base and the adapted model; token ids are shown as ids when the data was pre-tokenized.</summary>
    // data.tokenizer's, else GPT-2's
    static TextTokenizer TokenizerOf(TrainOptions options) => options.Tokenizer is null ? TextTokenizer.Gpt2 : TextTokenizer.Load(options.Tokenizer);

    static IEnumerable<SideBySide> Generations(string rewriteDir, Dataset data, LoraAdapter adapter, int count, bool showIds, TextTokenizer tokenizer)
    {
        using var host = AdapterHost.Create(Path.Combine(rewriteDir, RunLayout.DeployableModel));
        host.AddAdapter("adapted", OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(adapter)));
        var generator = new TextGenerator(host, tokenizer.Inner);
        var options = new GenerationOptions { MaxNewTokens = 12, StopTokenIds = [tokenizer.EndOfText] };
        foreach (var e in data.Examples.Take(count))
        {
            int prompt = Array.FindIndex(e.Labels, l => l != Example.Ignore);
            if (prompt <= 0) prompt = Math.Max(1, e.Length / 2);
            var promptIds = e.InputIds[..prompt];
            string Show(IEnumerable<int> ids) => showIds ? string.Join(" ", ids) : tokenizer.Decode(ids);
            yield return new SideBySide(Show(promptIds), Show(e.InputIds[prompt..]),
                Show(generator.Generate(promptIds, options).TokenIds), Show(generator.Generate(promptIds, options, "adapted").TokenIds));
        }
    }

    Dictionary<string, string> Export(LoraAdapter adapter, string rewriteDir, string hash)
    {
        var outputs = new Dictionary<string, string>();
        foreach (var format in config.List("export.formats").Select(AdapterFiles.ParseFormat))
        {
            var path = Path.Combine(_runDir, RunLayout.ExportDir, format switch
            {
                AdapterFormat.OnnxAdapter => RunLayout.OnnxAdapter, AdapterFormat.Peft => RunLayout.PeftDir, AdapterFormat.GenAi => RunLayout.GenAiDir, _ => RunLayout.Merged,
            });
            Stage($"export {format}", hash, () => { AdapterFiles.Write(adapter, format, path, rewriteDir); return path; }, p => File.Exists(p) || Directory.Exists(p));
            outputs[format.ToString()] = path;
        }
        outputs["loss plot"] = Path.Combine(_runDir, RunLayout.TrainDir, RunLayout.LossPlot);
        return outputs;
    }

    /// <summary>The deployable model with the exported .onnx_adapter (through ORT's OrtLoraAdapter) against the merged model.</summary>
    /// <returns>The largest logit difference; null when the config exports no .onnx_adapter and merged model to compare.</returns>
    double? DeployCheck(string deployModel, IReadOnlyDictionary<string, string> outputs)
    {
        if (!outputs.TryGetValue(nameof(AdapterFormat.OnnxAdapter), out var adapterPath) || !outputs.TryGetValue(nameof(AdapterFormat.Merged), out var merged)) return null;
        using var host = AdapterHost.Create(deployModel);
        host.AddAdapter("adapted", adapterPath);
        // both models take the base's inputs (ids, and a mask, positions or caches when it has them): fed by role
        var signature = ModelSignature.Of(host);
        var feeds = signature.Feeds([_sampleIds.Select(i => (int)i).ToList()], _sampleIds.Length, padId: 0);
        try
        {
            using var deployed = host.Run("adapted", feeds, [signature.Logits]);
            using var session = new InferenceSession(merged);
            using var run = new RunOptions();
            using var reference = session.Run(run, feeds.Keys.ToList(), feeds.Values.ToList(), [signature.Logits]);
            return MaxDifference(deployed[0], reference[0]);
        }
        finally { foreach (var v in feeds.Values) v.Dispose(); }
    }

    double MaxDifference(OrtValue deployed, OrtValue reference)
    {
        var a = deployed.GetTensorDataAsSpan<float>();
        var b = reference.GetTensorDataAsSpan<float>();
        double max = 0;
        for (int i = 0; i < a.Length; i++) max = Math.Max(max, Math.Abs(a[i] - b[i]));
        log?.Invoke($"deploy check: deploy.onnx + adapter.onnx_adapter (OrtLoraAdapter) vs merged.onnx, max |Δlogit| = {max:E2}");
        if (max > 1e-3) throw new InvalidOperationException($"deploy check failed: the deployed adapter and the merged model differ by {max:E2}");
        return max;
    }

    static string Combine(params string[] parts) => Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(string.Join("|", parts))))[..16].ToLowerInvariant();

    static string FileHash(string path) => LoraRewrite.Sha256(path)[..16];
}
