using Microsoft.ML.Tokenizers;

namespace OnnxLora.Pipeline.Data;

/// <summary>GPT-2's byte-level BPE (Microsoft.ML.Tokenizers + its bundled gpt2 vocabulary; works offline).</summary>
public sealed class TextTokenizer
{
    static readonly Lazy<TextTokenizer> Gpt2Instance = new(() => new TextTokenizer(TiktokenTokenizer.CreateForModel("gpt2")));

    readonly Tokenizer _tokenizer;

    TextTokenizer(Tokenizer tokenizer) => _tokenizer = tokenizer;

    /// <summary>The GPT-2 tokenizer (vocabulary 50,257; &lt;|endoftext|&gt; = 50256).</summary>
    public static TextTokenizer Gpt2 => Gpt2Instance.Value;

    /// <summary>&lt;|endoftext|&gt;: separates documents and pads batches.</summary>
    public int EndOfText => 50256;

    public int VocabSize => 50257;

    public int[] Encode(string text) => _tokenizer.EncodeToIds(text).ToArray();

    public string Decode(IEnumerable<int> ids) => _tokenizer.Decode(ids) ?? "";
}
