using System.Text.Json.Nodes;
using Google.Protobuf;
using OnnxLora.Pipeline.Data;

namespace OnnxLora.Tests.Models;

/// <summary>
/// Model-folder tokenizers read through Microsoft.ML.Tokenizers: a byte-level BPE tokenizer.json written here (the
/// 256 byte symbols plus a few merges), with and without a Split pre-tokenizer, and a SentencePiece tokenizer.model
/// written here as its protobuf.
/// </summary>
public class TokenizerTests
{
    // GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to U+0100 onwards (space → 'Ġ')
    static string[] ByteSymbols()
    {
        var printable = Enumerable.Range('!', '~' - '!' + 1).Concat(Enumerable.Range('¡', '¬' - '¡' + 1)).Concat(Enumerable.Range('®', 'ÿ' - '®' + 1)).ToHashSet();
        var symbols = new string[256];
        int next = 0;
        for (int b = 0; b < 256; b++) symbols[b] = ((char)(printable.Contains(b) ? b : 256 + next++)).ToString();
        return symbols;
    }

    static readonly string[] Merges = ["h e", "l l", "ll o", "Ġ t", "Ġt he", "he llo"];

    internal static string WriteTokenizerJson(TempDir dir, JsonNode preTokenizer, bool mergesAsPairs = false)
    {
        var vocab = new JsonObject();
        var symbols = ByteSymbols();
        for (int b = 0; b < 256; b++) vocab[symbols[b]] = b;
        foreach (var m in Merges) vocab[m.Replace(" ", "")] = vocab.Count;   // he 256, ll 257, llo 258, Ġt 259, Ġthe 260, hello 261
        var json = new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = new JsonArray(new JsonObject { ["id"] = 262, ["content"] = "<|endoftext|>", ["special"] = true }),
            ["pre_tokenizer"] = preTokenizer,
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel" },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["vocab"] = vocab,
                // tokenizers ≥ 0.20 writes each merge as a pair
                ["merges"] = new JsonArray(Merges.Select(m => mergesAsPairs ? new JsonArray(m.Split(' ').Select(p => (JsonNode?)p).ToArray()) : (JsonNode?)JsonValue.Create(m)).ToArray()),
            },
        };
        var path = dir.File(TextTokenizer.TokenizerJson);
        File.WriteAllText(path, json.ToJsonString());
        return path;
    }

    internal static JsonNode ByteLevel() => new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = true };

    // Llama 3 / Qwen2 style: a Split regex, then ByteLevel without its own regex
    static JsonNode SplitThenByteLevel() => new JsonObject
    {
        ["type"] = "Sequence",
        ["pretokenizers"] = new JsonArray(
            new JsonObject { ["type"] = "Split", ["pattern"] = new JsonObject { ["Regex"] = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+" }, ["behavior"] = "Isolated" },
            new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = false }),
    };

    [TestCase("ByteLevel")]
    [TestCase("Split+ByteLevel")]
    [TestCase("ByteLevel, merges as pairs")]
    public void TokenizerJsonBpeMergesAndRoundTrips(string kind)
    {
        using var dir = new TempDir();
        WriteTokenizerJson(dir, kind.StartsWith("Split", StringComparison.Ordinal) ? SplitThenByteLevel() : ByteLevel(), mergesAsPairs: kind.EndsWith("pairs", StringComparison.Ordinal));
        var tokenizer = TextTokenizer.FromDirectory(dir.Path);
        Assert.That(tokenizer.VocabSize, Is.EqualTo(263));
        Assert.That(tokenizer.EndOfText, Is.EqualTo(262));
        // merges in rank order: "hello" → he·ll → he·llo → hello; " the" → Ġt·he → Ġthe; bytes for the rest
        Assert.That(tokenizer.Encode("hello the"), Is.EqualTo(new[] { 261, 260 }));
        Assert.That(tokenizer.Encode("hello<|endoftext|>"), Is.EqualTo(new[] { 261, 262 }));
        Assert.That(tokenizer.Encode("ah"), Is.EqualTo(new[] { 97, 104 }));
        foreach (var text in new[] { "hello the world", "Grüße, 世界! 😀 tabs\tand\nnewlines  ", "" })
            Assert.That(tokenizer.Decode(tokenizer.Encode(text)), Is.EqualTo(text), text);
    }

    [TestCase(false, new[] { 256 })]
    [TestCase(true, new[] { 49, 50 })]
    public void DigitsPreTokenizerKeepsDigitsApart(bool individualDigits, int[] expected)
    {
        using var dir = new TempDir();
        var vocab = new JsonObject();
        var symbols = ByteSymbols();
        for (int b = 0; b < 256; b++) vocab[symbols[b]] = b;
        vocab["12"] = 256;
        var pre = new JsonArray(new JsonObject { ["type"] = "ByteLevel", ["use_regex"] = true });
        if (individualDigits) pre.Insert(0, new JsonObject { ["type"] = "Digits", ["individual_digits"] = true });
        var json = new JsonObject
        {
            ["pre_tokenizer"] = new JsonObject { ["type"] = "Sequence", ["pretokenizers"] = pre },
            ["model"] = new JsonObject { ["type"] = "BPE", ["vocab"] = vocab, ["merges"] = new JsonArray("1 2") },
        };
        File.WriteAllText(dir.File(TextTokenizer.TokenizerJson), json.ToJsonString());
        var tokenizer = TextTokenizer.FromDirectory(dir.Path);
        Assert.That(tokenizer.Encode("12"), Is.EqualTo(expected));
        Assert.That(tokenizer.Decode(tokenizer.Encode("a 12 b")), Is.EqualTo("a 12 b"));
    }

    [Test]
    public void BadTokenizerFilesAreNamed()
    {
        using var dir = new TempDir();
        var ex = Assert.Throws<FileNotFoundException>(() => TextTokenizer.FromDirectory(dir.Path));
        StringAssert.Contains("--format tokens", ex!.Message);
        var path = dir.File(TextTokenizer.TokenizerJson);
        File.WriteAllText(path, """{"model":{"type":"WordPiece","vocab":{}}}""");
        StringAssert.Contains("model.type is 'WordPiece'", Assert.Throws<InvalidDataException>(() => TextTokenizer.Load(path))!.Message);
        File.WriteAllText(path, """{"model":{"type":"BPE","vocab":{"a":0},"merges":["ab"]}}""");
        StringAssert.Contains("model.merges[0]", Assert.Throws<InvalidDataException>(() => TextTokenizer.Load(path))!.Message);
    }

    /// <summary>A SentencePiece BPE model: sentencepiece_model.proto's fields written by hand.</summary>
    static byte[] SentencePieceModel(string[] pieces, float[] scores, int[] types)
    {
        using var ms = new MemoryStream();
        var o = new CodedOutputStream(ms);
        for (int i = 0; i < pieces.Length; i++)
        {
            var p = new MemoryStream();
            var po = new CodedOutputStream(p);
            po.WriteTag(1, WireFormat.WireType.LengthDelimited); po.WriteString(pieces[i]);
            po.WriteTag(2, WireFormat.WireType.Fixed32); po.WriteFloat(scores[i]);
            po.WriteTag(3, WireFormat.WireType.Varint); po.WriteInt32(types[i]);
            po.Flush();
            o.WriteTag(1, WireFormat.WireType.LengthDelimited); o.WriteBytes(ByteString.CopyFrom(p.ToArray()));
        }
        var t = new MemoryStream();
        var to = new CodedOutputStream(t);
        to.WriteTag(3, WireFormat.WireType.Varint); to.WriteInt32(2);      // model_type BPE
        to.WriteTag(40, WireFormat.WireType.Varint); to.WriteInt32(0);     // unk_id
        to.WriteTag(41, WireFormat.WireType.Varint); to.WriteInt32(1);     // bos_id
        to.WriteTag(42, WireFormat.WireType.Varint); to.WriteInt32(2);     // eos_id
        to.Flush();
        o.WriteTag(2, WireFormat.WireType.LengthDelimited); o.WriteBytes(ByteString.CopyFrom(t.ToArray()));
        var n = new MemoryStream();
        var no = new CodedOutputStream(n);
        no.WriteTag(1, WireFormat.WireType.LengthDelimited); no.WriteString("identity");
        no.WriteTag(3, WireFormat.WireType.Varint); no.WriteBool(true);    // add_dummy_prefix
        no.WriteTag(4, WireFormat.WireType.Varint); no.WriteBool(true);    // remove_extra_whitespaces
        no.WriteTag(5, WireFormat.WireType.Varint); no.WriteBool(true);    // escape_whitespaces
        no.Flush();
        o.WriteTag(3, WireFormat.WireType.LengthDelimited); o.WriteBytes(ByteString.CopyFrom(n.ToArray()));
        o.Flush();
        return ms.ToArray();
    }

    [TestCase(false)]
    [TestCase(true)]
    public void SentencePieceModelEncodesAndRoundTrips(bool besideSentencePieceStyleJson)
    {
        using var dir = new TempDir();
        string[] pieces = ["<unk>", "<s>", "</s>", "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world"];
        var scores = pieces.Select((_, i) => i < 11 ? 0f : -(float)i).ToArray();   // earlier merges score higher
        var types = pieces.Select((_, i) => i == 0 ? 2 : i < 3 ? 3 : 1).ToArray();  // UNKNOWN, CONTROL, NORMAL
        if (besideSentencePieceStyleJson)
        {
            // Llama 2 style tokenizer.json (Metaspace, byte_fallback): without its tokenizer.model it is refused, with it that is read
            File.WriteAllText(dir.File(TextTokenizer.TokenizerJson), """{"normalizer":{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"▁"},{"type":"Replace","pattern":{"String":" "},"content":"▁"}]},"pre_tokenizer":null,"model":{"type":"BPE","vocab":{"a":0},"merges":[]}}""");
            StringAssert.Contains("tokenizer.model", Assert.Throws<InvalidDataException>(() => TextTokenizer.FromDirectory(dir.Path))!.Message);
        }
        File.WriteAllBytes(dir.File(TextTokenizer.SentencePieceModel), SentencePieceModel(pieces, scores, types));
        var tokenizer = TextTokenizer.FromDirectory(dir.Path);
        Assert.That(tokenizer.EndOfText, Is.EqualTo(2));
        Assert.That(tokenizer.VocabSize, Is.EqualTo(pieces.Length));
        var ids = tokenizer.Encode("hello world");
        Assert.That(ids, Is.EqualTo(new[] { Array.IndexOf(pieces, "▁hello"), Array.IndexOf(pieces, "▁world") }));
        Assert.That(tokenizer.Decode(ids), Is.EqualTo("hello world"));
    }
}

/// <summary>A model folder's tokenizer through the CLI: train on text and generate from a prompt with --tokenizer.</summary>
public class TokenizerCliTests
{
    [Test]
    public void TrainAndGenerateUseTheModelsTokenizer()
    {
        using var dir = new TempDir();
        TokenizerTests.WriteTokenizerJson(dir, TokenizerTests.ByteLevel());
        Assert.That(CliRunner.Run("model", "build", "--arch", "llama", "--preset", "tiny", "--out", dir.File("m.onnx")).Code, Is.EqualTo(0));
        var (code, _, err) = CliRunner.Run("rewrite", dir.File("m.onnx"), "--out", dir.File("rw"), "--rank", "2", "--targets", "q_proj,v_proj");
        Assert.That(code, Is.EqualTo(0), err);
        File.WriteAllText(dir.File("train.txt"), string.Concat(Enumerable.Repeat("hello the world. ", 40)));
        (code, var stdout, err) = CliRunner.Run("train", "--model", dir.File("rw"), "--data", dir.File("train.txt"), "--format", "text", "--seq", "16",
            "--batch", "2", "--max-steps", "3", "--tokenizer", dir.Path, "--threads", "1", "--out", dir.File("run"));
        Assert.That(code, Is.EqualTo(0), err + stdout);

        // GPT-2's tokenizer would give ids past this 512-token vocabulary: without --tokenizer, text is refused
        (code, _, err) = CliRunner.Run("generate", "--model", dir.File("rw"), "--prompt", "hello the", "-n", "4");
        Assert.That(code, Is.EqualTo(1));
        StringAssert.Contains("--tokenizer", err);
        (code, stdout, err) = CliRunner.Run("generate", "--model", dir.File("rw"), "--tokenizer", Path.Combine(dir.Path, "tokenizer.json"),
            "--prompt", "hello the", "-n", "4", "--seed", "1");
        Assert.That(code, Is.EqualTo(0), err);
        StringAssert.StartsWith("hello the", stdout.Trim());
    }
}

/// <summary>`onnxlora run` with a Llama-family model: built from a preset with a folder's tokenizer, or read from a Hugging Face folder.</summary>
public class LlamaPipelineTests
{
    [TestCase("preset")]
    [TestCase("from")]
    public void RunConfigBuildsTrainsAndExports(string source)
    {
        using var dir = new TempDir();
        string model;
        string data;
        if (source == "preset")
        {
            TokenizerTests.WriteTokenizerJson(dir, TokenizerTests.ByteLevel());
            File.WriteAllText(dir.File("train.txt"), string.Concat(Enumerable.Repeat("hello the world. ", 60)));
            model = "  arch: llama\n  preset: tiny\n";
            data = $"  train: {dir.File("train.txt")}\n  format: text\n  tokenizer: {dir.Path}\n";
        }
        else
        {
            var random = new Random(2);
            File.WriteAllLines(dir.File("train.jsonl"), Enumerable.Range(0, 24).Select(i =>
                "{\"input_ids\":[" + string.Join(",", Enumerable.Range(0, 6 + i % 5).Select(_ => random.Next(1, 128))) + "]}"));
            model = $"  from: {Path.Combine(TestContext.CurrentContext.TestDirectory, "fixtures", "llama", "hf-llama")}\n";
            data = $"  train: {dir.File("train.jsonl")}\n  eval: {dir.File("train.jsonl")}\n  format: tokens\n";
        }
        File.WriteAllText(dir.File("run.yaml"),
            $"run_dir: {dir.File("run")}\nmodel:\n{model}lora:\n  targets: q_proj,v_proj\n  rank: 4\ndata:\n{data}  task: lm\n  seq: 16\n" +
            "train:\n  epochs: 1\n  max_steps: 3\n  batch: 4\n  threads: 1\nexport:\n  formats: [onnx-adapter, peft]\nevaluate:\n  examples: 2\n");
        var (code, stdout, stderr) = CliRunner.Run("run", dir.File("run.yaml"));
        Assert.That(code, Is.EqualTo(0), stderr + stdout);
        var onnx = Directory.GetFiles(dir.File("run"), "*.onnx_adapter", SearchOption.AllDirectories);
        Assert.That(onnx, Is.Not.Empty);
    }
}
