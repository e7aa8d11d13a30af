using Onnx;

namespace OnnxLora.Models;

/// <summary>Builds the ONNX model of a Hugging Face folder, for the architectures OnnxLora knows.</summary>
public static class HfModels
{
    /// <summary>The <c>architectures[0]</c> values that can be imported.</summary>
    public static IReadOnlyList<string> Architectures { get; } = ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"];

    /// <summary>
    /// Reads <paramref name="directory"/> (<see cref="HfCheckpoint"/>), checks every tensor against its config.json and
    /// builds the model (<see cref="GptBuilder"/> or <see cref="LlamaBuilder"/>). Returns the model, a one-line
    /// description and the parameter count.
    /// </summary>
    /// <param name="withPast">the with-past form (<see cref="KvCache"/>)</param>
    /// <exception cref="InvalidDataException">An unsupported architecture, or weights that do not fit the config.</exception>
    public static (ModelProto Model, string Description, long Parameters) Build(string directory, bool withPast = false)
    {
        var checkpoint = HfCheckpoint.Open(directory);
        var architecture = checkpoint.Architecture;
        switch (architecture)
        {
            case "GPT2LMHeadModel" or "GPT2Model" or "gpt2":
                var gpt = GptWeights.FromCheckpoint(checkpoint);
                return (GptBuilder.Build(gpt.Config, gpt, withPast), $"GPT-2 {gpt.Config}", gpt.ParameterCount);
            case "LlamaForCausalLM" or "Qwen2ForCausalLM" or "MistralForCausalLM" or "llama" or "qwen2" or "mistral":
                var llama = LlamaWeights.FromCheckpoint(checkpoint);
                return (LlamaBuilder.Build(llama, withPast), llama.Config.ToString(), llama.ParameterCount);
            default:
                throw new InvalidDataException($"{checkpoint.ConfigPath}: architecture '{architecture}' cannot be imported; supported: {string.Join(", ", Architectures)}");
        }
    }
}
