using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace OnnxLora.Pipeline.Data;

/// <summary>
/// Text ↔ token ids through Microsoft.ML.Tokenizers: GPT-2's byte-level BPE (its bundled vocabulary; works offline),
/// or a model folder's own tokenizer (<see cref="FromDirectory"/>): a Hugging Face <c>tokenizer.json</c> BPE, or a
/// SentencePiece <c>tokenizer.model</c>.
/// </summary>
public sealed class TextTokenizer
{
    /// <summary>The Hugging Face tokenizers file name.</summary>
    public const string TokenizerJson = "tokenizer.json";

    /// <summary>A WordPiece vocabulary (BERT-family encoders: one token a line, the line number is the id).</summary>
    public const string WordPieceVocab = "vocab.txt";
    /// <summary>The SentencePiece model file name (Llama 1/2, Mistral, …).</summary>
    public const string SentencePieceModel = "tokenizer.model";

    // GPT-2's pre-tokenization (the tokenizers library's ByteLevel pre-tokenizer with use_regex)
    const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    static readonly Lazy<TextTokenizer> Gpt2Instance = new(() => new TextTokenizer(TiktokenTokenizer.CreateForModel("gpt2"), 50256, 50257, "gpt2"));

    TextTokenizer(Tokenizer tokenizer, int endOfText, int vocabSize, string source)
    {
        Inner = tokenizer;
        EndOfText = endOfText;
        VocabSize = vocabSize;
        Source = source;
    }

    /// <summary>The GPT-2 tokenizer (vocabulary 50,257; &lt;|endoftext|&gt; = 50256).</summary>
    public static TextTokenizer Gpt2 => Gpt2Instance.Value;

    /// <summary>The Microsoft.ML.Tokenizers tokenizer underneath (for APIs that take one).</summary>
    public Tokenizer Inner { get; }

    /// <summary>The end-of-text token: separates documents and pads batches.</summary>
    public int EndOfText { get; }

    /// <summary>One more than the largest id the tokenizer produces.</summary>
    public int VocabSize { get; }

    /// <summary>Where the tokenizer came from ("gpt2", or the file).</summary>
    public string Source { get; }

    /// <summary>The text's token ids; a WordPiece (BERT) tokenizer puts [CLS] … [SEP] around them, as the encoder was trained.</summary>
    public int[] Encode(string text) => (Inner is BertTokenizer bert ? bert.EncodeToIds(text, addSpecialTokens: true) : Inner.EncodeToIds(text)).ToArray();

    public string Decode(IEnumerable<int> ids) => Inner.Decode(ids) ?? "";

    /// <summary>
    /// The tokenizer of a model folder: <c>tokenizer.json</c> if there is one, else <c>tokenizer.model</c>.
    /// </summary>
    /// <exception cref="FileNotFoundException">Neither file is there; the message says what works instead.</exception>
    public static TextTokenizer FromDirectory(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        var json = Path.Combine(directory, TokenizerJson);
        if (File.Exists(json)) return FromTokenizerJson(json);
        var vocab = Path.Combine(directory, WordPieceVocab);
        if (File.Exists(vocab) && !File.Exists(Path.Combine(directory, SentencePieceModel))) return FromWordPiece(vocab);
        var sp = Path.Combine(directory, SentencePieceModel);
        if (File.Exists(sp)) return FromSentencePiece(sp);
        throw new FileNotFoundException($"{directory}: no {TokenizerJson} or {SentencePieceModel}; leave the tokenizer out for GPT-2's, or give token ids with --format tokens", json);
    }

    /// <summary>A tokenizer file: <c>tokenizer.json</c>, <c>tokenizer.model</c>, a WordPiece <c>vocab.txt</c>, or a folder holding one of them.</summary>
    public static TextTokenizer Load(string path) =>
        Directory.Exists(path) ? FromDirectory(path)
        : path.EndsWith(".txt", StringComparison.OrdinalIgnoreCase) ? FromWordPiece(path)
        : Path.GetFileName(path) == SentencePieceModel || path.EndsWith(".model", StringComparison.Ordinal) ? FromSentencePiece(path)
        : FromTokenizerJson(path);

    /// <summary>
    /// A Hugging Face <c>tokenizer.json</c> whose model is BPE: vocabulary and merges from the file, byte-level when its
    /// pre-tokenizer or decoder is ByteLevel (GPT-2, SmolLM2, Qwen2, Llama 3), with the file's Split regex when it has
    /// one (else GPT-2's); added tokens are special tokens. The end-of-text token is tokenizer_config.json's
    /// <c>eos_token</c> beside it, else the first added token that looks like one. A SentencePiece-style file (Llama 2,
    /// Mistral: byte_fallback, Metaspace) is read from the <c>tokenizer.model</c> beside it.
    /// </summary>
    /// <exception cref="InvalidDataException">Not a BPE tokenizer.json; the message names the field.</exception>
    public static TextTokenizer FromTokenizerJson(string path)
    {
        var root = ReadObject(path);
        var model = root["model"] as JsonObject ?? throw new InvalidDataException($"{path}: no 'model' object (not a Hugging Face tokenizer.json)");
        var type = model["type"]?.GetValue<string>() ?? "BPE";
        if (type != "BPE") throw new InvalidDataException($"{path}: model.type is '{type}'; only BPE tokenizers are read (WordPiece/Unigram: give token ids with --format tokens)");
        if (model["vocab"] is not JsonObject vocabJson) throw new InvalidDataException($"{path}: model.vocab is missing");
        var vocab = new Dictionary<string, int>(vocabJson.Count, StringComparer.Ordinal);
        foreach (var (token, id) in vocabJson) vocab[token] = Id(id, $"model.vocab['{token}']");
        // merges are "a b" strings, or [a, b] pairs in newer files
        var merges = (model["merges"] as JsonArray ?? throw new InvalidDataException($"{path}: model.merges is missing")).Select((m, i) => m switch
        {
            JsonArray { Count: 2 } pair => $"{pair[0]!.GetValue<string>()} {pair[1]!.GetValue<string>()}",
            JsonValue v when v.TryGetValue<string>(out var s) && s.Contains(' ') => s,
            _ => throw new InvalidDataException($"{path}: model.merges[{i}] is neither \"a b\" nor [a, b]"),
        }).ToList();
        var special = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var added in root["added_tokens"] as JsonArray ?? [])
            if (added is JsonObject o && o["content"]?.GetValue<string>() is { } content) special[content] = Id(o["id"], $"added_tokens '{content}'");

        var preTokenizers = Flatten(root["pre_tokenizer"]).ToList();
        // Llama 2 / Mistral style: SentencePiece's BPE written as tokenizer.json ('▁' for spaces, byte fallback); its
        // tokenizer.model beside it is read instead, since this reader would split such text differently
        bool sentencePiece = model["byte_fallback"] is JsonValue fallback && fallback.TryGetValue<bool>(out var f) && f
                             || preTokenizers.Any(p => Type(p) == "Metaspace") || MentionsMetaspace(root["normalizer"]);
        if (sentencePiece)
        {
            var sp = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(path))!, SentencePieceModel);
            if (File.Exists(sp)) return FromSentencePiece(sp);
            throw new InvalidDataException($"{path}: a SentencePiece-style BPE (byte_fallback, '▁' for spaces) is read from its {SentencePieceModel}, which is not beside it; add it, or give token ids with --format tokens");
        }
        bool byteLevel = preTokenizers.Any(p => Type(p) == "ByteLevel") || Type(root["decoder"]) == "ByteLevel";
        var split = preTokenizers.FirstOrDefault(p => Type(p) == "Split")?["pattern"]?["Regex"]?.GetValue<string>();
        // a Digits pre-tokenizer with individual_digits (SmolLM2) isolates every digit before ByteLevel's regex
        bool singleDigits = preTokenizers.Any(p => Type(p) == "Digits" && p["individual_digits"] is JsonValue d && d.TryGetValue<bool>(out var one) && one);
        Regex pattern;
        try { pattern = new Regex(split ?? (singleDigits ? Gpt2Pattern.Replace(@" ?\p{N}+", @"\p{N}") : Gpt2Pattern), RegexOptions.Compiled); }
        catch (ArgumentException e) { throw new InvalidDataException($"{path}: pre_tokenizer Split regex is not one .NET can run ({e.Message})", e); }
        var options = new BpeOptions(vocab)
        {
            Merges = merges, ByteLevel = byteLevel, SpecialTokens = special.Count > 0 ? special : null,
            PreTokenizer = new RegexPreTokenizer(pattern, special.Count > 0 ? special : null),
            UnknownToken = model["unk_token"]?.GetValue<string>(),
        };
        var tokenizer = BpeTokenizer.Create(options);
        int vocabSize = Math.Max(vocab.Values.DefaultIfEmpty(-1).Max(), special.Values.DefaultIfEmpty(-1).Max()) + 1;
        return new TextTokenizer(tokenizer, EndOfTextId(path, special, vocab), vocabSize, path);

        int Id(JsonNode? node, string what) =>
            node is JsonValue v && v.TryGetValue<int>(out var id) && id >= 0 ? id : throw new InvalidDataException($"{path}: {what} is not a token id");
    }

    /// <summary>
    /// A BERT WordPiece vocabulary (<c>vocab.txt</c>) through Microsoft.ML.Tokenizers' BertTokenizer: lower-cased
    /// (uncased models, as all-MiniLM-L6-v2), [CLS] … [SEP] around every text; the end-of-text token is [SEP].
    /// </summary>
    public static TextTokenizer FromWordPiece(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file", path);
        BertTokenizer tokenizer;
        try { tokenizer = BertTokenizer.Create(path); }
        catch (Exception e) when (e is ArgumentException or InvalidOperationException or FormatException or InvalidDataException)
        {
            throw new InvalidDataException($"{path}: not a WordPiece vocabulary with [CLS], [SEP], [PAD] and [UNK] ({e.Message})", e);
        }
        return new TextTokenizer(tokenizer, tokenizer.SeparatorTokenId, File.ReadLines(path).Count(), path);   // one token a line
    }

    /// <summary>A SentencePiece <c>tokenizer.model</c> (Llama-style BPE; LlamaTokenizer.Create), encoding without BOS/EOS.</summary>
    public static TextTokenizer FromSentencePiece(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file", path);
        SentencePieceTokenizer tokenizer;
        try
        {
            using var stream = File.OpenRead(path);
            tokenizer = LlamaTokenizer.Create(stream, addBeginOfSentence: false, addEndOfSentence: false);
        }
        catch (Exception e) when (e is ArgumentException or InvalidOperationException or Google.Protobuf.InvalidProtocolBufferException or FormatException)
        {
            throw new InvalidDataException($"{path}: not a SentencePiece BPE model ({e.Message})", e);
        }
        return new TextTokenizer(tokenizer, tokenizer.EndOfSentenceId, tokenizer.Vocabulary.Count, path);
    }

    // tokenizer_config.json's eos_token (a string or {"content": …}), else a conventional name among the specials
    static int EndOfTextId(string path, Dictionary<string, int> special, Dictionary<string, int> vocab)
    {
        var configPath = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(path))!, "tokenizer_config.json");
        string? eos = null;
        if (File.Exists(configPath))
        {
            eos = TokenContent(ReadObject(configPath)["eos_token"]);
        }
        foreach (var name in new[] { eos, "<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>" })
            if (name is not null && (special.TryGetValue(name, out var id) || vocab.TryGetValue(name, out id))) return id;
        return special.Count > 0 ? special.Values.Min() : 0;
    }

    // a normalizer that writes '▁' (Replace " " → "▁", Prepend "▁"); ToJsonString escapes it as \u2581
    static bool MentionsMetaspace(JsonNode? normalizer) =>
        normalizer?.ToJsonString() is { } text && (text.Contains('▁') || text.Contains("\\u2581", StringComparison.OrdinalIgnoreCase));

    static IEnumerable<JsonObject> Flatten(JsonNode? node)
    {
        if (node is not JsonObject o) yield break;
        if (Type(o) == "Sequence")
        {
            foreach (var inner in o["pretokenizers"] as JsonArray ?? [])
                foreach (var x in Flatten(inner)) yield return x;
        }
        else yield return o;
    }

    static string? Type(JsonNode? node) => node is JsonObject o && o["type"] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;

    /// <summary>A special token as tokenizer_config.json writes it: a string, or an AddedToken object {"content": …}; else null.</summary>
    internal static string? TokenContent(JsonNode? node) => node switch
    {
        JsonObject o => TokenContent(o["content"]),
        JsonValue v when v.TryGetValue<string>(out var s) => s,
        _ => null,
    };

    internal static JsonObject ReadObject(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file", path);
        try { return JsonNode.Parse(File.ReadAllText(path))?.AsObject() ?? throw new InvalidDataException($"{path}: empty"); }
        catch (Exception e) when (e is JsonException or InvalidOperationException) { throw new InvalidDataException($"{path}: not a JSON object ({e.Message})", e); }
    }
}
