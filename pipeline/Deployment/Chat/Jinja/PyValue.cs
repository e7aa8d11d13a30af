using System.Globalization;
using System.Text;

namespace OnnxLora.Pipeline.Deployment.Chat.Jinja;

/// <summary>
/// Jinja's Undefined: a missing variable, attribute or key. It prints as "", iterates as empty and is false; using it
/// any other way (an attribute of it, arithmetic, calling it) is an error that names what was missing.
/// </summary>
sealed class Undefined(string hint)
{
    public string Hint { get; } = hint;
}

/// <summary>namespace(…): the one object a template may assign attributes to (set ns.x = …).</summary>
sealed class Namespace
{
    public Dictionary<string, object?> Attributes { get; } = new();
}

/// <summary>A callable: a global function, a bound method of a value, or a macro.</summary>
sealed class Callable(string name, Func<List<object?>, Dictionary<string, object?>, object?> invoke)
{
    public string Name { get; } = name;
    public object? Invoke(List<object?> args, Dictionary<string, object?> kwargs) => invoke(args, kwargs);
}

/// <summary>
/// Python's semantics for the values a template handles: None (null), bool, int (long), float (double), str, list
/// (List), tuple (object?[]), dict (OrderedDictionary: insertion order, as Python's), plus the Jinja objects above.
/// </summary>
static class PyValue
{
    /// <summary>A JSON value as a template sees it (json.loads): objects keep their key order, integers stay integers.</summary>
    public static object? FromJson(System.Text.Json.Nodes.JsonNode? node)
    {
        switch (node)
        {
            case null: return null;
            case System.Text.Json.Nodes.JsonObject o:
                var dict = new OrderedDictionary<object, object?>();
                foreach (var (k, v) in o) dict[k] = FromJson(v);
                return dict;
            case System.Text.Json.Nodes.JsonArray a: return a.Select(FromJson).ToList();
        }
        // a value parsed from text or made in code (JsonValue.Create(false)) alike: read it back through its JSON text
        using var document = System.Text.Json.JsonDocument.Parse(node.ToJsonString());
        var element = document.RootElement;
        return element.ValueKind switch
        {
            System.Text.Json.JsonValueKind.String => element.GetString(),
            System.Text.Json.JsonValueKind.True => true,
            System.Text.Json.JsonValueKind.False => false,
            System.Text.Json.JsonValueKind.Number => element.TryGetInt64(out var l) && !element.GetRawText().Contains('.') && !element.GetRawText().Contains('e', StringComparison.OrdinalIgnoreCase) ? (object)l : element.GetDouble(),
            _ => null,
        };
    }

    public static bool IsNumber(object? v) => v is long or double or bool;

    public static bool Truthy(object? v) => v switch
    {
        null or Undefined => false,
        bool b => b,
        long l => l != 0,
        double d => d != 0,
        string s => s.Length > 0,
        System.Collections.ICollection c => c.Count > 0,
        _ => true,
    };

    public static string TypeName(object? v) => v switch
    {
        null => "NoneType",
        bool => "bool",
        long => "int",
        double => "float",
        string => "str",
        List<object?> => "list",
        object?[] => "tuple",
        OrderedDictionary<object, object?> => "dict",
        Undefined => "Undefined",
        Namespace => "Namespace",
        Callable => "function",
        LoopInfo => "LoopContext",
        _ => v.GetType().Name,
    };

    /// <summary>Python's str().</summary>
    public static string Str(object? v) => v switch
    {
        string s => s,
        Undefined => "",
        _ => Repr(v),
    };

    /// <summary>Python's repr() (str() of containers shows their items this way).</summary>
    public static string Repr(object? v)
    {
        switch (v)
        {
            case null: return "None";
            case bool b: return b ? "True" : "False";
            case long l: return l.ToString(CultureInfo.InvariantCulture);
            case double d: return FloatRepr(d);
            case string s: return StringRepr(s);
            case Undefined: return "";
            case List<object?> list: return "[" + string.Join(", ", list.Select(Repr)) + "]";
            case object?[] tuple: return tuple.Length == 1 ? $"({Repr(tuple[0])},)" : "(" + string.Join(", ", tuple.Select(Repr)) + ")";
            case OrderedDictionary<object, object?> dict: return "{" + string.Join(", ", dict.Select(p => Repr(p.Key) + ": " + Repr(p.Value))) + "}";
            case Namespace ns: return "<Namespace " + Repr(ToDict(ns.Attributes)) + ">";
            case Callable c: return $"<function {c.Name}>";
            default: return v.ToString() ?? "";
        }
    }

    static OrderedDictionary<object, object?> ToDict(Dictionary<string, object?> d)
    {
        var result = new OrderedDictionary<object, object?>();
        foreach (var (k, value) in d) result[k] = value;
        return result;
    }

    /// <summary>Python's float repr: the shortest digits that round-trip; exponent form below 1e-4 and from 1e16.</summary>
    public static string FloatRepr(double d)
    {
        if (double.IsNaN(d)) return "nan";
        if (double.IsInfinity(d)) return d > 0 ? "inf" : "-inf";
        if (d == 0) return double.IsNegative(d) ? "-0.0" : "0.0";
        // the shortest digits that round-trip ("R"), then Python's layout of them
        var shortest = Math.Abs(d).ToString("R", CultureInfo.InvariantCulture);
        int ePos = shortest.IndexOf('E');
        int power = ePos < 0 ? 0 : int.Parse(shortest[(ePos + 1)..], CultureInfo.InvariantCulture);
        var mantissa = ePos < 0 ? shortest : shortest[..ePos];
        int dot = mantissa.IndexOf('.');
        int point = (dot < 0 ? mantissa.Length : dot) + power;       // digits before the decimal point
        var digits = mantissa.Replace(".", "");
        int leading = digits.Length - digits.TrimStart('0').Length;
        digits = digits.Trim('0');
        point -= leading;
        int exponent = point - 1;
        string sign = d < 0 ? "-" : "";
        if (exponent < -4 || exponent >= 16)
        {
            var m = digits.Length == 1 ? digits : digits[0] + "." + digits[1..];
            return $"{sign}{m}e{(exponent < 0 ? "-" : "+")}{Math.Abs(exponent):00}";
        }
        if (exponent >= 0)
        {
            var intPart = digits.Length > exponent + 1 ? digits[..(exponent + 1)] : digits.PadRight(exponent + 1, '0');
            var frac = digits.Length > exponent + 1 ? digits[(exponent + 1)..] : "0";
            return $"{sign}{intPart}.{frac}";
        }
        return $"{sign}0.{new string('0', -exponent - 1)}{digits}";
    }

    static string StringRepr(string s)
    {
        char quote = s.Contains('\'') && !s.Contains('"') ? '"' : '\'';
        var sb = new StringBuilder().Append(quote);
        foreach (var c in s)
        {
            switch (c)
            {
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                default:
                    if (c == quote) sb.Append('\\').Append(c);
                    else if (c < 0x20 || c == 0x7f) sb.Append($"\\x{(int)c:x2}");
                    else sb.Append(c);
                    break;
            }
        }
        return sb.Append(quote).ToString();
    }

    /// <summary>Python's ==.</summary>
    public static bool Equal(object? a, object? b)
    {
        if (a is Undefined || b is Undefined) return a is Undefined && b is Undefined;
        if (a is null || b is null) return a is null && b is null;
        if (IsNumber(a) && IsNumber(b))
            return a is double || b is double ? ToDouble(a) == ToDouble(b) : ToLong(a) == ToLong(b);
        if (a is string sa) return b is string sb && sa == sb;
        if (a is List<object?> la) return b is List<object?> lb && SequenceEqual(la, lb);
        if (a is object?[] ta) return b is object?[] tb && SequenceEqual(ta, tb);
        if (a is OrderedDictionary<object, object?> da)
            return b is OrderedDictionary<object, object?> db && da.Count == db.Count
                && da.All(p => db.TryGetValue(p.Key, out var v) && Equal(p.Value, v));
        return ReferenceEquals(a, b);
    }

    static bool SequenceEqual(IList<object?> a, IList<object?> b)
    {
        if (a.Count != b.Count) return false;
        for (int i = 0; i < a.Count; i++) if (!Equal(a[i], b[i])) return false;
        return true;
    }

    /// <summary>Python's ordering (&lt;): numbers, strings by code point, sequences item by item.</summary>
    public static int Compare(object? a, object? b, int line)
    {
        if (IsNumber(a) && IsNumber(b)) return ToDouble(a).CompareTo(ToDouble(b));
        if (a is string sa && b is string sb) return string.CompareOrdinal(sa, sb);
        if (a is IList<object?> la && b is IList<object?> lb && a.GetType() == b.GetType())
        {
            for (int i = 0; i < Math.Min(la.Count, lb.Count); i++)
                if (!Equal(la[i], lb[i])) return Compare(la[i], lb[i], line);
            return la.Count.CompareTo(lb.Count);
        }
        FailIfUndefined(a, line);
        FailIfUndefined(b, line);
        throw new JinjaException(line, $"cannot compare {TypeName(a)} with {TypeName(b)}");
    }

    public static double ToDouble(object? v) => v switch
    {
        long l => l,
        double d => d,
        bool b => b ? 1 : 0,
        _ => throw new InvalidCastException(),
    };

    public static long ToLong(object? v) => v switch
    {
        long l => l,
        bool b => b ? 1 : 0,
        _ => throw new InvalidCastException(),
    };

    public static void FailIfUndefined(object? v, int line)
    {
        if (v is Undefined u) throw new JinjaException(line, u.Hint);
    }

    /// <summary>The items a for loop visits: a list's or tuple's items, a dict's keys, a string's characters; Undefined is empty.</summary>
    public static IReadOnlyList<object?> Iterate(object? v, int line) => v switch
    {
        Undefined => [],
        List<object?> list => list,
        object?[] tuple => tuple,
        OrderedDictionary<object, object?> dict => dict.Keys.ToList(),
        string s => TextElements(s),
        _ => throw new JinjaException(line, $"'{TypeName(v)}' object is not iterable"),
    };

    /// <summary>A string's characters as Python sees them (code points: a surrogate pair is one).</summary>
    public static List<object?> TextElements(string s)
    {
        var result = new List<object?>(s.Length);
        for (int i = 0; i < s.Length; i++)
        {
            if (char.IsHighSurrogate(s[i]) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1])) { result.Add(s.Substring(i, 2)); i++; }
            else result.Add(s[i].ToString());
        }
        return result;
    }

    /// <summary>Python's len().</summary>
    public static long Length(object? v, int line) => v switch
    {
        Undefined => 0,
        string s => s.Length - CountSurrogatePairs(s),
        System.Collections.ICollection c => c.Count,
        _ => throw new JinjaException(line, $"object of type '{TypeName(v)}' has no len()"),
    };

    static int CountSurrogatePairs(string s)
    {
        int n = 0;
        for (int i = 0; i + 1 < s.Length; i++) if (char.IsHighSurrogate(s[i]) && char.IsLowSurrogate(s[i + 1])) n++;
        return n;
    }

    /// <summary>
    /// json.dumps as transformers' tojson calls it: ensure_ascii=False, keys in insertion order, separators ", " and
    /// ": " (or "," and ": " with an indent), floats as Python's repr.
    /// </summary>
    public static string ToJson(object? v, int? indent, (string Item, string Key)? separators, int line)
    {
        var sb = new StringBuilder();
        new JsonWriter(sb, indent, separators ?? (indent is null ? ", " : ",", ": "), line).Write(v, 0);
        return sb.ToString();
    }

    /// <summary>json.dumps's layout: item and key separators, and with an indent one item a line.</summary>
    readonly record struct JsonWriter(StringBuilder Sb, int? Indent, (string Item, string Key) Separators, int Line)
    {
        public void Write(object? v, int depth) => WriteJson(this, v, depth);
    }

    static void WriteJson(JsonWriter w, object? v, int depth)
    {
        var sb = w.Sb;
        if (depth > 100) throw new JinjaException(w.Line, "tojson: the value nests too deeply");
        switch (v)
        {
            case null: sb.Append("null"); break;
            case bool b: sb.Append(b ? "true" : "false"); break;
            case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); break;
            case double d: sb.Append(double.IsNaN(d) ? "NaN" : double.IsInfinity(d) ? (d > 0 ? "Infinity" : "-Infinity") : FloatRepr(d)); break;
            case string s: JsonString(sb, s); break;
            case IList<object?> list:
                WriteItems(w, '[', ']', list.Count, depth, i => WriteJson(w, list[i], depth + 1));
                break;
            case OrderedDictionary<object, object?> dict:
                var pairs = dict.ToList();
                WriteItems(w, '{', '}', pairs.Count, depth, i =>
                {
                    var key = pairs[i].Key;
                    JsonString(sb, key switch
                    {
                        string s => s,
                        bool b => b ? "true" : "false",
                        _ => Repr(key),
                    });
                    sb.Append(w.Separators.Key);
                    WriteJson(w, pairs[i].Value, depth + 1);
                });
                break;
            case Undefined u: throw new JinjaException(w.Line, u.Hint);
            default: throw new JinjaException(w.Line, $"tojson: Object of type {TypeName(v)} is not JSON serializable");
        }
    }

    static void WriteItems(JsonWriter w, char open, char close, int count, int depth, Action<int> write)
    {
        var sb = w.Sb;
        sb.Append(open);
        if (count == 0) { sb.Append(close); return; }
        for (int i = 0; i < count; i++)
        {
            if (i > 0) sb.Append(w.Separators.Item);
            if (w.Indent is int n) sb.Append('\n').Append(' ', n * (depth + 1));
            write(i);
        }
        if (w.Indent is int m) sb.Append('\n').Append(' ', m * depth);
        sb.Append(close);
    }

    static void JsonString(StringBuilder sb, string s)
    {
        sb.Append('"');
        foreach (var c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (c < 0x20) sb.Append($"\\u{(int)c:x4}");
                    else sb.Append(c);
                    break;
            }
        }
        sb.Append('"');
    }
}
