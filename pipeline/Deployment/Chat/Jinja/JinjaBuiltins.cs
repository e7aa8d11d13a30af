using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace OnnxLora.Pipeline.Deployment.Chat.Jinja;

/// <summary>
/// Jinja's operators, filters and tests, the global functions transformers gives chat templates (range, dict,
/// namespace, raise_exception, strftime_now), and the Python str/dict/list methods templates call — read-only ones
/// only, as Jinja's ImmutableSandboxedEnvironment allows.
/// </summary>
static class JinjaBuiltins
{
    // Jinja's sandbox caps range() at this many items
    const int MaxRange = 100_000;

    public static IEnumerable<(string, object?)> Globals()
    {
        yield return ("range", new Callable("range", (args, _) => Range(args)));
        yield return ("dict", new Callable("dict", (args, kwargs) =>
        {
            var d = args.Count == 1 && args[0] is OrderedDictionary<object, object?> from ? new OrderedDictionary<object, object?>(from) : new OrderedDictionary<object, object?>();
            foreach (var (k, v) in kwargs) d[k] = v;
            return d;
        }));
        yield return ("namespace", new Callable("namespace", (args, kwargs) =>
        {
            var ns = new Namespace();
            if (args.Count == 1 && args[0] is OrderedDictionary<object, object?> from)
                foreach (var (k, v) in from) ns.Attributes[PyValue.Str(k)] = v;
            foreach (var (k, v) in kwargs) ns.Attributes[k] = v;
            return ns;
        }));
        yield return ("raise_exception", new Callable("raise_exception", (args, _) =>
            throw new JinjaException(0, args.Count > 0 ? PyValue.Str(args[0]) : "raise_exception() was called", raised: true)));
        yield return ("strftime_now", new Callable("strftime_now", (args, _) =>
            Strftime(DateTime.Now, args.Count > 0 && args[0] is string f ? f : throw new ArgumentException("takes a format string"))));
    }

    static List<object?> Range(List<object?> args)
    {
        if (args.Count is 0 or > 3 || args.Any(a => a is not (long or bool))) throw new ArgumentException("takes 1 to 3 integers");
        var n = args.Select(PyValue.ToLong).ToArray();
        long start = n.Length > 1 ? n[0] : 0, stop = n.Length > 1 ? n[1] : n[0], step = n.Length > 2 ? n[2] : 1;
        if (step == 0) throw new ArgumentException("step must not be zero");
        long count = step > 0 ? Math.Max(0, (stop - start + step - 1) / step) : Math.Max(0, (start - stop - step - 1) / -step);
        if (count > MaxRange) throw new ArgumentException($"a range of {count} items is more than the {MaxRange} allowed");
        var result = new List<object?>((int)count);
        for (long i = 0; i < count; i++) result.Add(start + i * step);
        return result;
    }

    // Python's strftime codes that date templates use (Llama 3.x: "%d %b %Y")
    public static string Strftime(DateTime t, string format)
    {
        var sb = new StringBuilder();
        for (int i = 0; i < format.Length; i++)
        {
            if (format[i] != '%' || i + 1 == format.Length) { sb.Append(format[i]); continue; }
            char c = format[++i];
            sb.Append(c switch
            {
                'd' => t.ToString("dd", CultureInfo.InvariantCulture),
                'm' => t.ToString("MM", CultureInfo.InvariantCulture),
                'Y' => t.ToString("yyyy", CultureInfo.InvariantCulture),
                'y' => t.ToString("yy", CultureInfo.InvariantCulture),
                'b' => t.ToString("MMM", CultureInfo.InvariantCulture),
                'B' => t.ToString("MMMM", CultureInfo.InvariantCulture),
                'a' => t.ToString("ddd", CultureInfo.InvariantCulture),
                'A' => t.ToString("dddd", CultureInfo.InvariantCulture),
                'H' => t.ToString("HH", CultureInfo.InvariantCulture),
                'I' => t.ToString("hh", CultureInfo.InvariantCulture),
                'M' => t.ToString("mm", CultureInfo.InvariantCulture),
                'S' => t.ToString("ss", CultureInfo.InvariantCulture),
                'p' => t.Hour < 12 ? "AM" : "PM",
                'j' => t.DayOfYear.ToString("000", CultureInfo.InvariantCulture),
                '%' => "%",
                _ => "%" + c,
            });
        }
        return sb.ToString();
    }

    // ---- attribute and item access ----

    /// <summary>obj.name: the value's attribute (a method of str/dict/list, a namespace's or loop's field), else its item.</summary>
    public static object? GetAttribute(object? obj, string name, int line)
    {
        PyValue.FailIfUndefined(obj, line);
        if (name.StartsWith('_')) return new Undefined($"access to attribute '{name}' of '{PyValue.TypeName(obj)}' object is unsafe");
        switch (obj)
        {
            case OrderedDictionary<object, object?> dict:
                return DictMethod(dict, name) ?? (dict.TryGetValue(name, out var v) ? v : new Undefined($"'dict object' has no attribute '{name}'"));
            case string s: return StringMethod(s, name) ?? new Undefined($"'str object' has no attribute '{name}'");
            case IList<object?> list: return ListMethod(list, name) ?? new Undefined($"'{PyValue.TypeName(obj)} object' has no attribute '{name}'");
            case Namespace ns: return ns.Attributes.TryGetValue(name, out var a) ? a : new Undefined($"'Namespace' object has no attribute '{name}'");
            case LoopInfo loop: return loop.Get(name);
            default: return new Undefined($"'{PyValue.TypeName(obj)}' object has no attribute '{name}'");
        }
    }

    /// <summary>obj[key]: the item, else (for a string key) the attribute.</summary>
    public static object? GetItem(object? obj, object? key, int line)
    {
        PyValue.FailIfUndefined(obj, line);
        switch (obj)
        {
            case OrderedDictionary<object, object?> dict when key is not null && TryLookup(dict, key, out var v): return v;
            case IList<object?> list when key is long or bool:
                long i = PyValue.ToLong(key);
                if (i < 0) i += list.Count;
                return i >= 0 && i < list.Count ? list[(int)i] : new Undefined($"'{PyValue.TypeName(obj)} object' has no element {key}");
            case string s when key is long or bool:
                var chars = PyValue.TextElements(s);
                long j = PyValue.ToLong(key);
                if (j < 0) j += chars.Count;
                return j >= 0 && j < chars.Count ? chars[(int)j] : new Undefined($"'str object' has no element {key}");
        }
        if (key is string name) return GetAttribute(obj, name, line);
        return new Undefined($"'{PyValue.TypeName(obj)} object' has no element {PyValue.Repr(key)}");
    }

    static bool TryLookup(OrderedDictionary<object, object?> dict, object key, out object? value)
    {
        if (dict.TryGetValue(key, out value)) return true;
        if (PyValue.IsNumber(key))
            foreach (var (k, v) in dict)
                if (PyValue.IsNumber(k) && PyValue.Equal(k, key)) { value = v; return true; }
        return false;
    }

    public static object? Slice(object? obj, object? start, object? stop, object? step, int line)
    {
        PyValue.FailIfUndefined(obj, line);
        IList<object?> items = obj switch
        {
            string s => PyValue.TextElements(s),
            IList<object?> l => l,
            _ => throw new JinjaException(line, $"'{PyValue.TypeName(obj)}' object is not subscriptable"),
        };
        long n = items.Count;
        long stepValue = SliceBound(step, line) ?? 1;
        if (stepValue == 0) throw new JinjaException(line, "slice step cannot be zero");
        long? a = SliceBound(start, line), b = SliceBound(stop, line);
        long from, to;
        if (stepValue > 0)
        {
            from = a is long x ? Math.Clamp(x < 0 ? x + n : x, 0, n) : 0;
            to = b is long y ? Math.Clamp(y < 0 ? y + n : y, 0, n) : n;
        }
        else
        {
            from = a is long x ? Math.Clamp(x < 0 ? x + n : x, -1, n - 1) : n - 1;
            to = b is long y ? Math.Clamp(y < 0 ? y + n : y, -1, n - 1) : -1;
        }
        var result = new List<object?>();
        for (long i = from; stepValue > 0 ? i < to : i > to; i += stepValue) result.Add(items[(int)i]);
        return obj switch
        {
            string => string.Concat(result.Cast<string>()),
            object?[] => result.ToArray(),
            _ => result,
        };
    }

    static long? SliceBound(object? v, int line) => v switch
    {
        null => null,
        long or bool => PyValue.ToLong(v),
        _ => throw new JinjaException(line, $"slice indices must be integers or None, not {PyValue.TypeName(v)}"),
    };

    // ---- operators ----

    public static object? Binary(string op, object? a, object? b, int line, int maxChars)
    {
        if (op == "~")
        {
            var joined = PyValue.Str(a) + PyValue.Str(b);
            return joined.Length <= maxChars ? joined : throw new JinjaException(line, $"a string passes {maxChars} characters");
        }
        PyValue.FailIfUndefined(a, line);
        PyValue.FailIfUndefined(b, line);
        if (PyValue.IsNumber(a) && PyValue.IsNumber(b)) return Arithmetic(op, a!, b!, line);
        if (op == "*" && PyValue.IsNumber(a) && b is string or IList<object?>) (a, b) = (b, a);   // 3 * 'ab' is 'ab' * 3
        switch (op, a, b)
        {
            case ("+", string x, string y):
                return x.Length + y.Length <= maxChars ? x + y : throw new JinjaException(line, $"a string passes {maxChars} characters");
            case ("+", List<object?> x, List<object?> y): return x.Concat(y).ToList();
            case ("+", object?[] x, object?[] y): return x.Concat(y).ToArray();
            case ("*", string s, long or bool):
                long times = PyValue.ToLong(b);
                if (times * s.Length > maxChars) throw new JinjaException(line, $"a string passes {maxChars} characters");
                return times <= 0 ? "" : new StringBuilder(s.Length * (int)times).Insert(0, s, (int)times).ToString();
            case ("*", IList<object?> l, long or bool):
                long copies = PyValue.ToLong(b);
                if (copies * l.Count > maxChars) throw new JinjaException(line, $"a list passes {maxChars} items");
                var repeated = Enumerable.Repeat(l, (int)Math.Max(0, copies)).SelectMany(x => x);
                return a is object?[] ? repeated.ToArray() : repeated.ToList();
            case ("%", string format, _): return PercentFormat(format, b, line);
        }
        throw new JinjaException(line, $"unsupported operand type(s) for {op}: '{PyValue.TypeName(a)}' and '{PyValue.TypeName(b)}'");
    }

    static object Arithmetic(string op, object a, object b, int line)
    {
        bool ints = a is not double && b is not double;
        if (ints)
        {
            long x = PyValue.ToLong(a), y = PyValue.ToLong(b);
            try
            {
                checked
                {
                    switch (op)
                    {
                        case "+": return x + y;
                        case "-": return x - y;
                        case "*": return x * y;
                        case "//": return y == 0 ? throw ZeroDivision(line) : FloorDiv(x, y);
                        case "%": return y == 0 ? throw ZeroDivision(line) : x - FloorDiv(x, y) * y;
                        case "**" when y >= 0:
                            long r = 1;
                            for (long i = 0; i < y; i++) { r *= x; if (r == 0 || r == 1 && x == 1) break; }
                            return r;
                    }
                }
            }
            catch (OverflowException) { throw new JinjaException(line, $"integer overflow in {op}"); }
        }
        double p = PyValue.ToDouble(a), q = PyValue.ToDouble(b);
        return op switch
        {
            "+" => p + q,
            "-" => p - q,
            "*" => p * q,
            "/" => q == 0 ? throw ZeroDivision(line) : p / q,
            "//" => q == 0 ? throw ZeroDivision(line) : FloatDivMod(p, q).Div,
            "%" => q == 0 ? throw ZeroDivision(line) : FloatDivMod(p, q).Mod,
            "**" => Math.Pow(p, q),
            _ => throw new JinjaException(line, $"unknown operator {op}"),
        };
    }

    /// <summary>Python's float divmod: the remainder from fmod takes the divisor's sign, the quotient is floored to match.</summary>
    static (double Div, double Mod) FloatDivMod(double x, double y)
    {
        double mod = x % y, div = (x - mod) / y;
        if (mod != 0)
        {
            if (y < 0 != mod < 0) { mod += y; div -= 1; }
        }
        else mod = Math.CopySign(0, y);
        double floor;
        if (div != 0)
        {
            floor = Math.Floor(div);
            if (div - floor > 0.5) floor += 1;
        }
        else floor = Math.CopySign(0, x / y);
        return (floor, mod);
    }

    static long FloorDiv(long x, long y) => x / y - ((x % y != 0) && ((x < 0) != (y < 0)) ? 1 : 0);

    static JinjaException ZeroDivision(int line) => new(line, "division by zero");

    /// <summary>"%s %d" % args: Python's printf-style formatting (flags - + 0 space, width, .precision; s r d i f F e E g G x X o c %).</summary>
    static string PercentFormat(string format, object? args, int line)
    {
        var values = args is object?[] tuple ? tuple : [args];
        int next = 0;
        var sb = new StringBuilder();
        for (int i = 0; i < format.Length; i++)
        {
            if (format[i] != '%') { sb.Append(format[i]); continue; }
            int start = i++;
            while (i < format.Length && format[i] is '-' or '+' or ' ' or '0' or '#') i++;
            var flags = format[(start + 1)..i];
            int widthStart = i;
            while (i < format.Length && char.IsAsciiDigit(format[i])) i++;
            int width = i > widthStart ? int.Parse(format.AsSpan(widthStart, i - widthStart), CultureInfo.InvariantCulture) : 0;
            int? precision = null;
            if (i < format.Length && format[i] == '.')
            {
                int p = ++i;
                while (i < format.Length && char.IsAsciiDigit(format[i])) i++;
                precision = i > p ? int.Parse(format.AsSpan(p, i - p), CultureInfo.InvariantCulture) : 0;
            }
            if (i >= format.Length) throw new JinjaException(line, "incomplete format");
            char c = format[i];
            if (c == '%') { sb.Append('%'); continue; }
            if (next >= values.Length) throw new JinjaException(line, "not enough arguments for format string");
            var v = values[next++];
            string body = c switch
            {
                's' => PyValue.Str(v),
                'r' => PyValue.Repr(v),
                'c' => v is string ch ? ch : char.ConvertFromUtf32((int)PyValue.ToLong(v)),
                'd' or 'i' or 'x' or 'X' or 'o' when PyValue.IsNumber(v) => Integer((long)Math.Truncate(PyValue.ToDouble(v)), c),
                'f' or 'F' or 'e' or 'E' or 'g' or 'G' when PyValue.IsNumber(v) => Float(PyValue.ToDouble(v), c, precision ?? 6),
                _ => throw new JinjaException(line, $"unsupported format %{c} for {PyValue.TypeName(v)}"),
            };
            if (c is 's' or 'r' && precision is int cut && body.Length > cut) body = body[..cut];
            if (c is not ('s' or 'r' or 'c') && !body.StartsWith('-'))
                body = (flags.Contains('+') ? "+" : flags.Contains(' ') ? " " : "") + body;
            if (body.Length < width)
            {
                if (flags.Contains('-')) body = body.PadRight(width);
                else if (flags.Contains('0') && c is not ('s' or 'r' or 'c'))
                {
                    int sign = body.Length > 0 && body[0] is '-' or '+' or ' ' ? 1 : 0;
                    body = body[..sign] + body[sign..].PadLeft(width - sign, '0');
                }
                else body = body.PadLeft(width);
            }
            sb.Append(body);
        }
        // a dict (or anything subscriptable but a tuple or str, as Python checks it) may go unused; anything else must be used up
        if (next < values.Length && args is not (OrderedDictionary<object, object?> or List<object?>)) throw new JinjaException(line, "not all arguments converted during string formatting");
        return sb.ToString();
    }

    static string Integer(long n, char c) => c switch
    {
        'x' => (n < 0 ? "-" : "") + Math.Abs(n).ToString("x", CultureInfo.InvariantCulture),
        'X' => (n < 0 ? "-" : "") + Math.Abs(n).ToString("X", CultureInfo.InvariantCulture),
        'o' => (n < 0 ? "-" : "") + Convert.ToString(Math.Abs(n), 8),
        _ => n.ToString(CultureInfo.InvariantCulture),
    };

    static string Float(double d, char c, int precision)
    {
        if (double.IsNaN(d)) return char.IsUpper(c) ? "NAN" : "nan";
        if (double.IsInfinity(d)) return (d < 0 ? "-" : "") + (char.IsUpper(c) ? "INF" : "inf");
        switch (char.ToLowerInvariant(c))
        {
            case 'f': return d.ToString("F" + precision, CultureInfo.InvariantCulture);
            case 'e':
                var e = d.ToString((c == 'E' ? "E" : "e") + precision, CultureInfo.InvariantCulture);   // 1.5e+003 → 1.5e+03
                int at = e.IndexOfAny(['e', 'E']);
                return e[..(at + 2)] + int.Parse(e[(at + 2)..], CultureInfo.InvariantCulture).ToString("00", CultureInfo.InvariantCulture);
            default:
                // %g: exponent form when the exponent is below -4 or at least the precision; trailing zeros dropped
                int p = precision == 0 ? 1 : precision;
                if (d == 0) return "0";
                int exponent = (int)Math.Floor(Math.Log10(Math.Abs(d)));
                var rounded = double.Parse(d.ToString("E" + (p - 1), CultureInfo.InvariantCulture), CultureInfo.InvariantCulture);
                if (rounded != 0) exponent = (int)Math.Floor(Math.Log10(Math.Abs(rounded)));
                if (exponent < -4 || exponent >= p)
                {
                    var g = Float(d, c == 'G' ? 'E' : 'e', p - 1);
                    int ePos = g.IndexOfAny(['e', 'E']);
                    var mantissa = g[..ePos];
                    if (mantissa.Contains('.')) mantissa = mantissa.TrimEnd('0').TrimEnd('.');
                    return mantissa + g[ePos..];
                }
                var f = d.ToString("F" + Math.Max(0, p - 1 - exponent), CultureInfo.InvariantCulture);
                return f.Contains('.') ? f.TrimEnd('0').TrimEnd('.') : f;
        }
    }

    public static bool CompareOp(string op, object? a, object? b, int line) => op switch
    {
        "==" => PyValue.Equal(a, b),
        "!=" => !PyValue.Equal(a, b),
        "<" => PyValue.Compare(a, b, line) < 0,
        ">" => PyValue.Compare(a, b, line) > 0,
        "<=" => PyValue.Compare(a, b, line) <= 0,
        ">=" => PyValue.Compare(a, b, line) >= 0,
        "in" => Contains(b, a, line),
        "not in" => !Contains(b, a, line),
        _ => throw new JinjaException(line, $"unknown comparison {op}"),
    };

    static bool Contains(object? container, object? item, int line) => container switch
    {
        string s => item is string sub ? s.Contains(sub, StringComparison.Ordinal) : throw new JinjaException(line, $"'in <string>' requires string as left operand, not {PyValue.TypeName(item)}"),
        IList<object?> list => list.Any(x => PyValue.Equal(x, item)),
        OrderedDictionary<object, object?> dict => item is List<object?> or OrderedDictionary<object, object?> ? throw new JinjaException(line, $"unhashable type: '{PyValue.TypeName(item)}'")
            : item is not null && TryLookup(dict, item, out _),
        Undefined => false,
        _ => throw new JinjaException(line, $"argument of type '{PyValue.TypeName(container)}' is not iterable"),
    };

    // ---- methods ----

    static Callable Method(string name, Func<List<object?>, Dictionary<string, object?>, object?> f) => new(name, f);

    static object? DictMethod(OrderedDictionary<object, object?> d, string name) => name switch
    {
        "items" => Method("dict.items", (_, _) => d.Select(p => (object?)new object?[] { p.Key, p.Value }).ToList()),
        "keys" => Method("dict.keys", (_, _) => d.Keys.Cast<object?>().ToList()),
        "values" => Method("dict.values", (_, _) => d.Values.ToList()),
        "get" => Method("dict.get", (args, _) =>
            args.Count is 0 or > 2 ? throw new ArgumentException("takes a key and an optional default")
            : args[0] is not null && TryLookup(d, args[0]!, out var v) ? v : args.Count > 1 ? args[1] : null),
        "copy" => Method("dict.copy", (_, _) => new OrderedDictionary<object, object?>(d)),
        _ => null,
    };

    static object? ListMethod(IList<object?> l, string name) => name switch
    {
        "index" => Method("list.index", (args, _) =>
        {
            for (int i = 0; i < l.Count; i++) if (args.Count == 1 && PyValue.Equal(l[i], args[0])) return (long)i;
            throw new ArgumentException("value is not in the list");
        }),
        "count" => Method("list.count", (args, _) => (long)l.Count(x => args.Count == 1 && PyValue.Equal(x, args[0]))),
        _ => null,
    };

    static string Arg(List<object?> args, int i, string method) =>
        i < args.Count && args[i] is string s ? s : throw new ArgumentException($"{method} needs a string argument {i + 1}");

    static object? StringMethod(string s, string name) => name switch
    {
        "strip" => Method("str.strip", (args, _) => Strip(s, args, true, true)),
        "lstrip" => Method("str.lstrip", (args, _) => Strip(s, args, true, false)),
        "rstrip" => Method("str.rstrip", (args, _) => Strip(s, args, false, true)),
        "lower" => Method("str.lower", (_, _) => s.ToLowerInvariant()),
        "upper" => Method("str.upper", (_, _) => s.ToUpperInvariant()),
        "title" => Method("str.title", (_, _) => PythonTitle(s)),
        "capitalize" => Method("str.capitalize", (_, _) => Capitalize(s)),
        "startswith" => Method("str.startswith", (args, _) => Affix(args, "startswith", p => s.StartsWith(p, StringComparison.Ordinal))),
        "endswith" => Method("str.endswith", (args, _) => Affix(args, "endswith", p => s.EndsWith(p, StringComparison.Ordinal))),
        "replace" => Method("str.replace", (args, _) => Replace(s, Arg(args, 0, "replace"), Arg(args, 1, "replace"), args.Count > 2 ? PyValue.ToLong(args[2]) : -1)),
        "split" => Method("str.split", (args, kwargs) => Split(s, Sep(args, kwargs), MaxSplit(args, kwargs))),
        "rsplit" => Method("str.rsplit", (args, kwargs) => RSplit(s, Sep(args, kwargs), MaxSplit(args, kwargs))),
        "splitlines" => Method("str.splitlines", (_, _) => SplitLines(s)),
        "find" => Method("str.find", (args, _) => (long)s.IndexOf(Arg(args, 0, "find"), StringComparison.Ordinal)),
        "rfind" => Method("str.rfind", (args, _) => (long)s.LastIndexOf(Arg(args, 0, "rfind"), StringComparison.Ordinal)),
        "count" => Method("str.count", (args, _) => (long)CountOf(s, Arg(args, 0, "count"))),
        "join" => Method("str.join", (args, _) => string.Join(s, PyValue.Iterate(args.Count == 1 ? args[0] : throw new ArgumentException("takes one iterable"), 0)
            .Select(x => x as string ?? throw new ArgumentException($"sequence item: expected str instance, {PyValue.TypeName(x)} found")))),
        "isdigit" => Method("str.isdigit", (_, _) => s.Length > 0 && s.All(char.IsDigit)),
        "isalpha" => Method("str.isalpha", (_, _) => s.Length > 0 && s.All(char.IsLetter)),
        "isspace" => Method("str.isspace", (_, _) => s.Length > 0 && s.All(char.IsWhiteSpace)),
        "format" => Method("str.format", (args, kwargs) => Format(s, args, kwargs)),
        _ => null,
    };

    static string? Sep(List<object?> args, Dictionary<string, object?> kwargs)
    {
        var sep = args.Count > 0 ? args[0] : kwargs.GetValueOrDefault("sep");
        return sep switch
        {
            null => null,
            string { Length: 0 } => throw new ArgumentException("empty separator"),
            string x => x,
            _ => throw new ArgumentException("the separator must be a string or None"),
        };
    }

    static long MaxSplit(List<object?> args, Dictionary<string, object?> kwargs) =>
        (args.Count > 1 ? args[1] : kwargs.GetValueOrDefault("maxsplit")) is { } m ? PyValue.ToLong(m) : -1;

    static bool Affix(List<object?> args, string method, Func<string, bool> test) => args.Count == 1 && args[0] switch
    {
        string p => test(p),
        object?[] options => options.Any(o => o is string p && test(p)),
        _ => throw new ArgumentException($"{method} takes a string or a tuple of strings"),
    };

    static string Strip(string s, List<object?> args, bool left, bool right)
    {
        var chars = args.Count > 0 && args[0] is string c ? c.ToCharArray() : null;
        if (chars is null) return left && right ? s.Trim() : left ? s.TrimStart() : s.TrimEnd();
        return left && right ? s.Trim(chars) : left ? s.TrimStart(chars) : s.TrimEnd(chars);
    }

    static string Replace(string s, string old, string replacement, long count)
    {
        if (count < 0) return old.Length == 0 ? string.Join(replacement, PyValue.TextElements(s).Prepend("").Append("")) : s.Replace(old, replacement, StringComparison.Ordinal);
        var sb = new StringBuilder();
        int pos = 0;
        for (long n = 0; n < count && old.Length > 0; n++)
        {
            int at = s.IndexOf(old, pos, StringComparison.Ordinal);
            if (at < 0) break;
            sb.Append(s, pos, at - pos).Append(replacement);
            pos = at + old.Length;
        }
        return sb.Append(s, pos, s.Length - pos).ToString();
    }

    static List<object?> Split(string s, string? sep, long maxSplit)
    {
        var result = new List<object?>();
        if (sep is null)
        {
            int i = 0;
            while (true)
            {
                while (i < s.Length && char.IsWhiteSpace(s[i])) i++;
                if (i >= s.Length) break;
                if (maxSplit >= 0 && result.Count == maxSplit) { result.Add(s[i..].TrimEnd()); break; }
                int start = i;
                while (i < s.Length && !char.IsWhiteSpace(s[i])) i++;
                result.Add(s[start..i]);
            }
            return result;
        }
        int pos = 0;
        while (maxSplit < 0 || result.Count < maxSplit)
        {
            int at = s.IndexOf(sep, pos, StringComparison.Ordinal);
            if (at < 0) break;
            result.Add(s[pos..at]);
            pos = at + sep.Length;
        }
        result.Add(s[pos..]);
        return result;
    }

    static List<object?> RSplit(string s, string? sep, long maxSplit)
    {
        if (maxSplit < 0 || sep is null) return Split(s, sep, maxSplit);
        var result = new List<object?>();
        int end = s.Length;
        while (result.Count < maxSplit)
        {
            int at = end == 0 ? -1 : s.LastIndexOf(sep, end - 1, StringComparison.Ordinal);
            if (at < 0 || at + sep.Length > end) break;
            result.Insert(0, s[(at + sep.Length)..end]);
            end = at;
        }
        result.Insert(0, s[..end]);
        return result;
    }

    static List<object?> SplitLines(string s)
    {
        var lines = s.Replace("\r\n", "\n").Replace('\r', '\n').Split('\n').Select(x => (object?)x).ToList();
        if (s.EndsWith('\n') || s.EndsWith('\r') || s.Length == 0) lines.RemoveAt(lines.Count - 1);
        return lines;
    }

    static int CountOf(string s, string sub)
    {
        if (sub.Length == 0) return s.Length + 1;
        int n = 0;
        for (int at = s.IndexOf(sub, StringComparison.Ordinal); at >= 0; at = s.IndexOf(sub, at + sub.Length, StringComparison.Ordinal)) n++;
        return n;
    }

    static string PythonTitle(string s)
    {
        var sb = new StringBuilder(s.Length);
        bool previousCased = false;
        foreach (var c in s)
        {
            sb.Append(previousCased ? char.ToLowerInvariant(c) : char.ToUpperInvariant(c));
            previousCased = char.IsLetter(c);
        }
        return sb.ToString();
    }

    static string Capitalize(string s) => s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant();

    /// <summary>str.format with {} / {0} / {name} fields (no format specs).</summary>
    static string Format(string s, List<object?> args, Dictionary<string, object?> kwargs)
    {
        var sb = new StringBuilder();
        int auto = 0;
        for (int i = 0; i < s.Length; i++)
        {
            char c = s[i];
            if (c == '{' && i + 1 < s.Length && s[i + 1] == '{') { sb.Append('{'); i++; continue; }
            if (c == '}' && i + 1 < s.Length && s[i + 1] == '}') { sb.Append('}'); i++; continue; }
            if (c != '{') { sb.Append(c); continue; }
            int close = s.IndexOf('}', i);
            if (close < 0) throw new ArgumentException("single '{' in a format string");
            var field = s[(i + 1)..close];
            object? value = field.Length == 0 ? (auto < args.Count ? args[auto++] : throw new ArgumentException("not enough arguments"))
                : int.TryParse(field, NumberStyles.None, CultureInfo.InvariantCulture, out var index) ? (index < args.Count ? args[index] : throw new ArgumentException($"no argument {index}"))
                : kwargs.TryGetValue(field, out var named) ? named : throw new ArgumentException($"no argument '{field}'");
            sb.Append(PyValue.Str(value));
            i = close;
        }
        return sb.ToString();
    }

    // ---- filters ----

    public static object? Filter(JinjaRenderer renderer, string name, object? value, List<object?> args, Dictionary<string, object?> kwargs, int line)
    {
        object? Param(int index, string key, object? fallback) => index >= 0 && index < args.Count ? args[index] : kwargs.TryGetValue(key, out var v) ? v : fallback;
        switch (name)
        {
            case "trim": return Strip(PyValue.Str(value), Param(0, "chars", null) is string c ? [c] : [], true, true);
            case "length" or "count": return PyValue.Length(value, line);
            case "upper": return PyValue.Str(value).ToUpperInvariant();
            case "lower": return PyValue.Str(value).ToLowerInvariant();
            case "capitalize": return Capitalize(PyValue.Str(value));
            case "title":
                return string.Concat(Regex.Split(PyValue.Str(value), @"([-\s({\[<]+)").Where(p => p.Length > 0).Select(p => char.ToUpperInvariant(p[0]) + p[1..].ToLowerInvariant()));
            case "string": return PyValue.Str(value);
            case "safe": return value;
            case "e" or "escape": return System.Net.WebUtility.HtmlEncode(PyValue.Str(value)).Replace("&quot;", "&#34;");   // markupsafe's entity for "
            case "default" or "d":
                bool boolean = PyValue.Truthy(Param(1, "boolean", false));
                return value is Undefined || boolean && !PyValue.Truthy(value) ? Param(0, "default_value", "") : value;
            case "tojson":
                var indent = Param(0, "indent", null);
                var separators = Param(-1, "separators", null) is object?[] { Length: 2 } pair && pair.All(x => x is string) ? ((string)pair[0]!, (string)pair[1]!) : ((string, string)?)null;
                var json = PyValue.ToJson(PyValue.Truthy(Param(-1, "sort_keys", false)) ? SortKeys(value) : value, indent is null ? null : (int)PyValue.ToLong(indent), separators, line);
                return PyValue.Truthy(Param(-1, "ensure_ascii", false)) ? EnsureAscii(json) : json;
            case "first": return PyValue.Iterate(value, line) is { Count: > 0 } f ? f[0] : new Undefined("No first item, sequence was empty.");
            case "last": return PyValue.Iterate(value, line) is { Count: > 0 } l ? l[^1] : new Undefined("No last item, sequence was empty.");
            case "join":
                var attribute = Param(1, "attribute", null);
                var parts = PyValue.Iterate(value, line).Select(x => attribute is null ? x : Attribute(x, attribute, line));
                return string.Join(PyValue.Str(Param(0, "d", "")), parts.Select(PyValue.Str));
            case "replace":
                var count = Param(2, "count", null);
                return Replace(PyValue.Str(value), PyValue.Str(Param(0, "old", "")), PyValue.Str(Param(1, "new", "")), count is null ? -1 : PyValue.ToLong(count));
            case "int": PyValue.FailIfUndefined(value, line); return ToInt(value, Param(0, "default", 0L));
            case "float": PyValue.FailIfUndefined(value, line); return ToFloat(value, Param(0, "default", 0.0));
            case "list": return PyValue.Iterate(value, line).ToList();
            case "items":
                return value is OrderedDictionary<object, object?> d ? d.Select(p => (object?)new object?[] { p.Key, p.Value }).ToList()
                    : value is Undefined ? new List<object?>() : throw new JinjaException(line, $"items: expected a dict, got {PyValue.TypeName(value)}");
            case "dictsort":
                if (value is not OrderedDictionary<object, object?> sortable) throw new JinjaException(line, "dictsort: expected a dict");
                bool byValue = PyValue.Str(Param(1, "by", "key")) == "value";
                var sorted = Sort(sortable.Select(p => (object?)new object?[] { p.Key, p.Value }).ToList(),
                    x => ((object?[])x!)[byValue ? 1 : 0], PyValue.Truthy(Param(0, "case_sensitive", false)), line);
                if (PyValue.Truthy(Param(2, "reverse", false))) sorted.Reverse();
                return sorted;
            case "map": return Map(renderer, value, args, kwargs, line);
            case "select" or "reject":
                return PyValue.Iterate(value, line).Where(x => Select(x, args, 0, line) == (name == "select")).ToList();
            case "selectattr" or "rejectattr":
                if (args.Count == 0) throw new JinjaException(line, $"{name} needs an attribute name");
                return PyValue.Iterate(value, line).Where(x => Select(Attribute(x, args[0], line), args, 1, line) == (name == "selectattr")).ToList();
            case "unique":
                var seen = new List<object?>();
                foreach (var x in PyValue.Iterate(value, line))
                    if (!seen.Any(y => PyValue.Equal(Fold(x), Fold(y)))) seen.Add(x);
                return seen;
            case "reverse":
                return value is string rs ? string.Concat(PyValue.TextElements(rs).Cast<string>().Reverse()) : PyValue.Iterate(value, line).Reverse().ToList();
            case "sort":
                var key = Param(2, "attribute", null);
                var list = Sort(PyValue.Iterate(value, line).ToList(), x => key is null ? x : Attribute(x, key, line), PyValue.Truthy(Param(1, "case_sensitive", false)), line);
                if (PyValue.Truthy(Param(0, "reverse", false))) list.Reverse();
                return list;
            case "abs":
                return value switch
                {
                    long n => (object)Math.Abs(n),
                    double n => Math.Abs(n),
                    bool b => b ? 1L : 0L,
                    _ => throw new JinjaException(line, $"bad operand type for abs(): '{PyValue.TypeName(value)}'"),
                };
            case "round":
                if (!PyValue.IsNumber(value)) throw new JinjaException(line, "round: expected a number");
                int digits = (int)PyValue.ToLong(Param(0, "precision", 0L));
                var method = PyValue.Str(Param(1, "method", "common"));
                if (method == "common" && value is long or bool && digits >= 0) return PyValue.ToLong(value);   // Python's round keeps an int an int
                double r = PyValue.ToDouble(value), scale = Math.Pow(10, digits);
                return method switch
                {
                    "ceil" => Math.Ceiling(r * scale) / scale,
                    "floor" => Math.Floor(r * scale) / scale,
                    _ => Math.Round(r, Math.Clamp(digits, 0, 15), MidpointRounding.ToEven),
                };
            case "indent": return Indent(PyValue.Str(value), Param(0, "width", 4L), PyValue.Truthy(Param(1, "first", false)), PyValue.Truthy(Param(2, "blank", false)));
            case "sum":
                object? total = Param(1, "start", 0L);
                var sumAttribute = Param(0, "attribute", null);
                foreach (var x in PyValue.Iterate(value, line)) total = Binary("+", total, sumAttribute is null ? x : Attribute(x, sumAttribute, line), line, int.MaxValue);
                return total;
            case "min" or "max":
                var all = Sort(PyValue.Iterate(value, line).ToList(), x => x, PyValue.Truthy(Param(0, "case_sensitive", false)), line);
                return all.Count == 0 ? new Undefined($"No {name} item, sequence was empty.") : name == "min" ? all[0] : all[^1];
            case "format": return PercentFormat(PyValue.Str(value), args.ToArray(), line);
            case "center":
                var text = PyValue.Str(value);
                int width = (int)PyValue.ToLong(Param(0, "width", 80L));
                if (width <= text.Length) return text;
                int left = (width - text.Length) / 2 + ((width - text.Length) % 2 == 1 && width % 2 == 1 ? 1 : 0);   // Python's str.center
                return new string(' ', left) + text + new string(' ', width - text.Length - left);
            case "attr": return GetAttribute(value, PyValue.Str(Param(0, "name", "")), line);
            case "wordcount": return (long)Split(PyValue.Str(value), null, -1).Count;
            case "batch":
                long size = PyValue.ToLong(Param(0, "linecount", 1L));
                if (size <= 0) throw new JinjaException(line, "batch: the size must be positive");
                return PyValue.Iterate(value, line).Chunk((int)size).Select(c => (object?)c.ToList()).ToList();
            default: throw new JinjaException(line, $"no filter named '{name}'");
        }
    }

    static object? Fold(object? x) => x is string s ? s.ToLowerInvariant() : x;

    static string EnsureAscii(string json)
    {
        var sb = new StringBuilder(json.Length);
        foreach (var c in json) sb.Append(c < 0x80 ? c.ToString() : $"\\u{(int)c:x4}");
        return sb.ToString();
    }

    static object? SortKeys(object? v) => v switch
    {
        OrderedDictionary<object, object?> d => new OrderedDictionary<object, object?>(d.OrderBy(p => PyValue.Str(p.Key), StringComparer.Ordinal)
            .Select(p => KeyValuePair.Create(p.Key, SortKeys(p.Value)))),
        List<object?> l => l.Select(SortKeys).ToList(),
        _ => v,
    };

    /// <summary>Jinja's attribute path for map/selectattr/sort: "a.b.0" walks items, then attributes.</summary>
    static object? Attribute(object? x, object? path, int line)
    {
        foreach (var part in PyValue.Str(path).Split('.'))
            x = GetItem(x, long.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out var i) ? i : part, line);
        return x;
    }

    static object? Map(JinjaRenderer renderer, object? value, List<object?> args, Dictionary<string, object?> kwargs, int line)
    {
        var items = PyValue.Iterate(value, line);
        if (kwargs.TryGetValue("attribute", out var attribute))
        {
            var fallback = kwargs.GetValueOrDefault("default");
            return items.Select(x => Attribute(x, attribute, line) is var a && a is Undefined && kwargs.ContainsKey("default") ? fallback : Attribute(x, attribute, line)).ToList();
        }
        if (args.Count == 0 || args[0] is not string filter) throw new JinjaException(line, "map needs a filter name or attribute=");
        return items.Select(x => renderer.ApplyFilter(filter, x, args.Skip(1).ToList(), line)).ToList();
    }

    static bool Select(object? x, List<object?> args, int testAt, int line) =>
        args.Count <= testAt ? PyValue.Truthy(x) : Test(PyValue.Str(args[testAt]), x, args.Skip(testAt + 1).ToList(), line);

    static List<object?> Sort(List<object?> items, Func<object?, object?> key, bool caseSensitive, int line)
    {
        var keyed = items.Select(x => (Item: x, Key: caseSensitive ? key(x) : Fold(key(x)))).ToList();
        try { return keyed.OrderBy(k => k.Key, Comparer<object?>.Create((a, b) => PyValue.Compare(a, b, line))).Select(k => k.Item).ToList(); }
        catch (InvalidOperationException e) when (e.InnerException is JinjaException inner) { throw inner; }
    }

    static object? ToInt(object? v, object? fallback) => v switch
    {
        long or bool => PyValue.ToLong(v),
        double d when double.IsFinite(d) => (long)Math.Truncate(d),
        string s when long.TryParse(s.Trim(), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var l) => l,
        string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && double.IsFinite(d) => (long)Math.Truncate(d),
        _ => fallback,
    };

    static object? ToFloat(object? v, object? fallback) => v switch
    {
        long or bool or double => PyValue.ToDouble(v),
        string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var d) => d,
        _ => fallback,
    };

    static string Indent(string s, object? width, bool first, bool blank)
    {
        var pad = width is string w ? w : new string(' ', (int)PyValue.ToLong(width));
        var lines = s.Split('\n');
        var sb = new StringBuilder();
        for (int i = 0; i < lines.Length; i++)
        {
            if (i > 0) sb.Append('\n');
            bool indent = i == 0 ? first : blank || lines[i].Trim().Length > 0;
            if (indent) sb.Append(pad);
            sb.Append(lines[i]);
        }
        return sb.ToString();
    }

    // ---- tests ----

    static object? Numeric(object? value, string test, int line)
    {
        PyValue.FailIfUndefined(value, line);
        return PyValue.IsNumber(value) ? value : throw new JinjaException(line, $"test '{test}' needs a number, got {PyValue.TypeName(value)}");
    }

    public static bool Test(string name, object? value, List<object?> args, int line)
    {
        object? Arg0() => args.Count > 0 ? args[0] : throw new JinjaException(line, $"test '{name}' needs an argument");
        return name switch
        {
            "defined" => value is not Undefined,
            "undefined" => value is Undefined,
            "none" => value is null,
            "string" => value is string,
            "number" => value is long or double or bool,
            "integer" => value is long,
            "float" => value is double,
            "boolean" => value is bool,
            "true" => value is true,
            "false" => value is false,
            "mapping" => value is OrderedDictionary<object, object?>,
            "sequence" => value is string or IList<object?> or OrderedDictionary<object, object?> or Undefined,
            "iterable" => value is string or IList<object?> or OrderedDictionary<object, object?> or Undefined,
            "callable" => value is Callable,
            // value % 2 as Python computes it: numbers only (a float's remainder may be neither 0 nor 1)
            "odd" => PyValue.Equal(Binary("%", Numeric(value, name, line), 2L, line, 0), 1L),
            "even" => PyValue.Equal(Binary("%", Numeric(value, name, line), 2L, line, 0), 0L),
            "divisibleby" => PyValue.Equal(Binary("%", Numeric(value, name, line), Numeric(Arg0(), name, line), line, 0), 0L),
            "eq" or "equalto" or "==" => PyValue.Equal(value, Arg0()),
            "ne" or "!=" => !PyValue.Equal(value, Arg0()),
            "lt" or "lessthan" or "<" => PyValue.Compare(value, Arg0(), line) < 0,
            "le" or "<=" => PyValue.Compare(value, Arg0(), line) <= 0,
            "gt" or "greaterthan" or ">" => PyValue.Compare(value, Arg0(), line) > 0,
            "ge" or ">=" => PyValue.Compare(value, Arg0(), line) >= 0,
            "in" => Contains(Arg0(), value, line),
            // Python's "is": small numbers, interned strings and singletons are identical when equal
            "sameas" => value is null or bool or long or double or string ? PyValue.Equal(value, Arg0()) && value?.GetType() == Arg0()?.GetType() : ReferenceEquals(value, Arg0()),
            "lower" => value is string s && s == s.ToLowerInvariant(),
            "upper" => value is string u && u == u.ToUpperInvariant(),
            _ => throw new JinjaException(line, $"no test named '{name}'"),
        };
    }
}
