using OnnxLora.GraphRewrite.Artifacts;
using System.Text;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Runner;

namespace OnnxLora.Tests.Reliability;

/// <summary>
/// Hostile datasets and configs: every bad row is an error naming file:line and the field (or skipped and counted
/// with --skip-bad-rows), ids and labels are range-checked so nothing wraps to a real token, invalid UTF-8 is refused,
/// and YAML that nests too deep, uses complex keys or aliases, or a corrupt stages.json get one-line errors.
/// </summary>
[NonParallelizable]
public class ReadersDataTests
{
    static string WriteLines(TempDir dir, string name, params string[] lines)
    {
        var path = dir.File(name);
        File.WriteAllText(path, string.Join("\n", lines) + "\n");
        return path;
    }

    static Dataset Load(string path, DataFormat format, bool skip = false, TrainingTask task = TrainingTask.Lm, int classCount = 0, IReadOnlyList<string>? classNames = null) =>
        DatasetLoader.Load(path, new DatasetOptions { Format = format, SkipBadRows = skip, Task = task, ClassCount = classCount, ClassNames = classNames, VocabSize = format == DataFormat.Tokens ? 1000 : 50257, SeqLength = 16 });

    static readonly (string Case, DataFormat Format, string Line, string Expected)[] BadRows =
    [
        ("jsonl root array", DataFormat.Jsonl, "[1, 2]", "expected a JSON object, got an array"),
        ("jsonl root null", DataFormat.Jsonl, "null", "expected a JSON object, got null"),
        ("tokens root array", DataFormat.Tokens, "[1, 2]", "got an array"),
        ("tokens root null", DataFormat.Tokens, "null", "got null"),
        ("token id string", DataFormat.Tokens, """{"input_ids":[1,"a"]}""", "input_ids[1] is \"a\", expected an integer token id"),
        ("token id fraction", DataFormat.Tokens, """{"input_ids":[1.5]}""", "input_ids[0] is 1.5, expected an integer token id"),
        ("token id 1e11", DataFormat.Tokens, """{"input_ids":[1e11]}""", "input_ids[0] is 1e11, expected an integer token id"),
        ("labels not an array", DataFormat.Tokens, """{"input_ids":[1],"labels":5}""", "\"labels\" is a number, expected an array of integers"),
        ("label string", DataFormat.Tokens, """{"input_ids":[1,2],"labels":[1,"x"]}""", "labels[1] is \"x\""),
    ];

    static IEnumerable<TestCaseData> BadRowCases() => BadRows.Select(c => new TestCaseData(c.Case).SetName($"Data_refuses_{c.Case.Replace(' ', '_')}"));

    [TestCaseSource(nameof(BadRowCases))]
    public void Bad_rows_name_file_and_line_and_are_skippable(string name)
    {
        var c = BadRows.Single(x => x.Case == name);
        using var dir = new TempDir();
        var good = c.Format == DataFormat.Tokens ? """{"input_ids":[1,2,3]}""" : """{"text":"hello there"}""";
        var path = WriteLines(dir, "d.jsonl", good, c.Line);
        var e = Assert.Throws<InvalidDataException>(() => Load(path, c.Format))!;
        Assert.That(e.Message, Does.StartWith($"{path}:2: ").And.Contain(c.Expected));
        var skipped = Load(path, c.Format, skip: true);
        Assert.That((skipped.Examples.Count, skipped.SkippedRows), Is.EqualTo((1, 1)));
    }

    [Test]
    public void Negative_token_ids_and_labels_other_than_minus_100_are_refused()
    {
        using var dir = new TempDir();
        var e = Assert.Throws<InvalidDataException>(() => Load(WriteLines(dir, "a.jsonl", """{"input_ids":[1,-3]}"""), DataFormat.Tokens))!;
        Assert.That(e.Message, Does.EndWith("a.jsonl:1: token id -3 is outside the model's vocabulary (0..999)"));
        e = Assert.Throws<InvalidDataException>(() => Load(WriteLines(dir, "b.jsonl", """{"input_ids":[1,2,3],"labels":[-100,-5,3]}"""), DataFormat.Tokens))!;
        Assert.That(e.Message, Does.EndWith("b.jsonl:1: label -5 at position 1 is neither -100 (ignored) nor a token id (0..999)"));
        e = Assert.Throws<InvalidDataException>(() => Load(WriteLines(dir, "c.jsonl", """{"input_ids":[1,2],"labels":[1,1000]}"""), DataFormat.Tokens))!;
        Assert.That(e.Message, Does.Contain("c.jsonl:1: label 1000 at position 1"));

        var ok = Load(WriteLines(dir, "d.jsonl", """{"input_ids":[1,2,3],"labels":[-100,2,999]}"""), DataFormat.Tokens);
        Assert.That(ok.Examples.Single().Labels, Is.EqualTo(new[] { -100, 2, 999 }));
    }

    [Test]
    public void Class_labels_out_of_range_are_refused()
    {
        using var dir = new TempDir();
        var path = WriteLines(dir, "cls.jsonl", """{"input_ids":[1,2],"label":1}""", """{"input_ids":[3],"label":5}""");
        var e = Assert.Throws<InvalidDataException>(() => Load(path, DataFormat.Tokens, task: TrainingTask.Cls, classCount: 2))!;
        Assert.That(e.Message, Is.EqualTo($"{path}:2: class label 5 is outside the 2 classes (0..1)"));
        foreach (var bad in new[] { "-1", "1.5", "\"1\"" })
        {
            var p = WriteLines(dir, "neg.jsonl", "{\"input_ids\":[1],\"label\":" + bad + "}");
            e = Assert.Throws<InvalidDataException>(() => Load(p, DataFormat.Tokens, task: TrainingTask.Cls, classCount: 2))!;
            Assert.That(e.Message, Does.StartWith($"{p}:1: --task cls needs a non-negative integer \"label\""), bad);
        }
        Assert.That(Load(path, DataFormat.Tokens, task: TrainingTask.Cls, classCount: 6).Examples.Select(x => x.ClassLabel), Is.EqualTo(new[] { 1, 5 }));
    }

    [TestCase(DataFormat.Jsonl, "d.jsonl")]
    [TestCase(DataFormat.Tsv, "d.tsv")]
    [TestCase(DataFormat.Text, "d.txt")]
    public void Invalid_utf8_is_refused_with_its_line(DataFormat format, string name)
    {
        using var dir = new TempDir();
        var path = dir.File(name);
        var first = format switch { DataFormat.Jsonl => """{"text":"café ☕"}""", DataFormat.Tsv => "pos\tcafé ☕", _ => "café ☕" };
        var third = format switch { DataFormat.Jsonl => "{\"text\":\"bad ", DataFormat.Tsv => "neg\tbad ", _ => "bad " };
        var bytes = Encoding.UTF8.GetBytes(first + "\n" + first + "\n" + third).Concat(new byte[] { 0xC3, 0x28 }).Concat(Encoding.UTF8.GetBytes(format == DataFormat.Jsonl ? "\"}\n" : "\n")).ToArray();
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<InvalidDataException>(() => Load(path, format, task: format == DataFormat.Tsv ? TrainingTask.Cls : TrainingTask.Lm))!;
        int offset = 2 * (Encoding.UTF8.GetByteCount(first) + 1) + Encoding.UTF8.GetByteCount(third);
        Assert.That(e.Message, Is.EqualTo($"{path}:3: not valid UTF-8 (byte {offset}); save the file as UTF-8"));

        File.WriteAllBytes(path, Encoding.UTF8.GetBytes(first + "\n"));
        var ok = Load(path, format, task: format == DataFormat.Tsv ? TrainingTask.Cls : TrainingTask.Lm);
        Assert.That(ok.Examples, Is.Not.Empty, "valid multi-byte UTF-8 loads");
    }

    [Test]
    public void Duplicate_labels_are_refused_on_the_command_line_and_in_the_loader()
    {
        using var dir = new TempDir();
        var (code, _, err) = CliRunner.Run("train", "--model", dir.File("rw"), "--data", dir.File("d.tsv"), "--task", "cls", "--labels", "ham,ham", "--out", dir.File("run"));
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err.Trim(), Is.EqualTo("error: --labels: 'ham' is given 2 times in ham,ham; each class needs its own label"));
        var data = WriteLines(dir, "d.tsv", "ham\thello");
        Assert.Throws<ArgumentException>(() => Load(data, DataFormat.Tsv, task: TrainingTask.Cls, classNames: ["ham", "spam", "ham"]));
    }

    // ---- YAML config and stages.json ----

    [Test]
    public void Twenty_thousand_deep_nesting_is_an_error_not_a_stack_overflow()
    {
        foreach (var (open, close) in new[] { ("[", "]"), ("{a: ", "}") })
        {
            var text = "lora:\n  targets: " + string.Concat(Enumerable.Repeat(open, 20_000)) + "x" + string.Concat(Enumerable.Repeat(close, 20_000)) + "\n";
            var e = Assert.Throws<InvalidDataException>(() => PipelineConfig.Parse(text, "deep.yaml", "/"))!;
            Assert.That(e.Message, Is.EqualTo("deep.yaml: nesting deeper than 16 levels at line 2; a config is sections of keys"));
        }
    }

    [TestCase("? [a, b]\n: 1\n", "deep.yaml: line 1: a key must be a plain name, not a list")]
    [TestCase("train:\n  ? {x: 1}\n  : 2\n", "deep.yaml: line 2: a key must be a plain name, not a mapping")]
    [TestCase("lora:\n  targets: [&a [x, x, x], *a, *a, *a]\n", "deep.yaml: 'lora.targets' must be a list of plain values")]
    public void Complex_keys_and_aliases_get_one_line_errors(string text, string expected)
    {
        var e = Assert.Throws<InvalidDataException>(() => PipelineConfig.Parse(text, "deep.yaml", "/"))!;
        Assert.That(e.Message, Is.EqualTo(expected));
    }

    [Test]
    public void A_billion_laughs_config_fails_on_its_first_alias_without_expanding()
    {
        var sb = new StringBuilder("lora:\n  targets: [&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]");
        for (int i = 1; i < 10; i++) sb.Append($", &l{i} [{string.Join(", ", Enumerable.Repeat($"*l{i - 1}", 9))}]");
        sb.Append("]\n");
        var e = Assert.Throws<InvalidDataException>(() => PipelineConfig.Parse(sb.ToString(), "laughs.yaml", "/"))!;
        Assert.That(e.Message, Is.EqualTo("laughs.yaml: 'lora.targets' must be a list of plain values"));
    }

    [Test]
    public void An_oversized_config_is_refused()
    {
        var text = "# " + new string('x', 2 << 20) + "\n";
        var e = Assert.Throws<InvalidDataException>(() => PipelineConfig.Parse(text, "big.yaml", "/"))!;
        Assert.That(e.Message, Does.StartWith("big.yaml: 2,097,155 characters is too large for a config"));
    }

    [TestCase("[1, 2]", "expected a JSON object of stages")]
    [TestCase("{\"model\": {\"hash\": 5, \"output\": \"m.onnx\"}}", "stage 'model' is not {\"hash\": \"…\", \"output\": \"…\"}")]
    [TestCase("{\"model\": ", "not valid JSON")]
    public void A_corrupt_stages_json_is_a_clear_error(string contents, string expected)
    {
        using var dir = new TempDir();
        var runDir = dir.File("run");
        OnnxLora.GraphRewrite.Graphs.OutputFolder.Mark(runDir, "run");   // an earlier run's folder, as the runner marks it
        var stages = Path.Combine(runDir, "stages.json");
        File.WriteAllText(stages, contents);
        var config = PipelineConfig.Parse(DemoData.DefaultConfig, "test", runDir);
        config.Override($"run_dir={runDir}");
        var e = Assert.Throws<InvalidDataException>(() => new PipelineRunner(config).Run())!;
        Assert.That(e.Message, Does.StartWith($"{stages}: ").And.Contain(expected).And.EndWith("; delete it to run every stage again"));
    }
}
