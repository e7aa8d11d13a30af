using System.Text.Json.Nodes;
using Microsoft.Extensions.AI;
using Microsoft.ML.Tokenizers;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment;
using OnnxLora.Pipeline.Deployment.Chat;
using OnnxLora.Tests.Deployment;
using OnnxLora.Tests.Models;

namespace OnnxLora.Tests.Chat;

/// <summary>
/// AdapterChatClient driven as an app drives an IChatClient (through a ChatClientBuilder pipeline), on a real
/// deployable model: Optimum's tiny GPT-2 export with a KV cache (vocabulary 300), rewritten with LoRA and a random
/// nonzero adapter "a", and a model folder holding a byte-level BPE tokenizer.json with ChatML's special tokens and a
/// tokenizer_config.json with a ChatML chat_template. Every answer is checked against TextGenerator on the prompt the
/// template renders.
/// </summary>
public class AdapterChatClientTests
{
    const string ImStart = "<|im_start|>", ImEnd = "<|im_end|>";

    TempDir _dir = null!;
    AdapterHost _host = null!;
    TextGenerator _generator = null!;
    GenerationScheduler _scheduler = null!;
    ChatTemplate _template = null!;
    Tokenizer _tokenizer = null!;

    [OneTimeSetUp]
    public void SetUp()
    {
        _dir = new TempDir();
        (_host, _) = CachedGenerationTests.Deploy(Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "optimum", "gpt2_opset14_with_past.onnx"), "c_attn,c_fc", _dir);
        var folder = Path.Combine(_dir.Path, "hf");
        WriteTokenizerFolder(folder, eosToken: ImEnd);
        _tokenizer = TextTokenizer.FromDirectory(folder).Inner;
        _template = ChatTemplate.Load(folder)!;
        _generator = new TextGenerator(_host, _tokenizer);
        _scheduler = new GenerationScheduler(_generator);
    }

    [OneTimeTearDown]
    public async Task TearDown()
    {
        await _scheduler.DisposeAsync();
        _host.Dispose();
        _dir.Dispose();
    }

    // ids of the tokenizer below: the ChatML specials after the role-word merges
    const int ImStartId = 279, ImEndId = 280;

    /// <summary>
    /// tokenizer.json (the 256 byte symbols and a few merges, merges that make each role name one token as in real
    /// chat tokenizers, ChatML's specials, then special tokens up to id 299 so that every id the 300-token model can
    /// produce decodes) and tokenizer_config.json with the ChatML template of the fixtures. The 64-position model
    /// holds a 4-turn conversation this way.
    /// </summary>
    static void WriteTokenizerFolder(string folder, string eosToken)
    {
        Directory.CreateDirectory(folder);
        using var scratch = new TempDir();
        var json = JsonNode.Parse(File.ReadAllText(TokenizerTests.WriteTokenizerJson(scratch, TokenizerTests.ByteLevel())))!.AsObject();
        var vocab = json["model"]!["vocab"]!.AsObject();
        var merges = json["model"]!["merges"]!.AsArray();
        int next = 263;
        foreach (var word in new[] { "system", "user", "assistant" })
            for (int n = 2; n <= word.Length; n++)
            {
                merges.Add(JsonValue.Create($"{word[..(n - 1)]} {word[n - 1]}"));
                vocab[word[..n]] = next++;
            }
        Assert.That(next, Is.EqualTo(ImStartId));
        var added = json["added_tokens"]!.AsArray();
        added.Add(new JsonObject { ["id"] = ImStartId, ["content"] = ImStart, ["special"] = true });
        added.Add(new JsonObject { ["id"] = ImEndId, ["content"] = ImEnd, ["special"] = true });
        for (int id = ImEndId + 1; id < 300; id++) added.Add(new JsonObject { ["id"] = id, ["content"] = $"<|extra_{id}|>", ["special"] = true });
        File.WriteAllText(Path.Combine(folder, "tokenizer.json"), json.ToJsonString());
        var fixture = JsonNode.Parse(File.ReadAllText(Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "chat", "templates.json")))!;
        var chatml = fixture["templates"]!.AsArray().Single(t => (string)t!["name"]! == "chatml")!["template"]!.GetValue<string>();
        File.WriteAllText(Path.Combine(folder, "tokenizer_config.json"), new JsonObject
        {
            ["chat_template"] = chatml,
            ["eos_token"] = new JsonObject { ["content"] = eosToken, ["special"] = true },
        }.ToJsonString());
    }

    IChatClient Client(ChatTemplate? template = null, int maxOutputTokens = 12) =>
        new AdapterChatClient(_scheduler, template ?? _template)
            .AsBuilder()
            .ConfigureOptions(o => o.MaxOutputTokens ??= maxOutputTokens)
            .Build();

    static readonly ChatMessage[] Conversation =
    [
        new(ChatRole.System, "Be brief."),
        new(ChatRole.User, "hi"),
        new(ChatRole.Assistant, "yo"),
        new(ChatRole.User, "why?"),
    ];

    static List<ChatTurn> Turns(IEnumerable<ChatMessage> messages) => messages.Select(m => new ChatTurn(m.Role.Value, m.Text)).ToList();

    GenerationResult Expected(IEnumerable<ChatMessage> messages, GenerationOptions options, string? adapter)
    {
        var prompt = _template.Render(Turns(messages), addGenerationPrompt: true);
        Assert.That(prompt, Does.EndWith($"{ImStart}assistant\n"));
        return _generator.Generate(prompt, options with { StopTokenIds = [ImEndId] }, adapter);
    }

    [Test]
    public async Task AnswersEqualTextGeneratorOnTheRenderedPromptAndAdaptersDiffer()
    {
        using var client = Client();
        var texts = new Dictionary<string, string>();
        foreach (var modelId in new[] { null, "base", "a" })
        {
            var response = await client.GetResponseAsync(Conversation, new ChatOptions { ModelId = modelId });
            var expected = Expected(Conversation, new GenerationOptions { MaxNewTokens = 12 }, modelId == "a" ? "a" : null);
            Assert.That(response.Text, Is.EqualTo(expected.Text), $"model {modelId ?? "null"}");
            Assert.That(response.Text, Is.Not.Empty);
            Assert.That(response.Messages.Single().Role, Is.EqualTo(ChatRole.Assistant));
            Assert.That(response.FinishReason, Is.EqualTo(expected.StopReason == "max_new_tokens" ? ChatFinishReason.Length : ChatFinishReason.Stop));
            var prompt = _template.Render(Turns(Conversation), true);
            Assert.That(response.Usage!.InputTokenCount, Is.EqualTo(_tokenizer.EncodeToIds(prompt).Count));
            Assert.That(response.Usage.OutputTokenCount, Is.EqualTo(expected.TokenIds.Count));
            Assert.That(response.Usage.TotalTokenCount, Is.EqualTo(response.Usage.InputTokenCount + response.Usage.OutputTokenCount));
            Assert.That(response.ModelId, Is.EqualTo(modelId ?? "base"));
            texts[modelId ?? "null"] = response.Text;
        }
        Assert.That(texts["base"], Is.EqualTo(texts["null"]));
        Assert.That(texts["a"], Is.Not.EqualTo(texts["base"]), "the adapter changes the answer");
        // the special tokens are single ids: the prompt holds 4 turns + the generation prompt, each opened by <|im_start|>
        var ids = _tokenizer.EncodeToIds(_template.Render(Turns(Conversation), true));
        Assert.That(ids.Count(i => i == ImStartId), Is.EqualTo(5));
        Assert.That(ids.Count(i => i == ImEndId), Is.EqualTo(4));
        Assert.That(ids, Has.Count.LessThanOrEqualTo(64 - 12), "prompt and answer fit the model's 64 positions");
    }

    [Test]
    public async Task StreamingGivesWhatTheWholeResponseGives()
    {
        using var client = Client(maxOutputTokens: 10);
        foreach (var options in new[] { new ChatOptions(), new ChatOptions { ModelId = "a", Temperature = 0.9f, TopP = 0.95f, Seed = 1234567890123 } })
        {
            var whole = await client.GetResponseAsync(Conversation, options);
            var updates = new List<ChatResponseUpdate>();
            await foreach (var update in client.GetStreamingResponseAsync(Conversation, options)) updates.Add(update);
            Assert.That(string.Concat(updates.Select(u => u.Text)), Is.EqualTo(whole.Text));
            Assert.That(updates.All(u => u.Role == ChatRole.Assistant && u.ResponseId == updates[0].ResponseId));
            Assert.That(updates[^1].FinishReason, Is.EqualTo(whole.FinishReason));
            var usage = updates[^1].Contents.OfType<UsageContent>().Single().Details;
            Assert.That((usage.InputTokenCount, usage.OutputTokenCount), Is.EqualTo((whole.Usage!.InputTokenCount, whole.Usage.OutputTokenCount)));
            var rebuilt = updates.ToChatResponse();
            Assert.That(rebuilt.Text, Is.EqualTo(whole.Text));
            Assert.That(rebuilt.Usage!.OutputTokenCount, Is.EqualTo(whole.Usage.OutputTokenCount));
        }
    }

    [Test]
    public async Task SamplingOptionsSeedAndStopSequencesMapOntoTheGenerator()
    {
        using var client = Client(maxOutputTokens: 16);
        var sampled = new ChatOptions { ModelId = "a", Temperature = 0.8f, TopP = 0.9f, TopK = 40, Seed = 42 };
        var first = await client.GetResponseAsync(Conversation, sampled);
        Assert.That((await client.GetResponseAsync(Conversation, sampled)).Text, Is.EqualTo(first.Text), "the same seed gives the same answer");
        var expected = Expected(Conversation, new GenerationOptions
        {
            MaxNewTokens = 16,
            Sampling = new SamplingOptions { Temperature = 0.8f, TopP = 0.9f, TopK = 40, Seed = 42 },
        }, "a");
        Assert.That(first.Text, Is.EqualTo(expected.Text));
        var greedy = await client.GetResponseAsync(Conversation, new ChatOptions { ModelId = "a" });
        Assert.That(first.Text, Is.Not.EqualTo(greedy.Text), "sampling at 0.8 differs from greedy here");

        // a stop sequence taken from the middle of the greedy answer cuts it there
        var stop = greedy.Text.Substring(greedy.Text.Length / 2, 2);
        var cut = await client.GetResponseAsync(Conversation, new ChatOptions { ModelId = "a", StopSequences = [stop] });
        Assert.That(cut.Text, Is.EqualTo(greedy.Text[..greedy.Text.IndexOf(stop, StringComparison.Ordinal)]));
        Assert.That(cut.FinishReason, Is.EqualTo(ChatFinishReason.Stop));

        // Instructions arrive as a first system turn
        var instructed = await client.GetResponseAsync(Conversation[1..], new ChatOptions { ModelId = "a", Instructions = Conversation[0].Text });
        Assert.That(instructed.Text, Is.EqualTo(greedy.Text));
    }

    [Test]
    public async Task TheTemplatesEosTokenEndsTheAnswer()
    {
        using var client = Client(maxOutputTokens: 12);
        var greedy = Expected(Conversation, new GenerationOptions { MaxNewTokens = 12 }, "a");
        // an eos_token the adapted model does produce: a generated token whose text is that one token again (not a
        // piece of a UTF-8 character), seen for the first time
        int at = Enumerable.Range(1, greedy.TokenIds.Count - 1).First(i =>
            _tokenizer.EncodeToIds(_tokenizer.Decode([greedy.TokenIds[i]])!) is [var id] && id == greedy.TokenIds[i] && !greedy.TokenIds.Take(i).Contains(id));
        var eos = _tokenizer.Decode([greedy.TokenIds[at]])!;
        var folder = Path.Combine(_dir.Path, "eos");
        WriteTokenizerFolder(folder, eos);
        var template = ChatTemplate.Load(folder)!;
        Assert.That(template.EosToken, Is.EqualTo(eos));
        using var stopping = Client(template);
        var response = await stopping.GetResponseAsync(Conversation, new ChatOptions { ModelId = "a" });
        Assert.That(response.FinishReason, Is.EqualTo(ChatFinishReason.Stop));
        Assert.That(response.Usage!.OutputTokenCount, Is.EqualTo(at));
        Assert.That(response.Text, Is.EqualTo(_tokenizer.Decode(greedy.TokenIds.Take(at))));
    }

    [Test]
    public async Task GenerationConfigEosIdsEndTheAnswer()
    {
        var greedy = Expected(Conversation, new GenerationOptions { MaxNewTokens = 12 }, "a");
        using var dir = new TempDir();
        Assert.That(AdapterChatClientOptions.ForModel(dir.Path).StopTokenIds, Is.Empty);
        // Llama 3 style: a list of end ids, one of which the adapted model produces at step 3
        File.WriteAllText(dir.File("generation_config.json"), $$"""{"bos_token_id": 1, "eos_token_id": [299, {{greedy.TokenIds[3]}}]}""");
        var options = AdapterChatClientOptions.ForModel(dir.Path);
        Assert.That(options.StopTokenIds, Is.EqualTo(new[] { 299, greedy.TokenIds[3] }));
        using var client = new AdapterChatClient(_scheduler, _template, options);
        var response = await client.GetResponseAsync(Conversation, new ChatOptions { ModelId = "a", MaxOutputTokens = 12 });
        int stop = greedy.TokenIds.ToList().IndexOf(greedy.TokenIds[3]);
        Assert.That(response.Usage!.OutputTokenCount, Is.EqualTo(stop));
        Assert.That(response.FinishReason, Is.EqualTo(ChatFinishReason.Stop));

        File.WriteAllText(dir.File("generation_config.json"), """{"eos_token_id": "</s>"}""");
        Assert.That(Assert.Throws<InvalidDataException>(() => AdapterChatClientOptions.ForModel(dir.Path))!.Message,
            Does.Contain("generation_config.json").And.Contain("eos_token_id"));
    }

    [Test]
    public async Task ConcurrentRequestsWithDifferentAdaptersGetWhatEachGetsAlone()
    {
        using var client = Client(maxOutputTokens: 8);
        string?[] models = [null, "a", "a", null, "a", null];
        var alone = new List<string>();
        foreach (var m in models) alone.Add((await client.GetResponseAsync(Conversation, new ChatOptions { ModelId = m })).Text);
        var together = await Task.WhenAll(models.Select(m => client.GetResponseAsync(Conversation, new ChatOptions { ModelId = m })));
        Assert.That(together.Select(r => r.Text), Is.EqualTo(alone));
    }

    [Test]
    public async Task TheReadmeExampleRuns()
    {
        // README "In-process chat", with this fixture's files and fewer tokens (the model has 64 positions)
        var folder = Path.Combine(_dir.Path, "hf");
        using var host = AdapterHost.Create(Path.Combine(_dir.Path, "rw", "deploy.onnx"));
        host.AddAdapter("support", _dir.File("a.onnx_adapter"));
        var generator = new TextGenerator(host, TextTokenizer.FromDirectory(folder).Inner);
        await using var scheduler = new GenerationScheduler(generator);
        IChatClient chat = new AdapterChatClient(scheduler,
            ChatTemplate.Load(folder) ?? throw new InvalidOperationException("no chat template"),
            AdapterChatClientOptions.ForModel(folder));
        var reply = await chat.GetResponseAsync(
            [new(ChatRole.System, "Be brief."), new(ChatRole.User, "hi")],
            new ChatOptions { ModelId = "support", MaxOutputTokens = 8, Temperature = 0.7f, Seed = 1 });
        Assert.That(reply.Usage!.OutputTokenCount, Is.EqualTo(8));
        Assert.That(reply.FinishReason, Is.EqualTo(ChatFinishReason.Length));
        var streamed = new System.Text.StringBuilder();
        await foreach (var update in chat.GetStreamingResponseAsync("hi", new ChatOptions { MaxOutputTokens = 8 })) streamed.Append(update.Text);
        var prompt = _template.Render([new ChatTurn("user", "hi")], true);
        Assert.That(streamed.ToString(), Is.EqualTo(_generator.Generate(prompt, new GenerationOptions { MaxNewTokens = 8, StopTokenIds = [ImEndId] }).Text));
    }

    [Test]
    public void MetadataAndServicesComeThroughThePipeline()
    {
        using var client = Client();
        var metadata = client.GetService<ChatClientMetadata>()!;
        Assert.That(metadata.ProviderName, Is.EqualTo("onnxlora"));
        Assert.That(metadata.DefaultModelId, Is.EqualTo("base"));
        Assert.That(client.GetService<ChatTemplate>(), Is.SameAs(_template));
        Assert.That(client.GetService<AdapterChatClient>(), Is.Not.Null);
        Assert.That(client.GetService<ChatClientMetadata>("some key"), Is.Null);
    }

    [Test]
    public async Task BadRequestsFailWithTheReason()
    {
        using var client = Client();
        var unknown = (await Assert.ThrowsAsync<KeyNotFoundException>(() => client.GetResponseAsync(Conversation, new ChatOptions { ModelId = "nope" })))!;
        Assert.That(unknown.Message, Does.Contain("'nope'").And.Contain("a"));
        await Assert.ThrowsAsync<NotSupportedException>(() => client.GetResponseAsync(Conversation, new ChatOptions { Tools = [AIFunctionFactory.Create(() => 1, "one")] }));
        var image = new ChatMessage(ChatRole.User, [new DataContent(new byte[] { 1, 2, 3 }, "image/png")]);
        Assert.That((await Assert.ThrowsAsync<NotSupportedException>(() => client.GetResponseAsync([image])))!.Message, Does.Contain("DataContent"));
        await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync([]));

        var strict = ChatTemplate.FromSource("{% if messages[0].role != 'user' %}{{ raise_exception('the first message must be the user') }}{% endif %}x", "strict");
        using var strictClient = Client(strict);
        var refused = (await Assert.ThrowsAsync<ChatTemplateException>(() => strictClient.GetResponseAsync([new ChatMessage(ChatRole.Assistant, "hi")])))!;
        Assert.That(refused.RaisedByTemplate, Is.True);
        Assert.That(refused.Message, Does.Contain("the first message must be the user"));
        Assert.Throws<ArgumentException>(() => _ = new AdapterChatClient(new GenerationScheduler(new TextGenerator(_host)), _template));
    }
}
