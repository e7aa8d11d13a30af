using System.Diagnostics;
using System.Reflection;
using System.Text.Json;
using Microsoft.ML.OnnxRuntimeGenAI;

namespace OnnxLora.GenAI.Tests;

/// <summary>
/// ONNX Runtime GenAI opens what <c>onnxlora export --format genai</c> writes, and its greedy search gives the tokens
/// <c>onnxlora generate</c> gives, on the base model and with a trained adapter applied through GenAI's Adapters API.
/// The onnxlora CLI runs in its own process (it loads the GPU ONNX Runtime; this process loads GenAI's CPU one).
/// </summary>
public class GenAiFolderTests
{
    static readonly string Cli = typeof(GenAiFolderTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "OnnxLoraCli").Value!;

    [TestCase("gpt2", "c_attn,c_fc")]
    [TestCase("llama", "q_proj,v_proj,up_proj")]
    public void GenAiGeneratesTheTokensOnnxLoraGenerates(string arch, string targets)
    {
        var dir = Directory.CreateTempSubdirectory("onnxlora-genai-").FullName;
        try
        {
            string F(string name) => Path.Combine(dir, name);
            Run("model", "build", "--arch", arch, "--preset", "tiny", "--seed", "2", "--with-past", "--out", F("model.onnx"));
            Run("rewrite", F("model.onnx"), "--out", F("rw"), "--rank", "4", "--targets", targets);
            var rng = new Random(1);
            File.WriteAllLines(F("train.jsonl"), Enumerable.Range(0, 24).Select(_ =>
            {
                int n = rng.Next(3, 13), start = rng.Next(1, 200);
                return JsonSerializer.Serialize(new { input_ids = Enumerable.Range(0, n).Select(j => start + 7 * j % 90).ToArray() });
            }));
            Run("train", "--model", F("rw"), "--data", F("train.jsonl"), "--format", "tokens", "--out", F("run"),
                "--max-steps", "8", "--batch", "4", "--lr", "2e-2", "--threads", "1");
            Run("export", F("run"), "--format", "genai", "--out", F("genai"));
            var config = JsonDocument.Parse(File.ReadAllText(F("genai/genai_config.json"))).RootElement.GetProperty("model");
            int eos = config.GetProperty("eos_token_id").GetInt32();

            int[] prompt = [5, 12, 19, 40];
            const int newTokens = 12;
            List<int> Ours(params string[] adapter)
            {
                var output = Run(["generate", "--model", F("rw"), "--ids", string.Join(",", prompt), "-n", newTokens.ToString(), .. adapter]);
                return output.Trim().Split('\n')[^1].Split(',').Select(int.Parse).ToList();
            }
            var oursBase = Ours();
            var oursAdapter = Ours("--adapter", F("genai/adapter.onnx_adapter"));
            Assert.That(oursAdapter, Is.Not.EqualTo(oursBase), "the trained adapter changes the tokens (else the comparison shows nothing)");

            Model model;
            try { model = new Model(F("genai")); }
            catch (Exception e) when (e is DllNotFoundException or TypeInitializationException or EntryPointNotFoundException or BadImageFormatException)
            {
                Assert.Ignore($"ONNX Runtime GenAI's native library does not load here: {e.GetType().Name}: {e.Message}");
                return;
            }
            using (model)
            using (var adapters = new Adapters(model))
            {
                adapters.LoadAdapter(F("genai/adapter.onnx_adapter"), "task");
                List<int> Theirs(string? adapter)
                {
                    using var parameters = new GeneratorParams(model);
                    parameters.SetSearchOption("max_length", prompt.Length + newTokens);
                    using var generator = new Generator(model, parameters);
                    if (adapter is not null) generator.SetActiveAdapter(adapters, adapter);
                    generator.AppendTokens(prompt);
                    while (!generator.IsDone()) generator.GenerateNextToken();
                    return generator.GetSequence(0).ToArray().Skip(prompt.Length).ToList();
                }
                // GenAI stops at eos (and keeps it); onnxlora generate --ids has no stop token: compare up to eos
                List<int> UpToEos(List<int> tokens) => tokens.TakeWhile(t => t != eos).ToList();
                Assert.That(UpToEos(Theirs(null)), Is.EqualTo(UpToEos(oursBase)), $"{arch}: GenAI vs onnxlora generate, base model");
                Assert.That(UpToEos(Theirs("task")), Is.EqualTo(UpToEos(oursAdapter)), $"{arch}: GenAI vs onnxlora generate, with the adapter");
                Assert.That(UpToEos(oursBase), Has.Count.GreaterThan(3), "enough tokens before eos to compare");
            }
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    /// <summary>Runs the onnxlora CLI; returns its stdout, failing the test with its stderr on a non-zero exit.</summary>
    static string Run(params string[] args)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(Cli);
        foreach (var a in args) start.ArgumentList.Add(a);
        using var process = Process.Start(start)!;
        var stderr = process.StandardError.ReadToEndAsync();
        var stdout = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        Assert.That(process.ExitCode, Is.EqualTo(0), $"onnxlora {string.Join(' ', args)}: {stderr.Result}");
        return stdout;
    }
}
