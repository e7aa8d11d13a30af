using System.Globalization;
using System.Reflection;
using System.Security.Cryptography;
using Onnx;
using OnnxLora.GraphRewrite.Onnx;
using OnnxLora.GraphRewrite.Signature;

namespace OnnxLora.GraphRewrite.Lora;

/// <summary>What a rewrite produced: both models, the manifest and the parameter counts.</summary>
public sealed record LoraRewriteResult(ModelProto TrainingModel, ModelProto DeployableModel, LoraManifest Manifest,
                                       IReadOnlyList<LoraSelection> Targets, long TrainableParameters, long BaseParameters)
{
    /// <summary>All parameters of the training view: the base's float initializers plus the LoRA parameters.</summary>
    public long AllParameters => BaseParameters + TrainableParameters;

    /// <summary>PEFT's print_trainable_parameters line: "trainable params: N || all params: M || trainable%: x".</summary>
    public string ParameterLine => LoraRewrite.ParameterLine(TrainableParameters, AllParameters);
}

/// <summary>
/// The whole rewrite: discover linears, select targets, build the training view and the deployable model, describe
/// them in a manifest, and write the output folder. Output folder layout (written atomically: built as DIR.tmp-…, then
/// renamed into place):
/// <c>DIR/model.onnx</c> (training view), <c>DIR/deploy.onnx</c> (deployable model), <c>DIR/lora_config.json</c> (manifest).
/// </summary>
public static class LoraRewrite
{
    /// <summary>The tool version recorded in manifests (the assembly's informational version).</summary>
    public static string ToolVersion { get; } =
        typeof(LoraRewrite).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion.Split('+')[0] ?? "0.0.0";

    /// <summary>
    /// Rewrites an in-memory model. <paramref name="baseModel"/> and <paramref name="baseSha256"/> go into the manifest.
    /// Every input must have a role (<see cref="SignatureRoles"/>); <paramref name="inputRoles"/> names those the names do
    /// not tell, and is recorded in both models' metadata so that training and deployment feed the same roles.
    /// </summary>
    public static LoraRewriteResult Rewrite(ModelProto model, LoraConfig config, string baseModel, string baseSha256,
                                            IReadOnlyDictionary<string, RoleOverride>? inputRoles = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(config);
        var roleOverrides = SignatureRoles.Merge(SignatureRoles.FromMetadata(model.MetadataProps.Select(p => KeyValuePair.Create(p.Key, p.Value)), baseModel), inputRoles);
        // a model fed token ids must have a role for every input: one nobody can feed fails here, before any work
        if (SignatureRoles.TakesTokens(model)) SignatureRoles.Decide(model, roleOverrides, baseModel);
        var layers = LinearLayers.Discover(model);
        var targets = LoraTargeting.Select(layers, config);
        var (training, _) = InjectLora.Run(model, targets, config);
        var (deployable, _) = BuildDeployable.Run(model, targets);
        SignatureRoles.WriteMetadata(training, roleOverrides);
        SignatureRoles.WriteMetadata(deployable, roleOverrides);
        var manifest = new LoraManifest
        {
            ToolVersion = ToolVersion, BaseModel = baseModel, BaseModelSha256 = baseSha256,
            Rank = config.Rank, Alpha = config.Alpha, Scaling = config.Scaling, Dropout = config.Dropout,
            Init = config.Init.ToString().ToLowerInvariant(), Seed = config.Seed,
            TargetModules = config.TargetModules, ExcludeModules = config.ExcludeModules, LayersToTransform = config.LayersToTransform,
            RankPattern = config.RankPattern, AlphaPattern = config.AlphaPattern,
            DropoutTrainingModeInput = config.Dropout > 0 ? InjectLora.DropoutTrainingModeInput : null,
            Targets = targets.Select(t => t.ToTarget()).ToList(),
        };
        return new LoraRewriteResult(training, deployable, manifest, targets, targets.Sum(t => t.Parameters), CountParameters(model));
    }

    /// <summary>Loads <paramref name="modelPath"/>, rewrites it and writes <paramref name="outDir"/> atomically.</summary>
    /// <exception cref="IOException"><paramref name="outDir"/> exists and is not a previous rewrite output (no lora_config.json).</exception>
    public static LoraRewriteResult RewriteFile(string modelPath, LoraConfig config, string outDir, IReadOnlyDictionary<string, RoleOverride>? inputRoles = null)
    {
        CheckOutputDir(outDir);
        var full = Path.GetFullPath(modelPath);
        if (Path.GetFullPath(outDir) == Path.GetDirectoryName(full))
            throw new IOException($"{outDir}: the output folder is the base model's folder; choose another --out");
        var model = OnnxFile.Load(modelPath);
        var result = Rewrite(model, config, modelPath, Sha256(modelPath), inputRoles);
        WriteOutput(outDir, result.TrainingModel, result.DeployableModel, result.Manifest);
        return result;
    }

    /// <summary>Refuses an existing folder that is not a previous rewrite output.</summary>
    public static void CheckOutputDir(string dir)
    {
        if (File.Exists(dir)) throw new IOException($"{dir}: is a file; --out needs a folder");
        if (Directory.Exists(dir) && Directory.EnumerateFileSystemEntries(dir).Any() && !File.Exists(Path.Combine(dir, LoraManifest.FileName)))
            throw new IOException($"{dir}: exists and is not an 'onnxlora rewrite' output (no {LoraManifest.FileName}); choose a new --out or remove it");
    }

    /// <summary>
    /// Writes model.onnx, deploy.onnx and lora_config.json into a sibling temp folder, then swaps it into place, so
    /// <paramref name="dir"/> is never half-written. A previous rewrite output at <paramref name="dir"/> is replaced.
    /// </summary>
    public static void WriteOutput(string dir, ModelProto training, ModelProto deployable, LoraManifest manifest)
    {
        CheckOutputDir(dir);
        var full = Path.GetFullPath(dir).TrimEnd(Path.DirectorySeparatorChar);
        var tmp = $"{full}.tmp-{Guid.NewGuid().ToString("N")[..8]}";
        try
        {
            Directory.CreateDirectory(tmp);
            OnnxFile.Save(training, Path.Combine(tmp, LoraManifest.TrainingModelFile));
            OnnxFile.Save(deployable, Path.Combine(tmp, LoraManifest.DeployableModelFile));
            manifest.Save(Path.Combine(tmp, LoraManifest.FileName));
            string? old = null;
            if (Directory.Exists(full))
            {
                old = $"{full}.old-{Guid.NewGuid():N}";
                Directory.Move(full, old);
            }
            Directory.Move(tmp, full);
            if (old is not null) Directory.Delete(old, recursive: true);
        }
        catch
        {
            if (Directory.Exists(tmp)) Directory.Delete(tmp, recursive: true);
            throw;
        }
    }

    /// <summary>PEFT's print_trainable_parameters line for the given counts (all = base + trainable).</summary>
    public static string ParameterLine(long trainable, long all) => string.Create(CultureInfo.InvariantCulture,
        $"trainable params: {trainable:N0} || all params: {all:N0} || trainable%: {100.0 * trainable / all:F4}");

    /// <summary>Parameters of a model as PEFT counts them: elements of its float initializers (weights, biases, LayerNorm).</summary>
    public static long CountParameters(ModelProto model) =>
        model.Graph.Initializer.Where(t => Tensors.IsFloatType(t.DataType)).Sum(Tensors.ElementCount);

    /// <summary>SHA-256 of a file, lower-case hex.</summary>
    public static string Sha256(string path)
    {
        using var s = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(s));
    }
}
