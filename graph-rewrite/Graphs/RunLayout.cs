namespace OnnxLora.GraphRewrite.Graphs;

/// <summary>
/// The file names of the folders OnnxLora writes, each spelled once and used from here.
/// <code>
/// rewrite folder   (onnxlora rewrite --out)   model.onnx  deploy.onnx  lora_config.json
/// run folder       (onnxlora train --out)     train_config.json  lora_config.json  artifacts/  checkpoint.safetensors
///                                             metrics.jsonl  loss.png  adapter.safetensors  adapter.onnx_adapter
///                                             deploy.onnx (a classifier's)
/// artifacts folder (RUN_DIR/artifacts)        train.onnx  eval.onnx  optimizer.onnx  initial_params.onnx  artifacts.json
/// pipeline folder  (onnxlora run)             stages.json  model/base.onnx  data/  rewrite/  train/  evaluation.json
///                                             export/ (adapter.onnx_adapter, peft/, genai/, merged.onnx)
/// </code>
/// </summary>
public static class RunLayout
{
    // rewrite folder
    /// <summary>The training view: LoRA A/B are graph inputs with their initial values as defaults.</summary>
    public const string TrainingModel = "model.onnx";
    /// <summary>The deployable model: A/B are inputs with zero-rank defaults (ONNX Runtime's LoRA API), no scale node.</summary>
    public const string DeployableModel = "deploy.onnx";
    /// <summary>The rewrite's manifest (LoraManifest); a run folder holds a copy.</summary>
    public const string LoraConfig = "lora_config.json";

    // run folder
    public const string TrainConfig = "train_config.json", ArtifactsDir = "artifacts", Checkpoint = "checkpoint.safetensors",
                        Metrics = "metrics.jsonl", LossPlot = "loss.png", Adapter = "adapter.safetensors", OnnxAdapter = "adapter.onnx_adapter";

    // artifacts folder
    public const string ArtifactsSpec = "artifacts.json", TrainModel = "train.onnx", EvalModel = "eval.onnx",
                        OptimizerModel = "optimizer.onnx", InitialParams = "initial_params.onnx";

    // pipeline folder
    public const string Stages = "stages.json", Evaluation = "evaluation.json", BaseModel = "base.onnx", Merged = "merged.onnx",
                        ModelDir = "model", DataDir = "data", RewriteDir = "rewrite", TrainDir = "train", ExportDir = "export", PeftDir = "peft", GenAiDir = "genai";

    /// <summary>The adapter files a run folder holds, in the order they are preferred.</summary>
    public static readonly IReadOnlyList<string> RunAdapters = [Adapter, OnnxAdapter];
}
