using Onnx;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Onnx;
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
        var (tensors, _) = Models.SafeTensorsFile.Read(path);
        var names = manifest.Targets.SelectMany(t => new[] { t.LoraA, t.LoraB }).ToHashSet(StringComparer.Ordinal);
        var lora = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
        var extras = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
        foreach (var (name, t) in tensors)
        {
            if (name.StartsWith(PeftAdapter.Prefix, StringComparison.Ordinal))
                throw new InvalidDataException($"{path}: tensor '{name}' has PEFT's naming; put the file in a folder as {PeftAdapter.WeightsFile} with its {PeftAdapter.ConfigFile}");
            var x = new AdapterTensor(t.Shape, t.ToFloats());
            if (names.Contains(name) || name.Contains(".lora_", StringComparison.Ordinal)) lora[name] = x;
            else extras[name] = x;
        }
        return LoraAdapter.Create(manifest, lora, extras, path);
    }

    /// <summary>The adapter files a training run folder (RUN_DIR) holds, in the order they are preferred.</summary>
    public static readonly IReadOnlyList<string> RunDirAdapterFiles = ["adapter.safetensors", "adapter.onnx_adapter"];

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
        if (Directory.Exists(source) && File.Exists(Path.Combine(source, LoraManifest.FileName)) && !PeftAdapter.IsPeftDirectory(source))
        {
            var runManifest = LoraManifest.Load(Path.Combine(source, LoraManifest.FileName));
            var file = RunDirAdapterFiles.Select(f => Path.Combine(source, f)).FirstOrDefault(File.Exists)
                ?? throw new FileNotFoundException($"{source}: a run folder without {string.Join(" or ", RunDirAdapterFiles)}; has training finished?");
            return (Read(file, runManifest), rewriteDir ?? RunModelDir(source) ?? source);
        }
        rewriteDir ??= new[] { source, Path.GetDirectoryName(Path.GetFullPath(source)) }
            .FirstOrDefault(d => d is not null && File.Exists(Path.Combine(d, LoraManifest.FileName)))
            ?? throw new ArgumentException($"{source}: which model does this adapter belong to? Give --model DIR, the 'onnxlora rewrite' output folder (with {LoraManifest.FileName})");
        var manifest = LoraManifest.Load(Path.Combine(rewriteDir, LoraManifest.FileName));
        return (Read(source, manifest), rewriteDir);
    }

    /// <summary>The rewrite folder a training run was made from (train_config.json's model_dir), when it still exists.</summary>
    static string? RunModelDir(string runDir)
    {
        var config = Path.Combine(runDir, "train_config.json");
        if (!File.Exists(config)) return null;
        string? dir;
        try { dir = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(config))?["model_dir"]?.GetValue<string>(); }
        catch (System.Text.Json.JsonException e) { throw new InvalidDataException($"{config}: not valid JSON ({e.Message})", e); }
        if (dir is null) return null;
        return new[] { dir, Path.Combine(runDir, dir) }.FirstOrDefault(d => File.Exists(Path.Combine(d, LoraManifest.FileName)));
    }

    /// <summary>
    /// Bytes an <see cref="Deployment.AdapterHost"/> loads: an <c>.onnx_adapter</c> file as is, or a PEFT folder converted
    /// with <paramref name="manifest"/> (needed for PEFT only).
    /// </summary>
    public static byte[] DeployableBytes(string path, LoraManifest? manifest)
    {
        if (File.Exists(path) && Path.GetFileName(path) != PeftAdapter.WeightsFile) return File.ReadAllBytes(path);
        if (manifest is null)
            throw new ArgumentException($"{path}: a PEFT adapter needs the rewrite's {LoraManifest.FileName} to map its modules; give --model the rewrite folder, or convert it with 'onnxlora export --format onnx-adapter'");
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
                var deploy = rewriteDir is null ? null : Path.Combine(rewriteDir, LoraManifest.DeployableModelFile);
                OnnxAdapterFile.Write(outPath, adapter, new OnnxAdapterWriteOptions
                {
                    ElementType = elementType,
                    DeployableModel = deploy is not null && File.Exists(deploy) ? OnnxFile.Load(deploy) : null,
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
        foreach (var name in new[] { LoraManifest.TrainingModelFile, LoraManifest.DeployableModelFile })
        {
            var p = Path.Combine(rewriteDir, name);
            if (File.Exists(p)) return p;
        }
        throw new FileNotFoundException($"{rewriteDir}: has neither {LoraManifest.TrainingModelFile} nor {LoraManifest.DeployableModelFile}; give an 'onnxlora rewrite' output folder");
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
            var init = merged.Graph.Initializer.FirstOrDefault(i => i.Name == name)
                ?? throw new InvalidDataException($"merge: the model has no initializer '{name}' for the adapter's extra tensor; was the head added by another rewrite?");
            if (!init.Dims.SequenceEqual(x.Shape))
                throw new InvalidDataException($"merge: extra tensor '{name}' is [{string.Join(", ", x.Shape)}], the model's initializer is [{string.Join(", ", init.Dims)}]");
            var replacement = Tensors.FromDoubles(name, (DataType)init.DataType, x.Shape, Array.ConvertAll(x.Data, v => (double)v));
            init.ClearRawData(); init.FloatData.Clear(); init.DoubleData.Clear(); init.Int32Data.Clear();
            init.RawData = replacement.RawData;
        }
        return merged;
    }
}
