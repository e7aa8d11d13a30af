using System.Net.Http.Headers;
using System.Text;
using System.Text.Json.Nodes;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Deployment.Chat;
using OnnxLora.Serving;
using OnnxLora.Tests.Deployment;
using OnnxLora.Tests.Models;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Tests.Serving;

/// <summary>
/// A real <c>onnxlora serve</c> on 127.0.0.1 (port 0) over a tiny GPT-2 with a KV cache (the committed Optimum export,
/// vocabulary 300) and two random nonzero adapters, a byte-level BPE tokenizer with a ChatML chat template, and a
/// classifier trained by <c>train --task cls</c>; beside it a second host with the same files, the reference every
/// answer is compared against (<see cref="TextGenerator"/> and <see cref="Classifier"/> called directly, one request at a time).
/// </summary>
sealed class ServingFixture : IAsyncDisposable
{
    public const string Base = "tiny";
    /// <summary>A short template (the tiny model sees 64 positions): each message as its role's initial, ':', the content, a line; then "a:".</summary>
    public const string ChatTemplateSource = "{% for message in messages %}{{ message['role'][0] + ':' + message['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'a:' }}{% endif %}";

    public TempDir Dir { get; } = new();
    public LoraServer Server { get; private set; } = null!;
    public HttpClient Http { get; private set; } = null!;
    public string AdapterRoot => Dir.File("adapters");
    public LoraManifest Manifest { get; private set; } = null!;
    public TextTokenizer Tokenizer { get; private set; } = null!;
    public ChatTemplate Template { get; private set; } = null!;
    public TextGenerator Reference { get; private set; } = null!;
    public Classifier ReferenceClassifier { get; private set; } = null!;
    public IReadOnlyList<string> ClassLabels { get; } = ["low", "high"];
    AdapterHost _referenceHost = null!, _referenceClassifierHost = null!;

    public static async Task<ServingFixture> StartAsync(Func<ServerOptions, ServerOptions>? configure = null, bool classifier = true, bool chat = true)
    {
        var f = new ServingFixture();
        await f.Start(configure, classifier, chat);
        return f;
    }

    /// <summary>
    /// The files a server is started from, in <paramref name="dir"/>: rw/ (the rewrite of the Optimum GPT-2 with past),
    /// adapters/a.onnx_adapter and b.onnx_adapter (random, nonzero), tokenizer/ (tokenizer.json, tokenizer_config.json
    /// with the chat template when <paramref name="chat"/>). Returns the manifest.
    /// </summary>
    public static LoraManifest WriteFiles(TempDir dir, bool chat = true)
    {
        var manifest = LoraRewrite.RewriteFile(Fixture("optimum/gpt2_opset17_with_past.onnx"), new LoraConfig { Rank = 4, Alpha = 8, TargetModules = ["c_attn", "c_proj"] }, dir.File("rw")).Manifest;
        var adapters = dir.File("adapters");
        Directory.CreateDirectory(adapters);
        OnnxAdapterFile.Write(Path.Combine(adapters, "a.onnx_adapter"), LoraAdapter.CreateRandom(manifest, seed: 5, amplitude: 0.5));
        OnnxAdapterFile.Write(Path.Combine(adapters, "b.onnx_adapter"), LoraAdapter.CreateRandom(manifest, seed: 9, amplitude: 0.5));
        var tokenizerDir = dir.File("tokenizer");
        Directory.CreateDirectory(tokenizerDir);
        using (var t = new TempDir())
        {
            File.Copy(TokenizerTests.WriteTokenizerJson(t, TokenizerTests.ByteLevel()), Path.Combine(tokenizerDir, TextTokenizer.TokenizerJson));
        }
        var config = new JsonObject { ["eos_token"] = "<|endoftext|>" };
        if (chat) config["chat_template"] = ChatTemplateSource;
        File.WriteAllText(Path.Combine(tokenizerDir, "tokenizer_config.json"), config.ToJsonString());
        return manifest;
    }

    async Task Start(Func<ServerOptions, ServerOptions>? configure, bool withClassifier, bool withChat)
    {
        Manifest = WriteFiles(Dir, withChat);
        var tokenizerDir = Dir.File("tokenizer");
        Tokenizer = TextTokenizer.Load(tokenizerDir);
        Template = ChatTemplate.Load(tokenizerDir)!;

        var deploy = Path.Combine(Dir.File("rw"), RunLayout.DeployableModel);
        _referenceHost = Open(deploy);
        Reference = new TextGenerator(_referenceHost, Tokenizer.Inner);

        var classifiers = new List<ServedClassifier>();
        if (withClassifier)
        {
            var run = TrainClassifier();
            classifiers.Add(ServedClassifier.Load("cls", run, Tokenizer));
            _referenceClassifierHost = AdapterHost.Create(Path.Combine(run, RunLayout.DeployableModel));
            _referenceClassifierHost.AddAdapter("cls", AdapterFiles.DeployableBytes(run, null));
            ReferenceClassifier = new Classifier(_referenceClassifierHost, Tokenizer.Inner, new ClassifierOptions { Labels = ClassLabels });
        }
        var options = new ServerOptions { Port = 0, ServedModelName = Base, AdapterRoot = AdapterRoot, ContextLength = 64, MaxTokens = 48, MaxPromptTokens = 200, MaxBodyBytes = 64 * 1024 };
        Server = new LoraServer(Open(deploy), Tokenizer, configure?.Invoke(options) ?? options, withChat ? ChatTemplate.Load(tokenizerDir) : null, classifiers);
        await Server.StartAsync();
        Http = new HttpClient { BaseAddress = Server.Address };
    }

    AdapterHost Open(string deploy)
    {
        var host = AdapterHost.Create(deploy);
        host.AddAdapter("a", Path.Combine(AdapterRoot, "a.onnx_adapter"));
        host.AddAdapter("b", Path.Combine(AdapterRoot, "b.onnx_adapter"));
        return host;
    }

    /// <summary>A two-class run of `train --task cls` on the Optimum GPT-2 without cache; the class is whether the row starts low.</summary>
    string TrainClassifier()
    {
        var rng = new Random(3);
        var data = Dir.File("cls.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 16).Select(i =>
        {
            int label = i % 2;
            var ids = Enumerable.Range(0, rng.Next(3, 8)).Select(j => j == 0 ? (label == 0 ? rng.Next(1, 50) : rng.Next(200, 262)) : rng.Next(100, 150));
            return new JsonObject { ["input_ids"] = new JsonArray(ids.Select(x => (JsonNode?)x).ToArray()), ["label"] = label }.ToJsonString();
        }));
        var rw = Dir.File("cls-rw");
        var run = Dir.File("cls-run");
        foreach (var args in new[]
        {
            new[] { "rewrite", Fixture("optimum/gpt2_opset17.onnx"), "--out", rw, "--rank", "2" },
            ["train", "--model", rw, "--data", data, "--format", "tokens", "--task", "cls", "--labels", string.Join(',', ClassLabels), "--out", run, "--max-steps", "3", "--lr", "5e-2", "--threads", "1"],
        })
        {
            var (code, output, error) = CliRunner.Run(args);
            Assert.That(code, Is.EqualTo(0), $"onnxlora {string.Join(' ', args)}\n{output}\n{error}");
        }
        return run;
    }

    static string Fixture(string path) => Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", path);

    /// <summary>What <paramref name="adapter"/> generates for <paramref name="prompt"/> alone, straight from the generator.</summary>
    public GenerationResult Alone(string prompt, string? adapter, int maxTokens, double temperature = 0, int? seed = null) =>
        Reference.Generate(Tokenizer.Encode(prompt), new GenerationOptions
        {
            MaxNewTokens = maxTokens, Sampling = new SamplingOptions { Temperature = temperature, Seed = seed }, StopTokenIds = [Tokenizer.EndOfText],
        }, adapter);

    public async Task<(int Status, JsonObject Body)> Post(string route, JsonObject body)
    {
        using var response = await Http.PostAsync(route, new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        return ((int)response.StatusCode, await Json(response));
    }

    public static async Task<JsonObject> Json(HttpResponseMessage response)
    {
        var text = await response.Content.ReadAsStringAsync();
        return JsonNode.Parse(text) as JsonObject ?? throw new AssertionException($"{(int)response.StatusCode}: not a JSON object: {text}");
    }

    /// <summary>POSTs a streaming request and returns every <c>data:</c> event, [DONE] included, after checking the content type.</summary>
    public async Task<List<string>> Events(string route, JsonObject body)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, route) { Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json") };
        using var response = await Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.That((int)response.StatusCode, Is.EqualTo(200), await response.Content.ReadAsStringAsync());
        Assert.That(response.Content.Headers.ContentType, Is.EqualTo(MediaTypeHeaderValue.Parse("text/event-stream")));
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        var events = new List<string>();
        while (await reader.ReadLineAsync() is { } line)
        {
            if (line.Length == 0) continue;
            Assert.That(line, Does.StartWith("data: "), "server-sent events carry data lines only");
            events.Add(line["data: ".Length..]);
        }
        return events;
    }

    public async ValueTask DisposeAsync()
    {
        Http?.Dispose();
        if (Server is not null) await Server.DisposeAsync();
        _referenceHost?.Dispose();
        _referenceClassifierHost?.Dispose();
        Dir.Dispose();
    }
}
