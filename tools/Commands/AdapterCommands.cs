using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Contracts;
using System.ComponentModel;
using System.Globalization;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Runtime;
using Spectre.Console;
using Spectre.Console.Cli;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tools.Commands;

/// <summary>`onnxlora export SOURCE --format onnx-adapter|peft|merged --out PATH [--model DIR]`.</summary>
public sealed class ExportCommand(IAnsiConsole console) : Command<ExportCommand.Settings>
{
    /// <summary>The verb in a PEFT output folder's marker.</summary>
    public const string Verb = "export";

    public sealed class Settings : CommandSettings
    {
        [CommandArgument(0, "<SOURCE>")]
        [Description("A training run folder (RUN_DIR), an .onnx_adapter file, a PEFT folder (adapter_model.safetensors + adapter_config.json) or an OnnxLora adapter.safetensors.")]
        public string Source { get; init; } = "";

        [CommandOption("-m|--model <DIR>")]
        [Description("The 'onnxlora rewrite' output the adapter belongs to (lora_config.json, model.onnx, deploy.onnx); default: the run's model_dir, or SOURCE's folder.")]
        public string? Model { get; init; }

        [CommandOption("-f|--format <FORMAT>")]
        [Description("onnx-adapter (ONNX Runtime, A and scale·B), peft (Hugging Face folder), merged (a plain .onnx with the adapter folded in) or genai (an ONNX Runtime GenAI folder: genai_config.json, model.onnx with its KV cache, adapter.onnx_adapter; needs a with-past model).")]
        public string Format { get; init; } = "onnx-adapter";

        [CommandOption("-o|--out <PATH>")]
        [Description("Output file (a folder for peft and genai): new, never an input nor inside one.")]
        public string? Out { get; init; }

        [CommandOption("--overwrite")]
        [Description("Replace an existing --out file (or an earlier 'onnxlora export' PEFT folder).")]
        public bool Overwrite { get; init; }

        [CommandOption("--dtype <TYPE>")]
        [Description("onnx-adapter parameter type: fp32 (default), fp16 or bf16 (only where deploy.onnx takes that type).")]
        public string DType { get; init; } = "fp32";

        [CommandOption("--from <DIR>")]
        [Description("genai: the model's Hugging Face folder; its config.json / generation_config.json give bos/eos/pad ids and its tokenizer files (tokenizer.json, tokenizer_config.json, …) are copied in.")]
        public string? From { get; init; }

        [CommandOption("--base-model <NAME>")]
        [Description("peft: base_model_name_or_path (e.g. gpt2); default: the rewrite's base model path.")]
        public string? BaseModel { get; init; }

        [CommandOption("--task-type <TYPE>")]
        [Description("peft: CAUSAL_LM or SEQ_CLS; default: SEQ_CLS when the adapter carries a head.")]
        public string? TaskType { get; init; }
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (string.IsNullOrEmpty(s.Out)) throw new ArgumentException("--out PATH is required");
        var format = AdapterFiles.ParseFormat(s.Format);
        var (adapter, rewriteDir) = AdapterFiles.ReadSource(s.Source, s.Model);
        if (s.From is not null && format != AdapterFormat.GenAi) throw new ArgumentException("--from goes with --format genai");
        string?[] inputs = [s.Source, s.Model, rewriteDir, s.From];
        if (format is AdapterFormat.Peft or AdapterFormat.GenAi)
        {
            OutputFolder.CheckNotInput(s.Out, inputs, "--out");
            if (!OutputFolder.Check(s.Out, Verb, "--out", s.Overwrite)) OutputFolder.Mark(s.Out, Verb);
        }
        else OutputFolder.CheckFile(s.Out, "--out", inputs, s.Overwrite);
        AdapterFiles.Write(adapter, format, s.Out, rewriteDir, ParseDType(s.DType),
            new PeftExportOptions { BaseModelNameOrPath = s.BaseModel, TaskType = s.TaskType?.ToUpperInvariant() }, s.From);
        long parameters = adapter.LoraTensors.Values.Sum(t => t.ElementCount) + adapter.Extras.Values.Sum(t => t.ElementCount);
        console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"wrote {s.Out} ({s.Format}): {adapter.Manifest.Targets.Count} LoRA targets, {adapter.Extras.Count} extra tensors, {parameters:N0} parameters"));
        return 0;
    }

    static DataType ParseDType(string text) => text.ToLowerInvariant() switch
    {
        "fp32" or "float32" or "float" => DataType.Float,
        "fp16" or "float16" => DataType.Float16,
        "bf16" or "bfloat16" => DataType.Bfloat16,
        _ => throw new ArgumentException($"--dtype '{text}' is not one of fp32, fp16, bf16"),
    };
}

/// <summary>`onnxlora merge --model DIR --adapter A --out M.onnx`.</summary>
public sealed class MergeCommand(IAnsiConsole console) : Command<MergeCommand.Settings>
{
    public sealed class Settings : CommandSettings
    {
        [CommandOption("-m|--model <DIR>")]
        [Description("The 'onnxlora rewrite' output folder (lora_config.json and model.onnx or deploy.onnx).")]
        public string? Model { get; init; }

        [CommandOption("-a|--adapter <ADAPTER>")]
        [Description("An .onnx_adapter file or a PEFT folder.")]
        public string? Adapter { get; init; }

        [CommandOption("-o|--out <FILE>")]
        [Description("The merged model: plain ONNX, no LoRA inputs, runs in any ONNX Runtime. A new file, never an input nor inside one.")]
        public string? Out { get; init; }

        [CommandOption("--overwrite")]
        [Description("Replace an existing --out file.")]
        public bool Overwrite { get; init; }
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (string.IsNullOrEmpty(s.Model)) throw new ArgumentException("--model DIR is required (the 'onnxlora rewrite' output folder)");
        if (string.IsNullOrEmpty(s.Adapter)) throw new ArgumentException("--adapter is required (an .onnx_adapter file or a PEFT folder)");
        if (string.IsNullOrEmpty(s.Out)) throw new ArgumentException("--out FILE is required");
        var (adapter, rewriteDir) = AdapterFiles.ReadSource(s.Adapter, s.Model);
        OutputFolder.CheckFile(s.Out, "--out", [s.Adapter, s.Model, rewriteDir], s.Overwrite);
        OutputFolder.CheckFile(s.Out + ".data", "--out", [s.Adapter, s.Model, rewriteDir], s.Overwrite);   // external data of a model over 2 GB
        AdapterFiles.Write(adapter, AdapterFormat.Merged, s.Out, rewriteDir);
        console.WriteLine($"wrote {s.Out}: {adapter.Manifest.Targets.Count} LoRA targets merged into {AdapterFiles.BaseModelOf(rewriteDir)}");
        return 0;
    }
}

/// <summary>Options shared by the verbs that serve a deployable model.</summary>
public class ServeSettings : CommandSettings
{
    [CommandOption("-m|--model <MODEL>")]
    [Description("The deployable model (deploy.onnx) or the 'onnxlora rewrite' folder holding it.")]
    public string? Model { get; init; }

    [CommandOption("-a|--adapter <ADAPTER>")]
    [Description("Adapters to load, each PATH or NAME=PATH (.onnx_adapter, or a PEFT folder when --model is a rewrite folder); repeatable. None = the base model.")]
    public string[] Adapters { get; init; } = [];

    [CommandOption("--ids <IDS>")]
    [Description("Token ids instead of text, comma-separated (for models whose vocabulary is not GPT-2's).")]
    public string? Ids { get; init; }

    [CommandOption("--device <DEVICE>")]
    [Description("cpu (default), cuda or cuda:ID; CUDA that cannot load is an error, never a silent CPU fallback.")]
    public string Device { get; init; } = "cpu";

    [CommandOption("--tokenizer <PATH>")]
    [Description("The model's tokenizer: a Hugging Face model folder, its tokenizer.json (BPE) or tokenizer.model (SentencePiece). Default: GPT-2's, for GPT-2's vocabulary.")]
    public string? Tokenizer { get; init; }

    [CommandOption("--input-role <NAME=ROLE>")]
    [InputRoleHelp]
    public string[] InputRoles { get; init; } = [];

    /// <summary>The host with every adapter loaded, and the names to run (null = base model).</summary>
    internal (AdapterHost Host, IReadOnlyList<string?> Runs) OpenHost()
    {
        if (string.IsNullOrEmpty(Model)) throw new ArgumentException("--model is required (deploy.onnx or the rewrite folder)");
        string deploy = Directory.Exists(Model) ? Path.Combine(Model, RunLayout.DeployableModel) : Model;
        var manifestPath = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(deploy))!, RunLayout.LoraConfig);
        var manifest = File.Exists(manifestPath) ? LoraManifest.Load(manifestPath) : null;
        var host = AdapterHost.Create(deploy, new AdapterHostOptions { Device = ExecutionDevice.Parse(Device), InputRoles = RoleOverride.ParseAll(InputRoles) });
        try
        {
            var names = new List<string?>();
            foreach (var spec in Adapters)
            {
                int eq = spec.IndexOf('=');
                var path = eq > 0 ? spec[(eq + 1)..] : spec;
                var name = eq > 0 ? spec[..eq] : Path.GetFileNameWithoutExtension(Path.TrimEndingDirectorySeparator(path));
                host.AddAdapter(name, AdapterFiles.DeployableBytes(path, manifest), path);
                names.Add(name);
            }
            if (names.Count == 0) names.Add(null);
            return (host, names);
        }
        catch
        {
            host.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The class names of a run: the adapter's own (run folder, PEFT or safetensors metadata), else the model's
    /// classifier metadata (a merged model, or the deploy.onnx a training run wrote, for an .onnx_adapter); null = none recorded.
    /// </summary>
    internal static IReadOnlyList<string>? RecordedLabels(AdapterHost host, ServeSettings s, string? run)
    {
        if (run is not null)
        {
            var spec = s.Adapters.First(a => a.StartsWith(run + "=", StringComparison.Ordinal) || Path.GetFileNameWithoutExtension(Path.TrimEndingDirectorySeparator(a)) == run);
            var path = spec.StartsWith(run + "=", StringComparison.Ordinal) ? spec[(run.Length + 1)..] : spec;
            var manifestPath = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(host.ModelPath))!, RunLayout.LoraConfig);
            if (AdapterFiles.ClassifierOf(path, File.Exists(manifestPath) ? LoraManifest.Load(manifestPath) : null)?.Labels is { } own) return own;
        }
        return GraphRewrite.Artifacts.ClassHead.ReadInfo(host.ModelMetadata, host.ModelPath)?.Labels;
    }

    /// <summary>--ids as token ids: whole numbers ≥ 0 (a negative id would wrap around to a real token in Gather).</summary>
    internal IReadOnlyList<int>? ParseIds() => Ids?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
        .Select(t => int.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out var id) ? id : throw new FormatException($"--ids: '{t}' is not a token id (a whole number ≥ 0)"))
        .ToList();

    /// <summary>The vocabulary: the last dim of [batch, tokens, vocab] logits; 0 when it is symbolic or the logits are [batch, classes].</summary>
    static int VocabularySize(AdapterHost host)
    {
        var logits = host.Outputs.TryGetValue("logits", out var l) ? l : host.Outputs.Values.First();
        return logits.Dimensions.Length == 3 ? Math.Max(0, logits.Dimensions[^1]) : 0;
    }

    /// <summary>--tokenizer's, else GPT-2's when the model's vocabulary is GPT-2's; otherwise token ids are required.</summary>
    internal TextTokenizer? TokenizerFor(AdapterHost host, bool needed)
    {
        int width = VocabularySize(host);
        if (Tokenizer is not null)
        {
            var tokenizer = TextTokenizer.Load(Tokenizer);
            if (width > 0 && tokenizer.VocabSize > width)
                throw new ArgumentException($"{Tokenizer}: the tokenizer has {tokenizer.VocabSize} tokens, more than the model's {width}; is it this model's tokenizer?");
            return tokenizer;
        }
        if (width == 50257) return TextTokenizer.Gpt2;
        if (needed) throw new ArgumentException(width > 0
            ? $"{host.ModelPath}: the vocabulary has {width} tokens, not GPT-2's 50,257; pass --ids, or --tokenizer with the model's tokenizer.json or folder, instead of text"
            : $"{host.ModelPath}: the vocabulary size (last dim of the logits) is not fixed, so GPT-2's tokenizer may not fit; pass --ids, or --tokenizer with the model's tokenizer.json or folder, instead of text");
        return null;
    }
}

/// <summary>`onnxlora generate --model DEPLOY.onnx [--adapter A …] --prompt TEXT`.</summary>
public sealed class GenerateCommand(IAnsiConsole console) : Command<GenerateCommand.Settings>
{
    /// <summary>Most tokens one call may ask for: each recomputes the whole context, so more is never a real request.</summary>
    const int MaxTokens = 1 << 16;

    public sealed class Settings : ServeSettings
    {
        [CommandOption("-p|--prompt <TEXT>")]
        [Description("The prompt (GPT-2 BPE).")]
        public string? Prompt { get; init; }

        [CommandOption("-n|--max-new-tokens <N>")]
        [Description("Tokens to generate at most (default 50). A model with a KV cache runs one token per step; without one each token re-runs the whole context, O(n²) in the length.")]
        public int MaxNewTokens { get; init; } = 50;

        [CommandOption("-t|--temperature <T>")]
        [Description("0 = greedy (default); > 0 samples from softmax(logits / T).")]
        public double Temperature { get; init; }

        [CommandOption("--top-k <K>")]
        [Description("Sample from the K most likely tokens only (0 = off).")]
        public int TopK { get; init; }

        [CommandOption("--top-p <P>")]
        [Description("Sample from the smallest set of tokens whose probability reaches P (1 = off).")]
        public double TopP { get; init; } = 1.0;

        [CommandOption("--seed <N>")]
        [Description("Seed for sampling: the same seed gives the same text.")]
        public int? Seed { get; init; }

        [CommandOption("--stop <TEXT>")]
        [Description("Stop when the output contains TEXT (repeatable); <|endoftext|> always stops GPT-2 text.")]
        public string[] Stop { get; init; } = [];

        [CommandOption("--context <N>")]
        [Description("Most tokens the model sees (its position-table size); longer contexts keep the last N.")]
        public int? Context { get; init; }
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        var ids = s.ParseIds();
        if ((ids is null) == (s.Prompt is null)) throw new ArgumentException("give either --prompt TEXT or --ids 1,2,3");
        if (s.MaxNewTokens is < 1 or > MaxTokens) throw new ArgumentException($"--max-new-tokens must be in 1..{MaxTokens} (got {s.MaxNewTokens})");
        if (s.Context is < 1) throw new ArgumentException($"--context must be ≥ 1 (got {s.Context})");
        if (!double.IsFinite(s.Temperature) || s.Temperature < 0) throw new ArgumentException($"--temperature must be a finite number ≥ 0 (got {s.Temperature})");
        if (s.TopK < 0) throw new ArgumentException($"--top-k must be ≥ 0 (got {s.TopK})");
        if (s.TopP is not (> 0 and <= 1)) throw new ArgumentException($"--top-p must be in (0, 1] (got {s.TopP})");
        var (host, runs) = s.OpenHost();
        using (host)
        {
            var tokenizer = s.TokenizerFor(host, needed: ids is null);
            var generator = new TextGenerator(host, tokenizer?.Inner);
            var options = new GenerationOptions
            {
                MaxNewTokens = s.MaxNewTokens,
                Sampling = new SamplingOptions { Temperature = s.Temperature, TopK = s.TopK, TopP = s.TopP, Seed = s.Seed },
                StopSequences = s.Stop,
                StopTokenIds = tokenizer is null ? [] : [tokenizer.EndOfText],
                ContextLength = s.Context,
            };
            foreach (var name in runs)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var result = ids is null ? generator.Generate(s.Prompt!, options, name) : generator.Generate(ids, options, name);
                // after the first result, so a request refused for its input gets its one-line error and nothing else
                if (!generator.HasCache && name == runs[0]) Console.Error.WriteLine(TextGenerator.NoCacheNotice);
                if (runs.Count > 1 || name is not null) console.MarkupLine($"[bold]{Markup.Escape(name ?? "base")}[/]");
                console.WriteLine(result.Text is null ? string.Join(",", result.TokenIds) : s.Prompt + result.Text);
            }
        }
        return 0;
    }
}

/// <summary>`onnxlora classify --model DEPLOY.onnx [--adapter A] --text TEXT …`.</summary>
public sealed class ClassifyCommand(IAnsiConsole console) : Command<ClassifyCommand.Settings>
{
    public sealed class Settings : ServeSettings
    {
        [CommandOption("--text <TEXT>")]
        [Description("Text to classify (repeatable; classified as one batch).")]
        public string[] Text { get; init; } = [];

        [CommandOption("--labels <LIST>")]
        [Description("Class names in output order, comma-separated (default 0, 1, …).")]
        public string? Labels { get; init; }

        [CommandOption("--label-tokens <LIST>")]
        [Description("For a language-model head: the words whose next-token logits are the classes, comma-separated (e.g. \" no, yes\" → ' no', ' yes').")]
        public string? LabelTokens { get; init; }
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        var ids = s.ParseIds();
        if ((ids is null) == (s.Text.Length == 0)) throw new ArgumentException("give either --text TEXT (repeatable) or --ids 1,2,3");
        var (host, runs) = s.OpenHost();
        using (host)
        {
            var textTokenizer = s.TokenizerFor(host, needed: ids is null || s.LabelTokens is not null);
            var tokenizer = textTokenizer?.Inner;
            IReadOnlyList<int>? labelTokens = s.LabelTokens?.Split(',').Select(w =>
            {
                var t = tokenizer!.EncodeToIds(w);
                return t.Count == 1 ? t[0] : throw new ArgumentException($"--label-tokens: '{w}' is {t.Count} tokens; each label must be one GPT-2 token");
            }).ToList();
            var given = Pipeline.Data.DatasetLoader.ParseClassNames(s.Labels, "--labels");
            IReadOnlyList<IReadOnlyList<int>> rows = ids is not null ? [ids] : s.Text.Select(t => (IReadOnlyList<int>)textTokenizer!.Encode(t)).ToList();
            var inputs = ids is not null ? [s.Ids!] : s.Text;
            foreach (var name in runs)
            {
                var classifier = new Classifier(host, tokenizer, new ClassifierOptions
                {
                    Labels = given ?? (labelTokens is null ? ServeSettings.RecordedLabels(host, s, name) : null),
                    LabelTokenIds = labelTokens,
                });
                var results = classifier.ClassifyBatch(rows, name);
                var table = new Table().Title(Markup.Escape(name ?? "base")).AddColumns("input", "label", "probabilities");
                for (int i = 0; i < results.Count; i++)
                    table.AddRow(Markup.Escape(inputs[i]), Markup.Escape(results[i].LabelName),
                        string.Join(" ", results[i].Probabilities.Select(p => p.ToString("F4", CultureInfo.InvariantCulture))));
                console.Write(table);
            }
        }
        return 0;
    }
}

/// <summary>`onnxlora eval --model M [--adapter A] --data FILE --task lm|cls`: perplexity, or accuracy/P/R/F1 and a confusion matrix.</summary>
public sealed class EvalCommand(IAnsiConsole console) : Command<EvalCommand.Settings>
{
    public sealed class Settings : ServeSettings
    {
        [CommandOption("-d|--data <FILE>")]
        [Description("Evaluation data (the formats of 'onnxlora train').")]
        public string? Data { get; init; }

        [CommandOption("--task <TASK>")]
        [Description("lm (perplexity, default) or cls (accuracy, precision, recall, F1, confusion matrix).")]
        public string Task { get; init; } = "lm";

        [CommandOption("--format <FORMAT>")]
        [Description("text, jsonl, tokens or tsv (label<TAB>text); default: tsv for cls, text for lm.")]
        public string? Format { get; init; }

        [CommandOption("--seq <N>")]
        [Description("Longest sequence; longer examples are cut (default 128).")]
        public int Seq { get; init; } = 128;

        [CommandOption("--batch <N>")]
        [Description("Examples per run (default 8).")]
        public int Batch { get; init; } = 8;

        [CommandOption("--labels <LIST>")]
        [Description("cls: class names in class-index order (default: the sorted labels of the file).")]
        public string? Labels { get; init; }

        [CommandOption("--label-tokens <LIST>")]
        [Description("cls with a language-model head: one word per class whose next-token logit scores it.")]
        public string? LabelTokens { get; init; }
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (string.IsNullOrEmpty(s.Data)) throw new ArgumentException("--data FILE is required");
        if (s.Seq is < 2 or > 1 << 20) throw new ArgumentException($"--seq must be in 2..{1 << 20} (got {s.Seq})");
        if (s.Batch is < 1 or > 1 << 16) throw new ArgumentException($"--batch must be in 1..{1 << 16} (got {s.Batch})");
        var task = Cli.Flag("--task", () => WireNames.Parse<TrainingTask>(s.Task, "task"));
        var format = Pipeline.Data.DatasetLoader.ParseFormat(s.Format ?? (task == TrainingTask.Cls ? "tsv" : "text"));
        var (host, runs) = s.OpenHost();
        using (host)
        {
            var logits = host.Outputs.TryGetValue("logits", out var l) ? l : host.Outputs.Values.First();
            int width = logits.Dimensions[^1];
            var dataTokenizer = s.Tokenizer is null ? null : TextTokenizer.Load(s.Tokenizer);
            // the class indices of the file follow the classifier's own label order where it recorded one
            var classNames = Pipeline.Data.DatasetLoader.ParseClassNames(s.Labels, "--labels")
                ?? (task == TrainingTask.Cls && s.LabelTokens is null ? ServeSettings.RecordedLabels(host, s, runs[0]) : null);
            var data = Pipeline.Data.DatasetLoader.Load(s.Data, new Pipeline.Data.DatasetOptions
            {
                Format = format, Task = task, SeqLength = s.Seq, ClassNames = classNames,
                VocabSize = task == TrainingTask.Cls ? dataTokenizer?.VocabSize ?? 50257   // tsv text goes through the tokenizer, GPT-2's by default
                    : width > 0 ? width : throw new ArgumentException($"{host.ModelPath}: the vocabulary size (last dim of the logits) is not fixed, so token ids cannot be checked against it"),
                Tokenizer = dataTokenizer,
            });
            console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{s.Data}: {data.Examples.Count:N0} examples, {data.TokenCount:N0} tokens ({data.Truncated} cut to {s.Seq})"));
            foreach (var name in runs)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var who = Markup.Escape(name ?? "base");
                if (task == TrainingTask.Lm)
                {
                    var r = Evaluator.LanguageModel(host, name, data, s.Batch, padId: width == 50257 ? TextGenerator.Gpt2EndOfText : 0);
                    console.MarkupLine(string.Create(CultureInfo.InvariantCulture, $"[bold]{who}[/]: loss {r.MeanLoss:F4}, perplexity {r.Perplexity:F3} over {r.Tokens:N0} tokens"));
                    continue;
                }
                var tokenizer = s.LabelTokens is null ? null : s.TokenizerFor(host, needed: true)?.Inner;
                var classifier = new Classifier(host, tokenizer, new ClassifierOptions
                {
                    Labels = data.ClassNames.Count > 0 ? data.ClassNames : null,
                    LabelTokenIds = s.LabelTokens?.Split(',').Select(w => tokenizer!.EncodeToIds(w) is { Count: 1 } t ? t[0]
                        : throw new ArgumentException($"--label-tokens: '{w}' is not one GPT-2 token")).ToList(),
                    PadTokenId = width == 50257 || s.LabelTokens is not null ? TextGenerator.Gpt2EndOfText : 0,
                });
                var e = Evaluator.Classification(classifier, name, data, s.Batch);
                console.MarkupLine(string.Create(CultureInfo.InvariantCulture, $"[bold]{who}[/]: accuracy {e.Accuracy:P2}, macro F1 {e.MacroF1:F4} over {e.Count:N0} examples"));
                var table = new Table().AddColumns("class", "precision", "recall", "F1");
                for (int c = 0; c < e.Classes.Count; c++)
                    table.AddRow(Markup.Escape(e.Classes[c]), e.Precision(c).ToString("F4", CultureInfo.InvariantCulture),
                        e.Recall(c).ToString("F4", CultureInfo.InvariantCulture), e.F1(c).ToString("F4", CultureInfo.InvariantCulture));
                console.Write(table);
                var confusion = new Table().Title("confusion (rows: true, columns: predicted)").AddColumn("");
                foreach (var c in e.Classes) confusion.AddColumn(Markup.Escape(c));
                for (int i = 0; i < e.Classes.Count; i++)
                    confusion.AddRow([Markup.Escape(e.Classes[i]), .. Enumerable.Range(0, e.Classes.Count).Select(j => e.Confusion[i, j].ToString(CultureInfo.InvariantCulture))]);
                console.Write(confusion);
            }
        }
        return 0;
    }
}
