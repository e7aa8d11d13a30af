using System.Text.Json.Nodes;
using OnnxLora.Pipeline.Deployment.Chat;

namespace OnnxLora.Tests.Chat;

/// <summary>
/// ChatTemplate against the real Jinja2: tools/fixtures/make_chat_templates.py renders family-style templates
/// (ChatML, Llama 2/3, Mistral, Gemma, Phi-3, SmolLM2, Qwen3, and three that exercise the rest of the subset) with
/// jinja2's ImmutableSandboxedEnvironment as transformers configures it; every conversation, with and without the
/// generation prompt, must render to the same string or be refused with the same raise_exception message.
/// </summary>
public class ChatTemplateTests
{
    static readonly JsonObject Fixture = (JsonObject)JsonNode.Parse(File.ReadAllText(
        Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "chat", "templates.json")))!;

    static IEnumerable<string> TemplateNames() => Fixture["templates"]!.AsArray().Select(t => (string)t!["name"]!);

    static JsonObject TemplateNamed(string name) => (JsonObject)Fixture["templates"]!.AsArray().Single(t => (string)t!["name"]! == name)!;

    static List<ChatTurn> Turns(JsonNode messages) =>
        messages.AsArray().Select(m => new ChatTurn((string)m!["role"]!, (string)m["content"]!)).ToList();

    [TestCaseSource(nameof(TemplateNames))]
    public void RendersAsJinja2(string name)
    {
        var t = TemplateNamed(name);
        var template = ChatTemplate.FromSource((string)t["template"]!, name, (string?)t["bos_token"], (string?)t["eos_token"]);
        int checkedCases = 0;
        foreach (var c in t["cases"]!.AsArray())
        {
            var turns = Turns(c!["messages"]!);
            bool add = (bool)c["add_generation_prompt"]!;
            var what = $"{name}: {string.Join(" / ", turns.Select(x => x.Role))}, add_generation_prompt={add}";
            if (c["expected"] is { } expected)
                Assert.That(template.Render(turns, add), Is.EqualTo((string)expected!), what);
            else if (c["raised"] is { } raised)
            {
                var e = Assert.Throws<ChatTemplateException>(() => template.Render(turns, add), what)!;
                Assert.That(e.RaisedByTemplate, Is.True, what);
                Assert.That(e.Message, Does.Contain((string)raised!).And.StartWith($"{name}, line "), what);
            }
            else Assert.Throws<ChatTemplateException>(() => template.Render(turns, add), what);
            checkedCases++;
        }
        Assert.That(checkedCases, Is.EqualTo(14));
    }

    [Test]
    public void LoadsTokenizerConfigStringWithAddedTokenObjects()
    {
        using var dir = new TempDir();
        var chatml = (string)TemplateNamed("chatml")["template"]!;
        var config = new JsonObject
        {
            ["chat_template"] = chatml,
            ["bos_token"] = null,
            ["eos_token"] = new JsonObject { ["__type"] = "AddedToken", ["content"] = "<|im_end|>", ["lstrip"] = false },
            ["pad_token"] = "<|endoftext|>",
        };
        File.WriteAllText(dir.File("tokenizer_config.json"), config.ToJsonString());
        var template = ChatTemplate.Load(dir.Path)!;
        Assert.That(template.EosToken, Is.EqualTo("<|im_end|>"));
        Assert.That(template.BosToken, Is.Null);
        var c = TemplateNamed("chatml")["cases"]![3]!;
        Assert.That(template.Render(Turns(c["messages"]!), (bool)c["add_generation_prompt"]!), Is.EqualTo((string)c["expected"]!));
    }

    [Test]
    public void JinjaFileWinsOverTokenizerConfigAndSpecialTokensMapFillsGaps()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir.File("tokenizer_config.json"), """{"chat_template": "config {{ messages[0].content }}", "bos_token": "<s>"}""");
        File.WriteAllText(dir.File("special_tokens_map.json"), """{"bos_token": "<other>", "eos_token": {"content": "</s>", "special": true}}""");
        File.WriteAllText(dir.File("chat_template.jinja"), "{{ bos_token }}file {{ messages[0].content }}{{ eos_token }}\n");
        var template = ChatTemplate.Load(dir.Path)!;
        Assert.That(template.Render([new ChatTurn("user", "hi")], false), Is.EqualTo("<s>file hi</s>"));
        Assert.That(template.EosToken, Is.EqualTo("</s>"));
        Assert.That(template.Origin, Is.EqualTo(dir.File("chat_template.jinja")));

        // a file in the folder: the .jinja itself (another name too), or tokenizer_config.json
        File.WriteAllText(dir.File("tool_use.jinja"), "tools {{ messages[0].content }}{{ eos_token }}");
        Assert.That(ChatTemplate.Load(dir.File("tool_use.jinja"))!.Render([new ChatTurn("user", "hi")], false), Is.EqualTo("tools hi</s>"));
        Assert.That(ChatTemplate.Load(dir.File("tokenizer_config.json"))!.Render([new ChatTurn("user", "hi")], false), Is.EqualTo("<s>file hi</s>"));
        Assert.That(Assert.Throws<ArgumentException>(() => ChatTemplate.Load(dir.File("special_tokens_map.json")))!.Message, Does.Contain("special_tokens_map.json"));
        Assert.Throws<DirectoryNotFoundException>(() => ChatTemplate.Load(dir.File("nope")));
    }

    [Test]
    public void ListOfNamedTemplatesUsesDefault()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir.File("tokenizer_config.json"),
            """{"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default {{ messages|length }}"}]}""");
        Assert.That(ChatTemplate.Load(dir.Path)!.Render([new ChatTurn("user", "a"), new ChatTurn("assistant", "b")], true), Is.EqualTo("default 2"));

        File.WriteAllText(dir.File("tokenizer_config.json"), """{"chat_template": [{"name": "rag", "template": "x"}]}""");
        var e = Assert.Throws<InvalidDataException>(() => ChatTemplate.Load(dir.Path))!;
        Assert.That(e.Message, Does.Contain("tokenizer_config.json").And.Contain("no 'default'").And.Contain("rag"));
    }

    [Test]
    public void FolderWithoutTemplateGivesNull()
    {
        using var dir = new TempDir();
        Assert.That(ChatTemplate.Load(dir.Path), Is.Null);
        File.WriteAllText(dir.File("tokenizer_config.json"), """{"eos_token": "</s>", "chat_template": null}""");
        Assert.That(ChatTemplate.Load(dir.Path), Is.Null);
    }

    [TestCase("line1\n{% for m in messages %}\n{{ m.content }\n{% endfor %}", 3, "not closed|unexpected")]
    [TestCase("a\nb\n{% if true %}x", 3, "missing {% endif %}")]
    [TestCase("{% for m in messages %}{% endif %}", 1, "endif")]
    [TestCase("x\n{% include 'other.jinja' %}", 2, "not supported")]
    [TestCase("{{ 1 + }}", 1, "unexpected")]
    [TestCase("\n\n{{ 'unclosed }}", 3, "not closed")]
    public void BadTemplateNamesFileAndLine(string source, int line, string what)
    {
        using var dir = new TempDir();
        File.WriteAllText(dir.File("chat_template.jinja"), source);
        var e = Assert.Throws<InvalidDataException>(() => ChatTemplate.Load(dir.Path))!;
        Assert.That(e.Message, Does.StartWith($"{dir.File("chat_template.jinja")}, line {line}: "));
        Assert.That(e.Message, Does.Match(what.Replace("{", "\\{").Replace("}", "\\}")));
    }

    [Test]
    public void DeeplyNestedTemplatesAreRefusedNotACrash()
    {
        foreach (var source in new[]
        {
            "{{ " + new string('(', 100_000) + "1" + new string(')', 100_000) + " }}",
            "{{ " + new string('-', 100_000) + "1 }}",
            "{{ " + string.Concat(Enumerable.Repeat("not ", 100_000)) + "x }}",
            "{{ " + string.Concat(Enumerable.Repeat("[", 100_000)) + string.Concat(Enumerable.Repeat("]", 100_000)) + " }}",
            string.Concat(Enumerable.Repeat("{% if true %}", 10_000)) + string.Concat(Enumerable.Repeat("{% endif %}", 10_000)),
        })
        {
            var e = Assert.Throws<InvalidDataException>(() => ChatTemplate.FromSource(source, "deep"))!;
            Assert.That(e.Message, Does.StartWith("deep, line 1: ").And.Contain("nests more than"));
        }
        // a long chain parses flat but evaluates as deep as it is long
        var chain = ChatTemplate.FromSource("{{ 1" + string.Concat(Enumerable.Repeat(" + 1", 200_000)) + " }}", "chain");
        Assert.That(Assert.Throws<ChatTemplateException>(() => chain.Render([new ChatTurn("user", "x")], false))!.Message, Does.Contain("recurses too deeply"));
        Assert.That(ChatTemplate.FromSource("{{ 1" + string.Concat(Enumerable.Repeat(" + 1", 300)) + " }}", "short").Render([], false), Is.EqualTo("301"));
    }

    [Test]
    public void BadTemplateInTokenizerConfigNamesTheField()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir.File("tokenizer_config.json"), """{"chat_template": "ok\n{% if %}"}""");
        var e = Assert.Throws<InvalidDataException>(() => ChatTemplate.Load(dir.Path))!;
        Assert.That(e.Message, Does.StartWith($"{dir.File("tokenizer_config.json")} chat_template, line 2: "));
    }

    [TestCase("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loops more than")]
    [TestCase("{% set s = 'x' * 1000 %}{% for i in range(100000) %}{{ s }}{% endfor %}", "characters")]
    [TestCase("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nest more than")]
    [TestCase("{{ 'ab' * 100000000 }}", "characters")]
    [TestCase("{{ range(10000000) }}", "allowed")]
    [TestCase("{{ messages.append(1) }}", "append")]
    [TestCase("{{ messages.__class__ }}{{ messages.__class__.x }}", "unsafe")]
    public void HostileTemplatesAreBounded(string source, string what)
    {
        var template = ChatTemplate.FromSource(source, "hostile");
        var e = Assert.Throws<ChatTemplateException>(() => template.Render([new ChatTurn("user", "hi")], true))!;
        Assert.That(e.Message, Does.StartWith("hostile, line 1: ").And.Match(what));
        Assert.That(e.RaisedByTemplate, Is.False);
    }

    [Test]
    public void RaiseExceptionNamesTheMessageAndLine()
    {
        var template = ChatTemplate.FromSource("{% for m in messages %}\n{% if m.role == 'tool' %}\n{{ raise_exception('no tools here: ' ~ m.content) }}\n{% endif %}{% endfor %}", "t");
        Assert.That(template.Render([new ChatTurn("user", "x")], false), Is.EqualTo(""));
        var e = Assert.Throws<ChatTemplateException>(() => template.Render([new ChatTurn("tool", "ls")], false))!;
        Assert.That(e.RaisedByTemplate, Is.True);
        Assert.That(e.Line, Is.EqualTo(3));
        Assert.That(e.Message, Is.EqualTo("t, line 3: the template refused the messages: no tools here: ls"));
    }

    [Test]
    public void ExtraVariablesReachTheTemplateAsJsonValues()
    {
        var template = ChatTemplate.FromSource(
            "{% if tools %}{{ tools|tojson }}\n{% endif %}{{ messages[0].content }}{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}{{ eos_token }}",
            "kwargs", eosToken: "</s>");
        ChatTurn[] turns = [new("user", "hi")];
        Assert.That(template.Render(turns, true), Is.EqualTo("hi</s>"));
        var tools = JsonNode.Parse("""[{"type": "function", "function": {"name": "f", "parameters": {"n": 1, "x": 2.5, "ok": true, "none": null}}}]""");
        Assert.That(template.Render(turns, true, new Dictionary<string, JsonNode?> { ["enable_thinking"] = false, ["tools"] = tools, ["eos_token"] = "<end>" }),
            Is.EqualTo("""[{"type": "function", "function": {"name": "f", "parameters": {"n": 1, "x": 2.5, "ok": true, "none": null}}}]""" + "\nhi<think></think><end>"));
        Assert.Throws<ArgumentException>(() => template.Render(turns, true, new Dictionary<string, JsonNode?> { ["messages"] = new JsonArray() }));
    }

    [Test]
    public void RendersConcurrently()
    {
        var t = TemplateNamed("qwen3");
        var template = ChatTemplate.FromSource((string)t["template"]!, "qwen3");
        var cases = t["cases"]!.AsArray().Where(c => c!["expected"] is not null).ToList();
        Parallel.For(0, 200, i =>
        {
            var c = cases[i % cases.Count]!;
            Assert.That(template.Render(Turns(c["messages"]!), (bool)c["add_generation_prompt"]!), Is.EqualTo((string)c["expected"]!));
        });
    }
}
