using System.Text;
using Microsoft.ML.Tokenizers;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>
/// One row's generated text, decoded as its tokens arrive, with its stop sequences. Decoding is incremental, as vLLM
/// detokenizes: the tokens since the last complete character are decoded twice, with and without the newest, and the
/// difference is the new text; a difference that ends in U+FFFD (an incomplete UTF-8 character: GPT-2's byte-level
/// tokens split multi-byte characters) waits for the next token. What may be streamed also stops short of a suffix that
/// could begin a stop sequence, so text past where a stop sequence starts is never sent.
/// </summary>
internal sealed class TextStream(Tokenizer tokenizer, IReadOnlyList<string> stopSequences)
{
    readonly StringBuilder _text = new();
    readonly int _longestStop = stopSequences.Count == 0 ? 0 : stopSequences.Max(s => s.Length);
    int _prefixStart, _readStart;   // token offsets: decode window start, first token not yet in _text
    int _sent;                      // characters of _text handed out by TakeDelta
    int _stopAt = -1;               // where the first stop sequence starts, once found

    /// <summary>The text decoded so far (complete characters only).</summary>
    public string Text => _text.ToString();

    /// <summary>
    /// Decodes the newest of <paramref name="generated"/> (all generated ids so far); returns where the first stop
    /// sequence starts in the text, or -1.
    /// </summary>
    public int Add(IReadOnlyList<int> generated)
    {
        int before = _text.Length;
        string prefix = tokenizer.Decode(Slice(generated, _prefixStart, _readStart)), full = tokenizer.Decode(Slice(generated, _prefixStart, generated.Count));
        if (full.Length > prefix.Length && !full.EndsWith('\uFFFD'))
        {
            _text.Append(full, prefix.Length, full.Length - prefix.Length);
            _prefixStart = _readStart;
            _readStart = generated.Count;
        }
        if (_stopAt >= 0 || _longestStop == 0 || _text.Length == before) return _stopAt;
        // a stop sequence found now ends in the new text: search from where such a match can start
        int from = Math.Max(0, before - _longestStop + 1), cut = -1;
        var tail = _text.ToString(from, _text.Length - from);
        foreach (var stop in stopSequences)
        {
            int at = tail.IndexOf(stop, StringComparison.Ordinal);
            if (at >= 0 && (cut < 0 || at < cut)) cut = at;
        }
        return _stopAt = cut < 0 ? -1 : from + cut;
    }

    /// <summary>Text not handed out before that can be streamed now: complete characters, short of a stop sequence or a possible start of one.</summary>
    public string TakeDelta()
    {
        int safe = _stopAt >= 0 ? _stopAt : _text.Length - PossibleStopStart();
        if (safe <= _sent) return "";
        var delta = _text.ToString(_sent, safe - _sent);
        _sent = safe;
        return delta;
    }

    /// <summary>The rest of <paramref name="finalText"/> (the row's whole text, cut at a stop) after what was handed out.</summary>
    public string Finish(string finalText)
    {
        var rest = finalText.Length > _sent ? finalText[_sent..] : "";
        _sent = Math.Max(_sent, finalText.Length);
        return rest;
    }

    /// <summary>Length of the longest suffix of the text that is a proper prefix of a stop sequence.</summary>
    int PossibleStopStart()
    {
        for (int k = Math.Min(_longestStop - 1, _text.Length); k > 0; k--)
            foreach (var stop in stopSequences)
                if (stop.Length > k && EndsWith(stop.AsSpan(0, k))) return k;
        return 0;
    }

    bool EndsWith(ReadOnlySpan<char> piece)
    {
        int start = _text.Length - piece.Length;
        for (int i = 0; i < piece.Length; i++) if (_text[start + i] != piece[i]) return false;
        return true;
    }

    static IEnumerable<int> Slice(IReadOnlyList<int> ids, int from, int to)
    {
        for (int i = from; i < to; i++) yield return ids[i];
    }
}
