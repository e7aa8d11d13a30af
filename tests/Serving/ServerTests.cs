using System.ClientModel;
using System.Text;
using System.Text.Json.Nodes;
using OnnxLora.Pipeline.Deployment.Chat;
using OnnxLora.Serving;
using OpenAI;
using OpenAI.Chat;

namespace OnnxLora.Tests.Serving;

/// <summary>
/// <c>onnxlora serve</c> driven as clients drive it: the official OpenAI .NET client (models, chat, chat streaming) and
/// plain HTTP where that client has no route (its 2.x API dropped legacy completions; classify and adapter loading
/// are vLLM's). Every generated text is compared with what the generator gives the same request alone.
/// </summary>
[NonParallelizable]
public class ServerTests
{
    ServingFixture _f = null!;
    OpenAIClient _openAi = null!;

    [OneTimeSetUp]
    public async Task Start()
    {
        _f = await ServingFixture.StartAsync();
        _openAi = new OpenAIClient(new ApiKeyCredential("any key"), new OpenAIClientOptions { Endpoint = new Uri(_f.Server.Address!, "v1") });
    }

    [OneTimeTearDown]
    public async Task Stop() => await _f.DisposeAsync();

    [Test]
    public async Task ModelsListTheBaseModelEveryAdapterAndTheClassifier()
    {
        var models = (await _openAi.GetOpenAIModelClient().GetModelsAsync()).Value;
        Assert.That(models.Select(m => m.Id), Is.EquivalentTo(new[] { ServingFixture.Base, "a", "b", "cls" }));
        Assert.That(models.Select(m => m.OwnedBy).Distinct(), Is.EqualTo(new[] { "onnxlora" }));
        var (_, raw) = await Get("/v1/models");
        Assert.That(raw["data"]!.AsArray().Where(m => (string?)m!["id"] is "a" or "b").Select(m => (string?)m!["parent"]), Is.All.EqualTo(ServingFixture.Base), "an adapter's parent is the base model, as vLLM lists them");
    }

    [Test]
    public async Task CompletionsGiveWhatEachRequestGetsAlone()
    {
        foreach (var model in new[] { ServingFixture.Base, "a", "b" })
        {
            var (status, body) = await _f.Post("/v1/completions", new JsonObject { ["model"] = model, ["prompt"] = "hello the", ["max_tokens"] = 12, ["temperature"] = 0 });
            Assert.That(status, Is.EqualTo(200), body.ToJsonString());
            var alone = _f.Alone("hello the", model == ServingFixture.Base ? null : model, 12);
            Assert.That((string?)body["choices"]![0]!["text"], Is.EqualTo(alone.Text), model);
            Assert.That((string?)body["object"], Is.EqualTo("text_completion"));
            Assert.That((string?)body["choices"]![0]!["finish_reason"], Is.EqualTo(alone.StopReason == "max_new_tokens" ? "length" : "stop"));
            Assert.That((int)body["usage"]!["prompt_tokens"]!, Is.EqualTo(_f.Tokenizer.Encode("hello the").Length));
            Assert.That((int)body["usage"]!["completion_tokens"]!, Is.EqualTo(alone.TokenIds.Count));
        }
        var texts = await Texts("a", "hello the", 12);
        Assert.That(texts, Is.Not.EqualTo(await Texts("b", "hello the", 12)), "the adapters change the text, else the comparison shows nothing");
    }

    [Test]
    public async Task APromptListTokenIdsNAndSeedsGiveOneChoiceEach()
    {
        var (status, body) = await _f.Post("/v1/completions", new JsonObject
        {
            ["model"] = "a", ["prompt"] = new JsonArray("hello", "the world"), ["n"] = 2, ["max_tokens"] = 8, ["temperature"] = 0.9, ["top_p"] = 0.95, ["seed"] = 17,
        });
        Assert.That(status, Is.EqualTo(200), body.ToJsonString());
        var choices = body["choices"]!.AsArray();
        Assert.That(choices.Select(c => (int)c!["index"]!), Is.EqualTo(new[] { 0, 1, 2, 3 }));
        // choice i·n + j is prompt i's j-th sample, seeded seed + j
        string[] prompts = ["hello", "the world"];
        for (int i = 0; i < 4; i++)
            Assert.That((string?)choices[i]!["text"], Is.EqualTo(SampledAlone(prompts[i / 2], 17 + i % 2)), $"choice {i}");

        // token ids in place of text
        var ids = _f.Tokenizer.Encode("hello the");
        (status, body) = await _f.Post("/v1/completions", new JsonObject { ["model"] = "b", ["prompt"] = new JsonArray(ids.Select(x => (JsonNode?)x).ToArray()), ["max_tokens"] = 6, ["temperature"] = 0 });
        Assert.That(status, Is.EqualTo(200), body.ToJsonString());
        Assert.That((string?)body["choices"]![0]!["text"], Is.EqualTo(_f.Alone("hello the", "b", 6).Text));

        string? SampledAlone(string prompt, int seed) => _f.Reference.Generate(_f.Tokenizer.Encode(prompt), new Pipeline.Deployment.GenerationOptions
        {
            MaxNewTokens = 8, Sampling = new Pipeline.Deployment.SamplingOptions { Temperature = 0.9, TopP = 0.95, Seed = seed }, StopTokenIds = [_f.Tokenizer.EndOfText],
        }, "a").Text;
    }

    [Test]
    public async Task StreamingSendsTheSameTextAsChunksThenUsageThenDone()
    {
        var events = await _f.Events("/v1/completions", new JsonObject
        {
            ["model"] = "a", ["prompt"] = "hello the", ["max_tokens"] = 12, ["temperature"] = 0, ["stream"] = true, ["stream_options"] = new JsonObject { ["include_usage"] = true },
        });
        Assert.That(events[^1], Is.EqualTo("[DONE]"));
        var chunks = events.SkipLast(1).Select(e => JsonNode.Parse(e)!).ToList();
        Assert.That(chunks.Select(c => (string?)c["object"]), Is.All.EqualTo("text_completion"));
        Assert.That(chunks.Select(c => (string?)c["id"]).Distinct().Count(), Is.EqualTo(1), "one id for the whole stream");
        var text = string.Concat(chunks.SelectMany(c => c["choices"]!.AsArray()).Select(c => (string?)c!["text"]));
        var alone = _f.Alone("hello the", "a", 12);
        Assert.That(text, Is.EqualTo(alone.Text));
        Assert.That(chunks.SelectMany(c => c["choices"]!.AsArray()).Count(c => c!["finish_reason"] is not null), Is.EqualTo(1), "one finish reason per choice");
        Assert.That(chunks[^1]["choices"]!.AsArray(), Is.Empty, "the usage chunk has no choices");
        Assert.That((int)chunks[^1]["usage"]!["completion_tokens"]!, Is.EqualTo(alone.TokenIds.Count));
    }

    [Test]
    public async Task ChatWithoutMaxTokensAnswersWithinWhatTheContextLeaves()
    {
        // the server's limit (48) plus this prompt is past the model's 64-token context: absent max_tokens, the answer
        // may use what the context leaves (as vLLM does) instead of the request being refused for a field it never sent
        var text = string.Join(" ", Enumerable.Repeat("hello the world", 6));
        int prompt = _f.Tokenizer.Encode(_f.Template.Render([new ChatTurn("user", text)], addGenerationPrompt: true)).Length;
        Assert.That(prompt + 48, Is.GreaterThan(64), "the prompt must leave less room than the server's max_tokens");
        ChatCompletion completion = await _openAi.GetChatClient("b").CompleteChatAsync([new UserChatMessage(text)], new ChatCompletionOptions { Temperature = 0f });
        Assert.That(completion.Usage.InputTokenCount, Is.EqualTo(prompt));
        Assert.That(completion.Usage.OutputTokenCount, Is.InRange(1, 64 - prompt));
    }

    [Test]
    public async Task ChatThroughTheOpenAIClientUsesTheChatTemplate()
    {
        ChatMessage[] messages = [new SystemChatMessage("be brief"), new UserChatMessage("hello the world")];
        var options = new ChatCompletionOptions { Temperature = 0f, MaxOutputTokenCount = 10 };
        var rendered = _f.Template.Render([new ChatTurn("system", "be brief"), new ChatTurn("user", "hello the world")], addGenerationPrompt: true);
        Assert.That(rendered, Is.EqualTo("s:be brief\nu:hello the world\na:"));
        var alone = _f.Reference.Generate(_f.Tokenizer.Encode(rendered), new Pipeline.Deployment.GenerationOptions { MaxNewTokens = 10, StopTokenIds = [_f.Tokenizer.EndOfText] }, "b");

        ChatCompletion completion = await _openAi.GetChatClient("b").CompleteChatAsync(messages, options);
        Assert.That(completion.Content.Single().Text, Is.EqualTo(alone.Text));
        Assert.That(completion.Role, Is.EqualTo(ChatMessageRole.Assistant));
        Assert.That(completion.FinishReason, Is.EqualTo(alone.StopReason == "max_new_tokens" ? ChatFinishReason.Length : ChatFinishReason.Stop));
        Assert.That(completion.Usage.InputTokenCount, Is.EqualTo(_f.Tokenizer.Encode(rendered).Length));
        Assert.That(completion.Usage.OutputTokenCount, Is.EqualTo(alone.TokenIds.Count));

        var streamed = new StringBuilder();
        ChatFinishReason? finish = null;
        ChatTokenUsage? usage = null;
        await foreach (var update in _openAi.GetChatClient("b").CompleteChatStreamingAsync(messages, options))
        {
            foreach (var part in update.ContentUpdate) streamed.Append(part.Text);
            finish ??= update.FinishReason;
            usage ??= update.Usage;
        }
        Assert.That(streamed.ToString(), Is.EqualTo(alone.Text));
        Assert.That(finish, Is.EqualTo(completion.FinishReason));
        Assert.That(usage?.OutputTokenCount, Is.EqualTo(alone.TokenIds.Count), "the client asks for usage in the stream");
    }

    [Test]
    public async Task ClassifyAnswersTheRunsLabelsAndProbabilities()
    {
        // more inputs than --max-batch (8): they run in chunks, answered in order
        string[] inputs = [.. Enumerable.Range(0, 11).Select(i => i % 3 == 0 ? "zzz" : string.Join(" ", Enumerable.Repeat("hello the world", 1 + i % 4)))];
        var (status, body) = await _f.Post("/v1/classify", new JsonObject { ["model"] = "cls", ["input"] = new JsonArray(inputs.Select(i => (JsonNode?)i).ToArray()) });
        Assert.That(status, Is.EqualTo(200), body.ToJsonString());
        var data = body["data"]!.AsArray();
        Assert.That(data, Has.Count.EqualTo(inputs.Length));
        for (int i = 0; i < inputs.Length; i++)
        {
            var expected = _f.ReferenceClassifier.Classify(_f.Tokenizer.Encode(inputs[i]), "cls");
            Assert.That((int)data[i]!["index"]!, Is.EqualTo(i));
            Assert.That((string?)data[i]!["label"], Is.EqualTo(expected.LabelName));
            Assert.That(data[i]!["probs"]!.AsArray().Select(p => (float)p!), Is.EqualTo(expected.Probabilities).Within(1e-6f), "batched vs alone: float rounding only");
        }
        Assert.That(_f.ClassLabels, Does.Contain((string?)data[0]!["label"]), "the label names the run was trained with");
    }

    [Test]
    public async Task AdaptersLoadAndUnloadWhileOtherRequestsRun()
    {
        var expected = _f.Alone("hello", "a", 10).Text;
        using var stop = new CancellationTokenSource();
        var traffic = Task.Run(async () =>
        {
            var seen = new List<(int Status, string? Text)>();
            while (!stop.IsCancellationRequested)
            {
                var (status, body) = await _f.Post("/v1/completions", new JsonObject { ["model"] = "a", ["prompt"] = "hello", ["max_tokens"] = 10, ["temperature"] = 0 });
                seen.Add((status, (string?)body["choices"]?[0]?["text"]));
            }
            return seen;
        });
        // c is b's file under another name: it answers what b answers
        File.Copy(Path.Combine(_f.AdapterRoot, "b.onnx_adapter"), Path.Combine(_f.AdapterRoot, "c.onnx_adapter"), overwrite: true);
        using (var load = await _f.Http.PostAsync("/v1/load_lora_adapter", Body(new JsonObject { ["lora_name"] = "c", ["lora_path"] = "c.onnx_adapter" })))
            Assert.That((int)load.StatusCode, Is.EqualTo(200), await load.Content.ReadAsStringAsync());
        Assert.That(await Texts("c", "the world", 8), Is.EqualTo(_f.Alone("the world", "b", 8).Text));
        var models = (await _openAi.GetOpenAIModelClient().GetModelsAsync()).Value.Select(m => m.Id);
        Assert.That(models, Does.Contain("c"));
        using (var again = await _f.Http.PostAsync("/v1/load_lora_adapter", Body(new JsonObject { ["lora_name"] = "c", ["lora_path"] = "c.onnx_adapter" })))
            await AssertError(again, 400, "lora_name");
        using (var unload = await _f.Http.PostAsync("/v1/unload_lora_adapter", Body(new JsonObject { ["lora_name"] = "c" })))
            Assert.That((int)unload.StatusCode, Is.EqualTo(200));
        var (status, body) = await _f.Post("/v1/completions", new JsonObject { ["model"] = "c", ["prompt"] = "x" });
        AssertError(status, body, 404, "model");
        stop.Cancel();
        var seen = await traffic;
        Assert.That(seen, Is.Not.Empty);
        Assert.That(seen, Is.All.EqualTo((200, expected)), "requests on another adapter are untouched by loads and unloads");
    }

    [Test]
    public async Task LoadingReadsOnlyUnderTheAdapterRoot()
    {
        var outside = _f.Dir.File("outside.onnx_adapter");
        File.Copy(Path.Combine(_f.AdapterRoot, "a.onnx_adapter"), outside, overwrite: true);
        var link = Path.Combine(_f.AdapterRoot, "link.onnx_adapter");
        if (!File.Exists(link)) File.CreateSymbolicLink(link, outside);
        File.WriteAllText(Path.Combine(_f.AdapterRoot, "junk.onnx_adapter"), "not an adapter");
        // a folder whose files are read inside it (PEFT, run folder) may not hold a link either
        var folder = Directory.CreateDirectory(Path.Combine(_f.AdapterRoot, "peft-with-link")).FullName;
        if (!File.Exists(Path.Combine(folder, "adapter_model.safetensors"))) File.CreateSymbolicLink(Path.Combine(folder, "adapter_model.safetensors"), outside);
        foreach (var (path, status) in new[] { (outside, 403), ("../outside.onnx_adapter", 403), ("link.onnx_adapter", 403), ("peft-with-link", 403), ("missing.onnx_adapter", 404), ("junk.onnx_adapter", 400) })
        {
            using var response = await _f.Http.PostAsync("/v1/load_lora_adapter", Body(new JsonObject { ["lora_name"] = "x", ["lora_path"] = path }));
            await AssertError(response, status, "lora_path");
        }
        Assert.That((await _openAi.GetOpenAIModelClient().GetModelsAsync()).Value.Select(m => m.Id), Does.Not.Contain("x"));
    }

    [Test]
    public async Task ConcurrentClientsWithTwoAdaptersGetExactlyWhatEachGetsAlone()
    {
        string[] prompts = ["hello", "the world", "hello the", "llo he"];
        var jobs = Enumerable.Range(0, 12).Select(i => (Prompt: prompts[i % prompts.Length], Adapter: (i % 3) switch { 0 => "a", 1 => "b", _ => (string?)null }, Seed: 100 + i)).ToList();
        var answers = await Task.WhenAll(jobs.Select(async j =>
        {
            var (status, body) = await _f.Post("/v1/completions", new JsonObject
            {
                ["model"] = j.Adapter ?? ServingFixture.Base, ["prompt"] = j.Prompt, ["max_tokens"] = 10, ["temperature"] = 0.8, ["seed"] = j.Seed,
            });
            Assert.That(status, Is.EqualTo(200), body.ToJsonString());
            return (string?)body["choices"]![0]!["text"];
        }));
        for (int i = 0; i < jobs.Count; i++)
            Assert.That(answers[i], Is.EqualTo(_f.Alone(jobs[i].Prompt, jobs[i].Adapter, 10, 0.8, jobs[i].Seed).Text), $"request {i} ({jobs[i].Adapter ?? "base"}, seed {jobs[i].Seed})");
    }

    public static IEnumerable<TestCaseData> BadRequests()
    {
        TestCaseData Case(string name, string route, string json, int status, string? param) => new TestCaseData(route, json, status, param).SetName("BadRequest_" + name);
        yield return Case("UnknownModel", "/v1/completions", """{"model":"nope","prompt":"x"}""", 404, "model");
        yield return Case("NoModel", "/v1/completions", """{"prompt":"x"}""", 400, "model");
        yield return Case("TemperatureTooHigh", "/v1/completions", """{"model":"a","prompt":"x","temperature":3}""", 400, "temperature");
        yield return Case("MaxTokensZero", "/v1/completions", """{"model":"a","prompt":"x","max_tokens":0}""", 400, "max_tokens");
        yield return Case("MaxTokensOverLimit", "/v1/completions", """{"model":"a","prompt":"x","max_tokens":100000}""", 400, "max_tokens");
        yield return Case("MaxTokensNotANumber", "/v1/completions", """{"model":"a","prompt":"x","max_tokens":"many"}""", 400, "max_tokens");
        yield return Case("EmptyPromptList", "/v1/completions", """{"model":"a","prompt":[]}""", 400, "prompt");
        yield return Case("EmptyPrompt", "/v1/completions", """{"model":"a","prompt":""}""", 400, "prompt");
        yield return Case("TokenIdOutsideVocabulary", "/v1/completions", """{"model":"a","prompt":[5, 99999]}""", 400, "prompt[1]");
        yield return Case("PromptTooLong", "/v1/completions", $$"""{"model":"a","prompt":"{{string.Concat(Enumerable.Repeat("hello ", 300))}}"}""", 400, "prompt");
        yield return Case("PastTheContext", "/v1/completions", $$"""{"model":"a","prompt":"{{string.Concat(Enumerable.Repeat("hello ", 20))}}","max_tokens":30}""", 400, "max_tokens");
        yield return Case("PromptFillsTheContext", "/v1/completions", $$"""{"model":"a","prompt":"{{string.Concat(Enumerable.Repeat("hello ", 70))}}"}""", 400, "prompt");
        yield return Case("StopTooLong", "/v1/completions", $$"""{"model":"a","prompt":"x","stop":["{{new string('s', 300)}}"]}""", 400, "stop[0]");
        yield return Case("LoadBlankName", "/v1/load_lora_adapter", """{"lora_name":"  ","lora_path":"c.onnx_adapter"}""", 400, "lora_name");
        yield return Case("TooManyChoices", "/v1/completions", """{"model":"a","prompt":"x","n":1000}""", 400, "n");
        yield return Case("TooManyStops", "/v1/completions", """{"model":"a","prompt":"x","stop":["a","b","c","d","e"]}""", 400, "stop");
        yield return Case("LogprobsUnsupported", "/v1/completions", """{"model":"a","prompt":"x","logprobs":3}""", 400, "logprobs");
        yield return Case("NotJson", "/v1/completions", """{"model":""", 400, null);
        yield return Case("NotAnObject", "/v1/completions", """[1,2]""", 400, null);
        yield return Case("ChatWithoutMessages", "/v1/chat/completions", """{"model":"a"}""", 400, "messages");
        yield return Case("ChatToolRole", "/v1/chat/completions", """{"model":"a","messages":[{"role":"tool","content":"x"}]}""", 400, "messages[0].role");
        yield return Case("ChatImagePart", "/v1/chat/completions", """{"model":"a","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}""", 400, "messages[0].content[0]");
        yield return Case("ClassifyUnknownModel", "/v1/classify", """{"model":"a","input":"x"}""", 404, "model");
        yield return Case("ClassifyNoInput", "/v1/classify", """{"model":"cls"}""", 400, "input");
        yield return Case("UnloadUnknown", "/v1/unload_lora_adapter", """{"lora_name":"nope"}""", 404, "lora_name");
        yield return Case("UnknownRoute", "/v1/embeddings", """{}""", 404, null);
    }

    [TestCaseSource(nameof(BadRequests))]
    public async Task BadRequestsGetOpenAIErrorBodies(string route, string json, int status, string? param)
    {
        using var response = await _f.Http.PostAsync(route, new StringContent(json, Encoding.UTF8, "application/json"));
        await AssertError(response, status, param);
    }

    [Test]
    public async Task ABodyOverTheLimitIs413AndTheClientSeesTheStatus()
    {
        var huge = new JsonObject { ["model"] = "a", ["prompt"] = new string('x', 100 * 1024) };
        using var response = await _f.Http.PostAsync("/v1/completions", Body(huge));
        await AssertError(response, 413, null);

        // the OpenAI client surfaces the server's status and message
        var e = await Assert.ThrowsAsync<ClientResultException>(() => _openAi.GetChatClient("nope").CompleteChatAsync([new UserChatMessage("hi")]));
        Assert.That(e!.Status, Is.EqualTo(404));
        Assert.That(e.Message, Does.Contain("nope"));
    }

    [Test]
    public async Task HealthAndMetricsInPrometheusTextFormat()
    {
        using var health = await _f.Http.GetAsync("/health");
        Assert.That((int)health.StatusCode, Is.EqualTo(200));
        await _f.Post("/v1/completions", new JsonObject { ["model"] = "a", ["prompt"] = "hello", ["max_tokens"] = 3, ["temperature"] = 0 });
        await _f.Post("/v1/completions", new JsonObject { ["model"] = "nope", ["prompt"] = "hello" });
        using var response = await _f.Http.GetAsync("/metrics");
        Assert.That(response.Content.Headers.ContentType!.MediaType, Is.EqualTo("text/plain"));
        var lines = (await response.Content.ReadAsStringAsync()).Split('\n', StringSplitOptions.RemoveEmptyEntries);
        // every sample line is `name{labels} value` with a TYPE line for its family before it
        var families = lines.Where(l => l.StartsWith("# TYPE ", StringComparison.Ordinal)).Select(l => l.Split(' ')[2]).ToHashSet();
        foreach (var sample in lines.Where(l => !l.StartsWith('#')))
        {
            Assert.That(sample, Does.Match(@"^[a-z_]+(\{[a-z_]+=""[^""]*""(,[a-z_]+=""[^""]*"")*\})? [0-9.eE+-]+$"), sample);
            var name = sample.Split('{', ' ')[0];
            Assert.That(families.Any(f => name == f || name.StartsWith(f + "_", StringComparison.Ordinal)), Is.True, $"{name} has a # TYPE line");
        }
        Assert.That(Value(lines, "onnxlora_requests_total{route=\"/v1/completions\",status=\"200\"}"), Is.GreaterThanOrEqualTo(1));
        Assert.That(Value(lines, "onnxlora_requests_total{route=\"/v1/completions\",status=\"404\"}"), Is.GreaterThanOrEqualTo(1));
        Assert.That(Value(lines, "onnxlora_generation_tokens_total{model=\"a\"}"), Is.GreaterThanOrEqualTo(3));
        Assert.That(Value(lines, "onnxlora_queue_depth"), Is.EqualTo(0));
        Assert.That(Value(lines, "onnxlora_request_duration_seconds_bucket{route=\"/v1/completions\",le=\"+Inf\"}"),
            Is.EqualTo(Value(lines, "onnxlora_request_duration_seconds_count{route=\"/v1/completions\"}")));
    }

    static double Value(string[] lines, string key) =>
        double.Parse(lines.Single(l => l.StartsWith(key + " ", StringComparison.Ordinal))[(key.Length + 1)..], System.Globalization.CultureInfo.InvariantCulture);

    async Task<string?> Texts(string model, string prompt, int maxTokens)
    {
        var (status, body) = await _f.Post("/v1/completions", new JsonObject { ["model"] = model, ["prompt"] = prompt, ["max_tokens"] = maxTokens, ["temperature"] = 0 });
        Assert.That(status, Is.EqualTo(200), body.ToJsonString());
        return (string?)body["choices"]![0]!["text"];
    }

    async Task<(int, JsonObject)> Get(string route)
    {
        using var response = await _f.Http.GetAsync(route);
        return ((int)response.StatusCode, await ServingFixture.Json(response));
    }

    static StringContent Body(JsonObject json) => new(json.ToJsonString(), Encoding.UTF8, "application/json");

    internal static async Task AssertError(HttpResponseMessage response, int status, string? param) =>
        AssertError((int)response.StatusCode, await ServingFixture.Json(response), status, param);

    internal static void AssertError(int actual, JsonObject body, int status, string? param)
    {
        Assert.That(actual, Is.EqualTo(status), body.ToJsonString());
        var error = body["error"] as JsonObject ?? throw new AssertionException($"no error object: {body.ToJsonString()}");
        Assert.That((string?)error["message"], Is.Not.Empty);
        Assert.That((string?)error["type"], Is.Not.Empty);
        Assert.That((string?)error["param"], Is.EqualTo(param), body.ToJsonString());
        Assert.That(error.ContainsKey("code"), Is.True);
    }
}

/// <summary>Servers with other limits: a queue that holds nothing, no chat template, no adapter root.</summary>
[NonParallelizable]
public class ServerLimitTests
{
    [Test]
    public async Task AFullQueueAnswers429WithRetryAfter()
    {
        await using var f = await ServingFixture.StartAsync(o => o with { Scheduler = new Pipeline.Deployment.SchedulerOptions { MaxBatch = 1, QueueCapacity = 0 } }, classifier: false);
        using var response = await f.Http.PostAsync("/v1/completions", new StringContent("""{"model":"a","prompt":"hello","max_tokens":2}""", Encoding.UTF8, "application/json"));
        await ServerTests.AssertError(response, 429, null);
        Assert.That(response.Headers.RetryAfter, Is.Not.Null);
        Assert.That(f.Server.Scheduler.QueueDepth, Is.EqualTo(0), "a refused request leaves no place taken");
    }

    [Test]
    public async Task WithoutAChatTemplateChatIs400AndWithoutARootLoadingIs403()
    {
        await using var f = await ServingFixture.StartAsync(o => o with { AdapterRoot = null }, classifier: false, chat: false);
        var (status, body) = await f.Post("/v1/chat/completions", new JsonObject { ["model"] = "a", ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = "hi" }) });
        ServerTests.AssertError(status, body, 400, "model");
        Assert.That((string?)body["error"]!["message"], Does.Contain("chat template"));
        (status, body) = await f.Post("/v1/load_lora_adapter", new JsonObject { ["lora_name"] = "c", ["lora_path"] = Path.Combine(f.AdapterRoot, "b.onnx_adapter") });
        ServerTests.AssertError(status, body, 403, "lora_path");
        (status, body) = await f.Post("/v1/completions", new JsonObject { ["model"] = "a", ["prompt"] = "hello", ["max_tokens"] = 4, ["temperature"] = 0 });
        Assert.That(status, Is.EqualTo(200), "the rest still serves");
    }
}
