using System.Globalization;
using System.Text;

namespace OnnxLora.Pipeline.Deployment.Chat.Jinja;

/// <summary>A template error at a line: the interpreter adds the template's name.</summary>
sealed class JinjaException(int line, string message, bool raised = false) : Exception(message)
{
    public int Line { get; } = line;

    /// <summary>True for the template's own raise_exception(msg).</summary>
    public bool Raised { get; } = raised;
}

enum TokenKind { Name, String, Integer, Float, Operator, End }

readonly record struct Token(TokenKind Kind, string Text, int Line, object? Value = null)
{
    public bool Is(string op) => Kind == TokenKind.Operator && Text == op;
    public bool IsName(string name) => Kind == TokenKind.Name && Text == name;
    public override string ToString() => Kind == TokenKind.End ? "end of tag" : $"'{Text}'";
}

enum SegmentKind { Text, Output, Statement }

/// <summary>A piece of a template: literal text, an {{ expression }} or a {% statement %} (its tokens, End last).</summary>
sealed record Segment(SegmentKind Kind, int Line, string Text, IReadOnlyList<Token> Tokens);

/// <summary>
/// Splits a template into text, {{ … }} and {% … %} the way Jinja2's lexer does with trim_blocks and lstrip_blocks
/// (what transformers renders chat templates with): "-" beside a delimiter strips all whitespace on that side, "+"
/// keeps it; a block or comment tag alone on its line loses the indentation before it and the newline after it;
/// comments vanish; one trailing newline of the template is dropped (keep_trailing_newline=False).
/// </summary>
static class JinjaLexer
{
    static readonly string[] Operators = ["//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "=", ".", ",", ":", "|", "(", ")", "[", "]", "{", "}"];

    public static List<Segment> Split(string source)
    {
        source = source.Replace("\r\n", "\n").Replace('\r', '\n');
        if (source.EndsWith('\n')) source = source[..^1];
        var segments = new List<Segment>();
        int pos = 0, line = 1;
        bool lineStarting = true;
        while (pos < source.Length)
        {
            int open = NextOpening(source, pos);
            var text = source[pos..(open < 0 ? source.Length : open)];
            if (open < 0) { Add(segments, SegmentKind.Text, line, text); break; }
            char kind = source[open + 1];                           // '{', '%' or '#'
            char sign = open + 2 < source.Length && source[open + 2] is '-' or '+' ? source[open + 2] : '\0';
            if (sign == '-') text = text.TrimEnd();
            else if (sign != '+' && kind != '{')
            {
                // lstrip_blocks: only whitespace between the line's start and a block or comment tag goes
                int lineStart = text.LastIndexOf('\n') + 1;
                if ((lineStart > 0 || lineStarting) && lineStart < text.Length && text.AsSpan(lineStart).Trim().IsEmpty) text = text[..lineStart];
            }
            Add(segments, SegmentKind.Text, line, text);
            line += Count(source, pos, open);
            int tagLine = line;
            int inner = open + 2 + (sign == '\0' ? 0 : 1);
            int end;
            char endSign;
            if (kind == '#')
            {
                int close = source.IndexOf("#}", inner, StringComparison.Ordinal);
                if (close < 0) throw new JinjaException(tagLine, "a comment {# is not closed");
                endSign = close > inner && source[close - 1] is '-' or '+' ? source[close - 1] : '\0';
                end = close + 2;
            }
            else
            {
                var tokens = Tokenize(source, inner, kind == '{' ? '}' : '%', ref line, out end, out endSign);
                if (kind == '%' && tokens is [{ Kind: TokenKind.Name, Text: "raw" }, { Kind: TokenKind.End }])
                {
                    pos = Raw(source, end, endSign, segments, ref line);
                    lineStarting = pos > 0 && source[pos - 1] == '\n';
                    continue;
                }
                segments.Add(new Segment(kind == '{' ? SegmentKind.Output : SegmentKind.Statement, tagLine, "", tokens));
            }
            line = tagLine + Count(source, open, end);
            int after = end;
            if (endSign == '-') while (after < source.Length && char.IsWhiteSpace(source[after])) after++;
            else if (endSign != '+' && kind != '{' && after < source.Length && source[after] == '\n') after++;   // trim_blocks
            line += Count(source, end, after);
            lineStarting = after > 0 && source[after - 1] == '\n';
            pos = after;
        }
        return segments;
    }

    static readonly System.Text.RegularExpressions.Regex EndRaw = new(@"\{%([-+]?)\s*endraw\s*([-+]?)%\}", System.Text.RegularExpressions.RegexOptions.Compiled);

    /// <summary>
    /// {% raw %}…{% endraw %}: the text between is output as written. As in Jinja, the opening tag keeps the newline
    /// after it (no trim_blocks) unless it ends with "-%}"; the closing tag strips and trims as any block tag.
    /// </summary>
    static int Raw(string source, int end, char endSign, List<Segment> segments, ref int line)
    {
        int start = end;
        if (endSign == '-') while (start < source.Length && char.IsWhiteSpace(source[start])) start++;
        var match = EndRaw.Match(source, start);
        if (!match.Success) throw new JinjaException(line, "missing {% endraw %}");
        var text = source[start..match.Index];
        char left = match.Groups[1].Value is [var l] ? l : '\0', right = match.Groups[2].Value is [var r] ? r : '\0';
        if (left == '-') text = text.TrimEnd();
        else if (left != '+')
        {
            int lineStart = text.LastIndexOf('\n') + 1;
            bool startsLine = start > 0 && source[start - 1] == '\n';
            if ((lineStart > 0 || startsLine) && lineStart < text.Length && text.AsSpan(lineStart).Trim().IsEmpty) text = text[..lineStart];
        }
        Add(segments, SegmentKind.Text, line, text);
        int after = match.Index + match.Length;
        if (right == '-') while (after < source.Length && char.IsWhiteSpace(source[after])) after++;
        else if (right != '+' && after < source.Length && source[after] == '\n') after++;
        line += Count(source, end, after);
        return after;
    }

    static void Add(List<Segment> segments, SegmentKind kind, int line, string text)
    {
        if (text.Length > 0) segments.Add(new Segment(kind, line, text, []));
    }

    static int Count(string s, int from, int to)
    {
        int n = 0;
        for (int i = from; i < to; i++) if (s[i] == '\n') n++;
        return n;
    }

    static int NextOpening(string s, int from)
    {
        for (int i = s.IndexOf('{', from); i >= 0 && i + 1 < s.Length; i = s.IndexOf('{', i + 1))
            if (s[i + 1] is '{' or '%' or '#') return i;
        return -1;
    }

    /// <summary>The tokens of a tag from <paramref name="pos"/> to its closing "}}" or "%}" (outside brackets, as Jinja balances them).</summary>
    static List<Token> Tokenize(string s, int pos, char closer, ref int line, out int end, out char endSign)
    {
        var tokens = new List<Token>();
        var brackets = new Stack<char>();
        while (true)
        {
            while (pos < s.Length && char.IsWhiteSpace(s[pos])) { if (s[pos] == '\n') line++; pos++; }
            if (pos >= s.Length) throw new JinjaException(line, closer == '}' ? "an expression {{ is not closed" : "a statement {% is not closed");
            if (brackets.Count == 0)
            {
                foreach (var sign in new[] { '-', '+', '\0' })
                {
                    int at = sign == '\0' ? pos : pos + 1;
                    if (sign != '\0' && (pos >= s.Length || s[pos] != sign)) continue;
                    if (at + 1 < s.Length && s[at] == closer && s[at + 1] == '}')
                    {
                        // like Jinja, "-}}" is always the delimiter with its strip marker, never a minus before "}}"
                        end = at + 2;
                        endSign = sign;
                        tokens.Add(new Token(TokenKind.End, "", line));
                        return tokens;
                    }
                }
            }
            char c = s[pos];
            if (c is '"' or '\'') { tokens.Add(ReadString(s, ref pos, ref line)); continue; }
            if (char.IsAsciiDigit(c)) { tokens.Add(ReadNumber(s, ref pos, line)); continue; }
            if (char.IsLetter(c) || c == '_')
            {
                int start = pos;
                while (pos < s.Length && (char.IsLetterOrDigit(s[pos]) || s[pos] == '_')) pos++;
                tokens.Add(new Token(TokenKind.Name, s[start..pos], line));
                continue;
            }
            var op = Operators.FirstOrDefault(o => string.CompareOrdinal(s, pos, o, 0, o.Length) == 0)
                ?? throw new JinjaException(line, $"unexpected character '{c}'");
            if (op is "(" or "[" or "{") brackets.Push(op[0]);
            else if (op is ")" or "]" or "}")
            {
                char expected = op == ")" ? '(' : op == "]" ? '[' : '{';
                if (brackets.Count == 0 || brackets.Pop() != expected) throw new JinjaException(line, $"unexpected '{op}'");
            }
            tokens.Add(new Token(TokenKind.Operator, op, line));
            pos += op.Length;
        }
    }

    static Token ReadNumber(string s, ref int pos, int line)
    {
        int start = pos;
        while (pos < s.Length && (char.IsAsciiDigit(s[pos]) || s[pos] == '_')) pos++;
        bool isFloat = false;
        if (pos + 1 < s.Length && s[pos] == '.' && char.IsAsciiDigit(s[pos + 1]))
        {
            isFloat = true;
            pos++;
            while (pos < s.Length && (char.IsAsciiDigit(s[pos]) || s[pos] == '_')) pos++;
        }
        if (pos < s.Length && s[pos] is 'e' or 'E')
        {
            int e = pos + 1;
            if (e < s.Length && s[e] is '+' or '-') e++;
            if (e < s.Length && char.IsAsciiDigit(s[e]))
            {
                isFloat = true;
                pos = e;
                while (pos < s.Length && char.IsAsciiDigit(s[pos])) pos++;
            }
        }
        var text = s[start..pos].Replace("_", "");
        if (isFloat) return new Token(TokenKind.Float, text, line, double.Parse(text, CultureInfo.InvariantCulture));
        // Python's integers have no limit; one past 64 bits is kept as a float (it prints differently)
        if (!long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var value)) return new Token(TokenKind.Float, text, line, double.Parse(text, CultureInfo.InvariantCulture));
        return new Token(TokenKind.Integer, text, line, value);
    }

    /// <summary>A quoted string with Python's escapes (\n \t \\ \' \" \xhh \uhhhh \Uhhhhhhhh; an unknown escape stays as written).</summary>
    static Token ReadString(string s, ref int pos, ref int line)
    {
        char quote = s[pos];
        int startLine = line;
        var sb = new StringBuilder();
        pos++;
        while (true)
        {
            if (pos >= s.Length) throw new JinjaException(startLine, "a string is not closed");
            char c = s[pos++];
            if (c == quote) break;
            if (c == '\n') line++;
            if (c != '\\' || pos >= s.Length) { sb.Append(c); continue; }
            char e = s[pos++];
            switch (e)
            {
                case 'n': sb.Append('\n'); break;
                case 't': sb.Append('\t'); break;
                case 'r': sb.Append('\r'); break;
                case 'b': sb.Append('\b'); break;
                case 'f': sb.Append('\f'); break;
                case 'v': sb.Append('\v'); break;
                case 'a': sb.Append('\a'); break;
                case '0': sb.Append('\0'); break;
                case '\\' or '\'' or '"': sb.Append(e); break;
                case '\n': line++; break;                          // a backslash-newline joins lines
                case 'x' or 'u' or 'U':
                    int digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                    if (pos + digits > s.Length || !int.TryParse(s.AsSpan(pos, digits), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out var code) || code > 0x10FFFF)
                        throw new JinjaException(line, $"bad \\{e} escape in a string");
                    sb.Append(char.ConvertFromUtf32(code));
                    pos += digits;
                    break;
                default: sb.Append('\\').Append(e); break;
            }
        }
        return new Token(TokenKind.String, sb.ToString(), startLine, sb.ToString());
    }
}
