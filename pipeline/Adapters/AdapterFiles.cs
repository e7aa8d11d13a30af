using Onnx;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Pipeline.Adapters;

/// <summary>The adapter formats OnnxLora reads and writes.</summary>
public enum AdapterFormat
{
    /// <summary>ONNX Runtime's <c>.onnx_adapter</c> (A and scale·B under the deployable model's input names).</summary>
    OnnxAdapter,
    /// <summary>A Hugging Face PEFT folder (adapter_model.safetensors + adapter_config.json).</summary>
    Peft,
    /// <summary>A plain <c>.onnx</c> with scale·A·B folded into the base weights.</summary>
    Merged,
    /// <summary>An ONNX Runtime GenAI model folder (genai_config.json, the deployable model, the .onnx_adapter).</summary>
    GenAi,
}

/// <summary>
/// Where adapters come from and go to: one place that reads any adapter source (so that training run folders can be
/// added here), writes any format, and merges an adapter into a model.
/// </summary>
public static class AdapterFiles
{
    /// <summary>Parses "onnx-adapter", "peft", "merged" or "genai".</summary>
    public static AdapterFormat ParseFormat(string text) => text.Trim().ToLowerInvariant() switch
    {
        "onnx-adapter" or "onnx_adapter" => AdapterFormat.OnnxAdapter,
        "peft" => AdapterFormat.Peft,
        "merged" => AdapterFormat.Merged,
        "genai" => AdapterFormat.GenAi,
        _ => throw new ArgumentException($"format '{text}' is not one of onnx-adapter, peft, merged, genai"),
    };

    /// <summary>
    /// Reads an adapter for the rewrite whose manifest is <paramref name="manifest"/>: an <c>.onnx_adapter</c> file or a
    /// PEFT folder (adapter_model.safetensors + adapter_config.json), or a safetensors file in OnnxLora's layout.
    /// Names and shapes are checked against the manifest.
    /// </summary>
    public static LoraAdapter Read(string path, LoraManifest manifest)
    {
        ArgumentNullException.ThrowIfNull(path);
        ArgumentNullException.ThrowIfNull(manifest);
        if (PeftAdapter.IsPeftDirectory(path)) return PeftAdapter.Read(path, manifest);
        if (Path.GetFileName(path) == PeftAdapter.WeightsFile) return PeftAdapter.Read(Path.GetDirectoryName(Path.GetFullPath(path))!, manifest);
        if (File.Exists(path) && path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase)) return ReadSafeTensors(path, manifest);
        if (File.Exists(path)) return OnnxAdapterFile.Load(path, manifest);
        if (Directory.Exists(path))
            throw new FileNotFoundException($"{path}: a folder without {PeftAdapter.WeightsFile}; give an {OnnxAdapterFile.Extension} file or a PEFT adapter folder", path);
        throw new FileNotFoundException($"{path}: no such adapter (give an {OnnxAdapterFile.Extension} file or a PEFT adapter folder)", path);
    }

    /// <summary>
    /// Reads a safetensors file in OnnxLora's own layout (what training checkpoints and the PyTorch goldens hold): tensors
    /// named like the manifest's A [in, r] and B [r, out] (B unscaled); other tensors become extras.
    /// </summary>
    public static LoraAdapter ReadSafeTensors(string path, LoraManifest manifest)
    {
        var (tensors, metadata) = Models.SafeTensorsFile.Read(path);
        var names = manifest.Targets.SelectMany(t => new[] { t.LoraA, t.LoraB }).ToHashSet(StringComparer.Ordinal);
        var lora = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
        var extras = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
        foreach (var (name, t) in tensors)
        {
            if (name.StartsWith(PeftAdapter.Prefix, StringComparison.Ordinal))
                throw new InvalidDataException($"{path}: tensor '{name}' has PEFT's naming; put the file in a folder as {PeftAdapter.WeightsFile} with its {PeftAdapter.ConfigFile}");
            var x = new AdapterTensor(t.Shape, t.ToFloats());
            if (name is ClassHead.LoraA or ClassHead.LoraB) extras[name] = x;
            else if (names.Contains(name) || name.Contains(".lora_", StringComparison.Ordinal)) lora[name] = x;
            else extras[name] = x;
        }
        FoldHeadLora(extras, manifest, path);
        return LoraAdapter.Create(manifest, lora, extras, path, ClassHead.ReadInfo(metadata, path));
    }

    /// <summary>
    /// A LoRA-adapted head (frozen W, trained A and B) becomes one weight W + scale·A·B: deployed, a head is one
    /// [d, classes] tensor whichever way it was trained.
    /// </summary>
    static void FoldHeadLora(Dictionary<string, AdapterTensor> extras, LoraManifest manifest, string path)
    {
        bool a = extras.Remove(ClassHead.LoraA, out var headA), b = extras.Remove(ClassHead.LoraB, out var headB);
        if (!a && !b) return;
        if (!(a && b) || !extras.TryGetValue(ClassHead.Weight, out var w) || w.Shape.Length != 2 || headA!.Shape.Length != 2)
            throw new InvalidDataException($"{path}: a LoRA-adapted head needs '{ClassHead.Weight}', '{ClassHead.LoraA}' and '{ClassHead.LoraB}' (2-D)");
        long d = w.Shape[0], classes = w.Shape[1], rank = headA.Shape[1];
        if (headA.Shape[0] != d || !headB!.Shape.SequenceEqual(new[] { rank, classes }))
            throw new InvalidDataException($"{path}: head LoRA A {headA.ShapeText} and B {headB!.ShapeText} do not fit the head {w.ShapeText}");
        var scale = LoraManifest.ScaleFor(manifest.Scaling, manifest.Alpha, manifest.Rank);   // as the training artifacts scale it
        extras[ClassHead.Weight] = new AdapterTensor(w.Shape, ClassHead.Fold(w.Data, headA.Data, headB.Data, d, rank, classes, scale));
    }

    /// <summary>
    /// The one place that turns what a user points at into an adapter and its rewrite folder. SOURCE is
    /// <list type="bullet">
    /// <item>a training run folder (lora_config.json + adapter.safetensors or adapter.onnx_adapter; its rewrite folder is
    /// --model or train_config.json's model_dir),</item>
    /// <item>an <c>.onnx_adapter</c> file, a PEFT folder, or a safetensors file in OnnxLora's layout, with
    /// <paramref name="rewriteDir"/> (--model) the 'onnxlora rewrite' output it belongs to (lora_config.json, model.onnx,
    /// deploy.onnx); when null, SOURCE's own folder is used if it holds lora_config.json.</item>
    /// </list>
    /// </summary>
    public static (LoraAdapter Adapter, string RewriteDir) ReadSource(string source, string? rewriteDir)
    {
        ArgumentNullException.ThrowIfNull(source);
        if (!File.Exists(source) && !Directory.Exists(source)) throw new FileNotFoundException($"{source}: no such adapter file or folder", source);
        if (IsRunDir(source))
        {
            var runManifest = LoraManifest.Load(Path.Combine(source, RunLayout.LoraConfig));
            var file = RunLayout.RunAdapters.Select(f => Path.Combine(source, f)).FirstOrDefault(File.Exists)
                ?? throw new FileNotFoundException($"{source}: a run folder without {string.Join(" or ", RunLayout.RunAdapters)}; has training finished?");
            return (Read(file, runManifest), rewriteDir ?? RunModelDir(source) ?? source);
        }
        rewriteDir ??= new[] { source, Path.GetDirectoryName(Path.GetFullPath(source)) }
            .FirstOrDefault(d => d is not null && File.Exists(Path.Combine(d, RunLayout.LoraConfig)))
            ?? throw new ArgumentException($"{source}: which model does this adapter belong to? Give --model DIR, the 'onnxlora rewrite' output folder (with {RunLayout.LoraConfig})");
        var manifest = LoraManifest.Load(Path.Combine(rewriteDir, RunLayout.LoraConfig));
        return (Read(source, manifest), rewriteDir);
    }

    /// <summary>True for a training run folder (lora_config.json, not a PEFT folder).</summary>
    public static bool IsRunDir(string path) => Directory.Exists(path) && File.Exists(Path.Combine(path, RunLayout.LoraConfig)) && !PeftAdapter.IsPeftDirectory(path);

    /// <summary>The classifier info and label names of an adapter source (run folder, PEFT folder, safetensors), or null (an .onnx_adapter has no metadata).</summary>
    public static ClassifierInfo? ClassifierOf(string path, LoraManifest? manifest)
    {
        if (File.Exists(path) && !path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase)) return null;
        if (IsRunDir(path)) return ReadSource(path, null).Adapter.Classifier;
        return manifest is null ? null : Read(path, manifest).Classifier;
    }

    /// <summary>The rewrite folder a training run was made from (train_config.json's model_dir), when it still exists.</summary>
    static string? RunModelDir(string runDir)
    {
        var config = Path.Combine(runDir, RunLayout.TrainConfig);
        if (!File.Exists(config)) return null;
        string? dir;
        try { dir = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(config))?["model_dir"]?.GetValue<string>(); }
        catch (System.Text.Json.JsonException e) { throw new InvalidDataException($"{config}: not valid JSON ({e.Message})", e); }
        if (dir is null) return null;
        return new[] { dir, Path.Combine(runDir, dir) }.FirstOrDefault(d => File.Exists(Path.Combine(d, RunLayout.LoraConfig)));
    }

    /// <summary>
    /// Bytes an <see cref="Deployment.AdapterHost"/> loads: an <c>.onnx_adapter</c> file as is, or a PEFT folder converted
    /// with <paramref name="manifest"/> (needed for PEFT only).
    /// </summary>
    public static byte[] DeployableBytes(string path, LoraManifest? manifest)
    {
        if (File.Exists(path) && Path.GetFileName(path) != PeftAdapter.WeightsFile && !path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase)) return File.ReadAllBytes(path);
        if (IsRunDir(path)) return OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(ReadSource(path, null).Adapter));
        if (manifest is null)
            throw new ArgumentException($"{path}: a PEFT adapter needs the rewrite's {RunLayout.LoraConfig} to map its modules; give --model the rewrite folder, or convert it with 'onnxlora export --format onnx-adapter'");
        return OnnxAdapterFile.Serialize(OnnxAdapterFile.DeployableParameters(Read(path, manifest)));
    }

    /// <summary>
    /// Writes <paramref name="adapter"/> in <paramref name="format"/> to <paramref name="outPath"/> (a file, or a folder
    /// for PEFT). <paramref name="rewriteDir"/> (the rewrite output with model.onnx / deploy.onnx) is needed for
    /// <see cref="AdapterFormat.Merged"/> and to check an <c>.onnx_adapter</c> against deploy.onnx.
    /// </summary>
    public static void Write(LoraAdapter adapter, AdapterFormat format, string outPath, string? rewriteDir = null,
        DataType elementType = DataType.Float, PeftExportOptions? peft = null, string? hfFolder = null)
    {
        switch (format)
        {
            case AdapterFormat.OnnxAdapter:
                var deploy = rewriteDir is null ? null : Path.Combine(rewriteDir, RunLayout.DeployableModel);
                OnnxAdapterFile.Write(outPath, adapter, new OnnxAdapterWriteOptions
                {
                    ElementType = elementType,
                    DeployableModel = deploy is not null && File.Exists(deploy) ? DeployableFor(adapter, OnnxFile.Load(deploy), deploy) : null,
                });
                break;
            case AdapterFormat.Peft:
                if (File.Exists(outPath)) throw new IOException($"{outPath}: is a file; a PEFT adapter is a folder");
                PeftAdapter.Write(outPath, adapter, peft);
                break;
            case AdapterFormat.Merged:
                var model = BaseModelOf(rewriteDir ?? throw new ArgumentException("a merged export needs the rewrite folder (--model DIR)"));
                if (Path.GetFullPath(outPath) == Path.GetFullPath(model))
                    throw new IOException($"{outPath}: is the input model; write the merged model somewhere else");
                var baseModel = OnnxFile.Load(model);
                ModelValidator.Check(baseModel, model);
                OnnxFile.Save(Merge(baseModel, adapter), outPath);
                break;
            case AdapterFormat.GenAi:
                if (File.Exists(outPath)) throw new IOException($"{outPath}: is a file; a genai model is a folder");
                Deployment.GenAiFolder.Write(adapter, rewriteDir ?? throw new ArgumentException("a genai export needs the rewrite folder (--model DIR)"), outPath, hfFolder);
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(format));
        }
    }

    /// <summary>
    /// The model to merge into: the rewrite's training view (model.onnx, its branches are stripped by the merge) or the
    /// deployable model.
    /// </summary>
    public static string BaseModelOf(string rewriteDir)
    {
        foreach (var name in new[] { RunLayout.TrainingModel, RunLayout.DeployableModel })
        {
            var p = Path.Combine(rewriteDir, name);
            if (File.Exists(p)) return p;
        }
        throw new FileNotFoundException($"{rewriteDir}: has neither {RunLayout.TrainingModel} nor {RunLayout.DeployableModel}; give an 'onnxlora rewrite' output folder");
    }

    /// <summary>
    /// The deployable model an adapter runs on: <paramref name="deploy"/> (the rewrite's deploy.onnx) for an LM adapter;
    /// for a classifier, deploy.onnx as it is when it is a classifier already, else the classifier built from it with
    /// the head as an overridable input (zero by default). One such model serves every adapter of its class count and pooling.
    /// </summary>
    public static ModelProto DeployableFor(LoraAdapter adapter, ModelProto deploy, string source)
    {
        if (adapter.Classifier is not { } info || deploy.Graph.Output.Any(o => o.Name == ClassHead.Output)) return deploy;
        return ClassHead.BuildClassifier(deploy, new float[adapter.Head!.Data.Length], info, headAsInput: true, source);
    }

    /// <summary>
    /// The merged model: the rewrite helper's <see cref="MergeLora"/> pass folds scale·A·B into each target's weight,
    /// and every extra (head) replaces the same-named initializer. The result has the base's inputs and outputs and
    /// runs in plain ONNX Runtime.
    /// </summary>
    public static ModelProto Merge(ModelProto model, LoraAdapter adapter)
    {
        var parameters = new Dictionary<string, TensorProto>(StringComparer.Ordinal);
        foreach (var (name, x) in adapter.LoraTensors) parameters[name] = Tensors.Float(name, x.Shape, x.Data);
        var (merged, _) = MergeLora.Run(model, adapter.Manifest, parameters, bIncludesScale: false);
        foreach (var (name, x) in adapter.Extras)
        {
            if (name == ClassHead.Weight) continue;   // baked into the classifier below
            var init = merged.Graph.Initializer.FirstOrDefault(i => i.Name == name)
                ?? throw new InvalidDataException($"merge: the model has no initializer '{name}' for the adapter's extra tensor; was the head added by another rewrite?");
            if (!init.Dims.SequenceEqual(x.Shape))
                throw new InvalidDataException($"merge: extra tensor '{name}' is [{string.Join(", ", x.Shape)}], the model's initializer is [{string.Join(", ", init.Dims)}]");
            var replacement = Tensors.FromDoubles(name, (DataType)init.DataType, x.Shape, Array.ConvertAll(x.Data, v => (double)v));
            init.ClearRawData(); init.FloatData.Clear(); init.DoubleData.Clear(); init.Int32Data.Clear();
            init.RawData = replacement.RawData;
        }
        if (adapter.Classifier is { } info)
            merged = ClassHead.BuildClassifier(merged, adapter.Head!.Data, info, headAsInput: false, "merge");
        return merged;
    }
}
