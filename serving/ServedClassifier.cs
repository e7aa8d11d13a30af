using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Runtime;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Serving;

/// <summary>
/// A classifier the server answers <c>POST /v1/classify</c> with: a <c>train --task cls</c> run folder's
/// <c>deploy.onnx</c> (output <c>class_logits</c>, the head an overridable input) with the run's adapter active, or a
/// merged classifier <c>.onnx</c>. Owns its <see cref="AdapterHost"/>.
/// </summary>
public sealed class ServedClassifier : IDisposable
{
    ServedClassifier(string name, AdapterHost host, Classifier classifier, TextTokenizer tokenizer, string? adapter)
    {
        Name = name;
        Host = host;
        Classifier = classifier;
        Tokenizer = tokenizer;
        Adapter = adapter;
    }

    /// <summary>The model id requests name.</summary>
    public string Name { get; }
    public AdapterHost Host { get; }
    public Classifier Classifier { get; }

    /// <summary>Turns the request's text into ids (a WordPiece tokenizer adds [CLS] … [SEP], as the encoder was trained).</summary>
    public TextTokenizer Tokenizer { get; }

    /// <summary>The adapter name in <see cref="Host"/> (null for a merged classifier).</summary>
    public string? Adapter { get; }

    /// <summary>
    /// Loads <paramref name="path"/>: a run folder (its deploy.onnx and its adapter; label names from the run, else
    /// from the model's classifier metadata) or a merged classifier model file.
    /// </summary>
    public static ServedClassifier Load(string name, string path, TextTokenizer tokenizer, ExecutionDevice? device = null)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(name);
        bool run = Directory.Exists(path);
        var model = run ? Path.Combine(path, RunLayout.DeployableModel) : path;
        if (run && !AdapterFiles.IsRunDir(path)) throw new ArgumentException($"--classifier {name}={path}: not a training run folder ({RunLayout.LoraConfig} and adapter.safetensors); give a 'train --task cls' run or a merged classifier .onnx");
        var host = AdapterHost.Create(model, new AdapterHostOptions { Device = device ?? ExecutionDevice.Cpu });
        try
        {
            if (run) host.AddAdapter(name, AdapterFiles.DeployableBytes(path, null), path);
            var labels = (run ? AdapterFiles.ClassifierOf(path, null)?.Labels : null) ?? ClassHead.ReadInfo(host.ModelMetadata, model)?.Labels;
            var classifier = new Classifier(host, tokenizer.Inner, new ClassifierOptions { Labels = labels });
            return new ServedClassifier(name, host, classifier, tokenizer, run ? name : null);
        }
        catch
        {
            host.Dispose();
            throw;
        }
    }

    public void Dispose() => Host.Dispose();
}
