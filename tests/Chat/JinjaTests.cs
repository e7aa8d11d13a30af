using System.Text.Json.Nodes;
using OnnxLora.Pipeline.Deployment.Chat.Jinja;

namespace OnnxLora.Tests.Chat;

/// <summary>
/// The Jinja interpreter piece by piece against jinja2 itself (tools/fixtures/make_chat_templates.py): hand-written
/// snippets covering each statement, filter, test and method, 200 seeded random templates of whitespace control
/// (-/+ markers, trim_blocks, lstrip_blocks, comments, nesting) and 1500 seeded random expressions. Text must match
/// exactly; where jinja2 raises, the interpreter must raise too (raise_exception with the same message).
/// </summary>
public class JinjaTests
{
    static readonly JsonArray Cases = JsonNode.Parse(File.ReadAllText(
        Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "chat", "jinja_cases.json")))!["cases"]!.AsArray();

    public static IEnumerable<string> Groups() => ["snippet", "whitespace", "expression"];

    [TestCaseSource(nameof(Groups))]
    public void MatchesJinja2(string group)
    {
        var failures = new List<string>();
        int count = 0;
        foreach (var c in Cases.Where(c => ((string)c!["name"]!).StartsWith(group + " ", StringComparison.Ordinal)))
        {
            count++;
            var template = (string)c!["template"]!;
            var variables = ((OrderedDictionary<object, object?>)PyValue.FromJson(c["data"])!).ToDictionary(p => (string)p.Key, p => p.Value);
            string? text = null, error = null;
            bool raised = false;
            try { text = JinjaRenderer.Render(JinjaParser.Parse(template), variables, new RenderLimits()); }
            catch (JinjaException e) { error = e.Message; raised = e.Raised; }
            bool ok = c["expected"] is { } expected ? text == (string)expected!
                : c["raised"] is { } message ? raised && error == (string)message!
                : error is not null;
            if (!ok) failures.Add($"{c["name"]}: {template}\n  jinja2: {c["expected"] ?? c["raised"] ?? c["error"]}\n  here:   {text ?? "error: " + error}");
        }
        Assert.That(count, Is.GreaterThan(40));
        Assert.That(failures, Is.Empty, string.Join("\n", failures.Take(10)));
    }
}
