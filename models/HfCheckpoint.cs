using System.Text.Json;
using System.Text.Json.Nodes;

namespace OnnxLora.Models;

/// <summary>
/// A Hugging Face model folder: <c>config.json</c> and the weights, one <c>model.safetensors</c> or shards listed by
/// <c>model.safetensors.index.json</c> (<c>weight_map</c>: tensor → shard file). Every tensor remembers the file it
/// came from, so errors can name both.
/// </summary>
public sealed class HfCheckpoint
{
    /// <summary>The single-file weights name.</summary>
    public const string WeightsFile = "model.safetensors";

    /// <summary>The shard index name.</summary>
    public const string IndexFile = "model.safetensors.index.json";

    /// <summary>The config name.</summary>
    public const string ConfigFile = "config.json";

    HfCheckpoint(string directory, JsonObject config, Dictionary<string, (string File, SafeTensor Tensor)> tensors)
    {
        Directory = directory;
        Config = config;
        Tensors = tensors;
    }

    /// <summary>The folder.</summary>
    public string Directory { get; }

    /// <summary>Full path of config.json.</summary>
    public string ConfigPath => Path.Combine(Directory, ConfigFile);

    /// <summary>config.json's contents.</summary>
    public JsonObject Config { get; }

    /// <summary>Every tensor of every weights file, by its name in the file, with the file's path.</summary>
    public Dictionary<string, (string File, SafeTensor Tensor)> Tensors { get; }

    /// <summary><c>architectures[0]</c> (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, …), else the model_type.</summary>
    public string Architecture =>
        Config["architectures"] is JsonArray { Count: > 0 } a && a[0] is JsonValue v && v.TryGetValue<string>(out var s) ? s
        : Config["model_type"] is JsonValue t && t.TryGetValue<string>(out var mt) ? mt
        : throw new InvalidDataException($"{ConfigPath}: neither 'architectures' nor 'model_type' says what model this is");

    /// <summary>True when <paramref name="directory"/> looks like a Hugging Face model folder.</summary>
    public static bool IsCheckpointDirectory(string directory) =>
        System.IO.Directory.Exists(directory) && File.Exists(Path.Combine(directory, ConfigFile));

    /// <summary>Reads config.json and every weights file (sharded or not); checks the index against the shards.</summary>
    /// <exception cref="DirectoryNotFoundException">No such folder.</exception>
    /// <exception cref="FileNotFoundException">config.json or a weights file is missing.</exception>
    /// <exception cref="InvalidDataException">A file is malformed, or the index and the shards disagree.</exception>
    public static HfCheckpoint Open(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        if (!System.IO.Directory.Exists(directory)) throw new DirectoryNotFoundException($"{directory}: no such folder (a Hugging Face model folder holds {ConfigFile} and {WeightsFile})");
        var configPath = Path.Combine(directory, ConfigFile);
        var config = ReadJson(configPath, $"a Hugging Face model folder needs {ConfigFile} beside the weights");

        var tensors = new Dictionary<string, (string, SafeTensor)>(StringComparer.Ordinal);
        var indexPath = Path.Combine(directory, IndexFile);
        var single = Path.Combine(directory, WeightsFile);
        if (File.Exists(indexPath))
        {
            var index = ReadJson(indexPath, "");
            if (index["weight_map"] is not JsonObject map || map.Count == 0) throw new InvalidDataException($"{indexPath}: no 'weight_map' (tensor name → shard file)");
            var byShard = new Dictionary<string, List<string>>(StringComparer.Ordinal);
            foreach (var (name, node) in map)
            {
                var shard = node is JsonValue v && v.TryGetValue<string>(out var s) ? s : throw new InvalidDataException($"{indexPath}: weight_map['{name}'] is not a file name");
                // shards live in the folder: a path that leaves it is refused rather than read
                if (shard.Length == 0 || shard != Path.GetFileName(shard) || shard is "." or "..")
                    throw new InvalidDataException($"{indexPath}: weight_map['{name}'] = '{shard}' is not a file name in the folder");
                if (!byShard.TryGetValue(shard, out var names)) byShard[shard] = names = [];
                names.Add(name);
            }
            foreach (var (shard, names) in byShard)
            {
                var path = Path.Combine(directory, shard);
                if (!File.Exists(path)) throw new FileNotFoundException($"{path}: missing shard ({indexPath} maps '{names[0]}' to it)", path);
                var (read, _) = SafeTensorsFile.Read(path);
                foreach (var name in names)
                {
                    if (!read.Remove(name, out var t)) throw new InvalidDataException($"{path}: no tensor '{name}', though {IndexFile} maps it to this shard");
                    tensors[name] = (path, t);
                }
                if (read.Count > 0) throw new InvalidDataException($"{path}: tensor '{read.Keys.First()}' is not in {IndexFile}'s weight_map");
            }
        }
        else if (File.Exists(single))
        {
            foreach (var (name, t) in SafeTensorsFile.Read(single).Tensors) tensors[name] = (single, t);
        }
        else throw new FileNotFoundException($"{directory}: no {WeightsFile} or {IndexFile} (only safetensors weights are read; convert a pytorch_model.bin with save_pretrained(safe_serialization=True))", single);
        return new HfCheckpoint(directory, config, tensors);
    }

    static JsonObject ReadJson(string path, string hint)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file{(hint.Length > 0 ? $"; {hint}" : "")}", path);
        try { return JsonNode.Parse(File.ReadAllText(path))?.AsObject() ?? throw new InvalidDataException($"{path}: empty JSON"); }
        catch (Exception e) when (e is JsonException or InvalidOperationException) { throw new InvalidDataException($"{path}: not a JSON object ({e.Message})", e); }
    }
}
