using System.Text;

namespace OnnxLora.Pipeline.Deployment.Chat.Jinja;

/// <summary>Limits that keep a hostile or buggy template bounded in time and memory.</summary>
sealed record RenderLimits
{
    /// <summary>Characters of output, and of any one string a template builds.</summary>
    public int MaxChars { get; init; } = 16 << 20;

    /// <summary>Loop iterations over the whole render.</summary>
    public int MaxIterations { get; init; } = 1_000_000;

    /// <summary>Nested macro calls.</summary>
    public int MaxDepth { get; init; } = 64;
}

/// <summary>loop.* inside a for loop.</summary>
sealed class LoopInfo(IReadOnlyList<object?> items)
{
    public int Index0 { get; set; }
    public IReadOnlyList<object?> Items { get; } = items;

    public object? Get(string name) => name switch
    {
        "index0" => (long)Index0,
        "index" => (long)Index0 + 1,
        "revindex0" => (long)(Items.Count - Index0 - 1),
        "revindex" => (long)(Items.Count - Index0),
        "first" => Index0 == 0,
        "last" => Index0 == Items.Count - 1,
        "length" => (long)Items.Count,
        "depth" => 1L,
        "depth0" => 0L,
        "previtem" => Index0 > 0 ? Items[Index0 - 1] : new Undefined("there is no previous item"),
        "nextitem" => Index0 + 1 < Items.Count ? Items[Index0 + 1] : new Undefined("there is no next item"),
        "cycle" => new Callable("loop.cycle", (args, _) => args.Count == 0 ? throw new InvalidOperationException("loop.cycle needs at least one value") : args[Index0 % args.Count]),
        _ => new Undefined($"'LoopContext' object has no attribute '{name}'"),
    };
}

/// <summary>Variables of one frame: the template's, a loop iteration's (each iteration a fresh one, as Jinja) or a macro call's.</summary>
sealed class Scope(Scope? parent)
{
    readonly Dictionary<string, object?> _vars = new();

    public bool TryGet(string name, out object? value)
    {
        for (var s = this; s is not null; s = s.Parent)
            if (s._vars.TryGetValue(name, out value)) return true;
        value = null;
        return false;
    }

    public void Set(string name, object? value) => _vars[name] = value;
    public Scope? Parent { get; } = parent;
}

/// <summary>
/// Renders a parsed template. Jinja's rules: output is str() of each value; a missing variable is Undefined;
/// "set" inside a loop does not outlive the iteration (namespace() carries values out); attribute access tries
/// the value's attribute (a dict's methods) and then its item, subscription the other way round. Nothing here
/// reads files, the clock only through strftime_now, and every loop and string is bounded by <see cref="RenderLimits"/>.
/// </summary>
sealed class JinjaRenderer
{
    readonly RenderLimits _limits;
    readonly StringBuilder _out = new();
    int _iterations, _depth;

    enum Flow { Normal, Break, Continue }

    JinjaRenderer(RenderLimits limits) => _limits = limits;

    public static string Render(IReadOnlyList<Node> template, IReadOnlyDictionary<string, object?> variables, RenderLimits limits)
    {
        var renderer = new JinjaRenderer(limits);
        var scope = new Scope(null);
        foreach (var (name, value) in JinjaBuiltins.Globals()) scope.Set(name, value);
        var root = new Scope(scope);
        foreach (var (name, value) in variables) root.Set(name, value);
        renderer.Execute(template, root);
        return renderer._out.ToString();
    }

    Flow Execute(IReadOnlyList<Node> nodes, Scope scope)
    {
        foreach (var node in nodes)
        {
            var flow = Execute(node, scope);
            if (flow != Flow.Normal) return flow;
        }
        return Flow.Normal;
    }

    Flow Execute(Node node, Scope scope)
    {
        EnsureStack(node.Line);
        switch (node)
        {
            case TextNode t: Write(t.Text, t.Line); return Flow.Normal;
            case OutputNode o: Write(PyValue.Str(Eval(o.Value, scope)), o.Line); return Flow.Normal;
            case IfNode i:
                foreach (var (test, body) in i.Branches)
                    if (PyValue.Truthy(Eval(test, scope))) return Execute(body, scope);
                return Execute(i.Else, scope);
            case ForNode f: return ExecuteFor(f, scope);
            case SetNode s: ExecuteSet(s, scope); return Flow.Normal;
            case MacroNode m: scope.Set(m.Name, Macro(m, scope)); return Flow.Normal;
            case LoopControlNode c: return c.IsBreak ? Flow.Break : Flow.Continue;
            case FilterBlockNode f:
                object? filtered = Capture(f.Body, scope);
                foreach (var (name, arguments) in f.Filters)
                {
                    var (filterArgs, filterKwargs) = Evaluate(arguments, scope, f.Line);
                    filtered = JinjaBuiltins.Filter(this, name, filtered, filterArgs, filterKwargs, f.Line);
                }
                Write(PyValue.Str(filtered), f.Line);
                return Flow.Normal;
            case WithNode w:
                var inner = new Scope(scope);
                foreach (var (name, value) in w.Assignments) inner.Set(name, Eval(value, scope));
                return Execute(w.Body, inner);
            case CallBlockNode b:
                var caller = Macro(new MacroNode(b.Line, "caller", b.Parameters, b.Body), scope);
                var (args, kwargs) = Evaluate(b.Call.Arguments, scope, b.Line);
                kwargs["caller"] = caller;
                Write(PyValue.Str(Invoke(Eval(b.Call.Function, scope), args, kwargs, b.Line)), b.Line);
                return Flow.Normal;
            default: throw new JinjaException(node.Line, $"cannot render {node.GetType().Name}");
        }
    }

    void Write(string text, int line)
    {
        if (_out.Length + text.Length > _limits.MaxChars) throw new JinjaException(line, $"the output passes {_limits.MaxChars} characters");
        _out.Append(text);
    }

    Flow ExecuteFor(ForNode f, Scope scope)
    {
        var items = PyValue.Iterate(Eval(f.Items, scope), f.Line);
        if (f.Filter is not null)
        {
            var kept = new List<object?>();
            foreach (var item in items)
            {
                Count(f.Line);
                var probe = new Scope(scope);
                Bind(f.Targets, item, probe, f.Line);
                if (PyValue.Truthy(Eval(f.Filter, probe))) kept.Add(item);
            }
            items = kept;
        }
        if (items.Count == 0) return Execute(f.Else, scope);
        var loop = new LoopInfo(items);
        for (int i = 0; i < items.Count; i++)
        {
            Count(f.Line);
            loop.Index0 = i;
            var iteration = new Scope(scope);
            iteration.Set("loop", loop);
            Bind(f.Targets, items[i], iteration, f.Line);
            if (Execute(f.Body, iteration) == Flow.Break) break;
        }
        return Flow.Normal;
    }

    void Count(int line)
    {
        if (++_iterations > _limits.MaxIterations) throw new JinjaException(line, $"the template loops more than {_limits.MaxIterations} times");
    }

    static void Bind(IReadOnlyList<string> targets, object? value, Scope scope, int line)
    {
        if (targets.Count == 1) { scope.Set(targets[0], value); return; }
        var parts = value is string ? null : value as IList<object?>;
        if (parts is null || parts.Count != targets.Count)
            throw new JinjaException(line, $"cannot unpack {PyValue.TypeName(value)} into {targets.Count} names ({string.Join(", ", targets)})");
        for (int i = 0; i < targets.Count; i++) scope.Set(targets[i], parts[i]);
    }

    /// <summary>What <paramref name="body"/> renders, as a string instead of output.</summary>
    string Capture(IReadOnlyList<Node> body, Scope scope)
    {
        int start = _out.Length;
        Execute(body, scope);
        var text = _out.ToString(start, _out.Length - start);
        _out.Length = start;
        return text;
    }

    void ExecuteSet(SetNode s, Scope scope)
    {
        var value = s.Body is not null ? Capture(s.Body, scope) : Eval(s.Value!, scope);
        if (s.Attribute is not null)
        {
            if (!scope.TryGet(s.Targets[0], out var target) || target is not Namespace ns)
                throw new JinjaException(s.Line, $"cannot assign attribute '{s.Attribute}' on '{s.Targets[0]}': only a namespace() takes attributes");
            ns.Attributes[s.Attribute] = value;
            return;
        }
        Bind(s.Targets, value, scope, s.Line);
    }

    /// <summary>
    /// A macro as a callable. Arguments beyond its parameters land in varargs (a list) and kwargs (a dict), and a
    /// {% call %} block passes caller, as in Jinja.
    /// </summary>
    Callable Macro(MacroNode m, Scope definedIn) => new(m.Name, (args, kwargs) =>
    {
        if (++_depth > _limits.MaxDepth) throw new JinjaException(m.Line, $"macros nest more than {_limits.MaxDepth} deep");
        try
        {
            var frame = new Scope(definedIn);
            frame.Set("varargs", args.Skip(m.Parameters.Count).ToArray());
            var extra = new OrderedDictionary<object, object?>();
            foreach (var (name, value) in kwargs)
                if (name == "caller") frame.Set(name, value);
                else if (!m.Parameters.Any(p => p.Name == name)) extra[name] = value;
            frame.Set("kwargs", extra);
            for (int i = 0; i < m.Parameters.Count; i++)
            {
                var (name, fallback) = m.Parameters[i];
                frame.Set(name, i < args.Count ? args[i]
                    : kwargs.TryGetValue(name, out var v) ? v
                    : fallback is not null ? Eval(fallback, frame)
                    : new Undefined($"'{name}' is undefined (macro '{m.Name}' was called without it)"));
            }
            return Capture(m.Body, frame);
        }
        finally { _depth--; }
    });

    // macros recurse through Execute and Eval: stop with an error before the thread's stack runs out
    static void EnsureStack(int line)
    {
        if (!System.Runtime.CompilerServices.RuntimeHelpers.TryEnsureSufficientExecutionStack())
            throw new JinjaException(line, "the template recurses too deeply");
    }

    public object? Eval(Expr expr, Scope scope)
    {
        EnsureStack(expr.Line);
        switch (expr)
        {
            case LiteralExpr l: return l.Value;
            case NameExpr n: return scope.TryGet(n.Name, out var v) ? v : new Undefined($"'{n.Name}' is undefined");
            case ListExpr l:
                var items = l.Items.Select(i => Eval(i, scope)).ToList();
                return l.IsTuple ? items.ToArray() : items;
            case DictExpr d:
                var dict = new OrderedDictionary<object, object?>();
                foreach (var (key, value) in d.Pairs)
                {
                    var k = Eval(key, scope);
                    if (k is null or Undefined or List<object?> or OrderedDictionary<object, object?>) throw new JinjaException(d.Line, $"unhashable dict key of type {PyValue.TypeName(k)}");
                    dict[k] = Eval(value, scope);
                }
                return dict;
            case AttributeExpr a: return JinjaBuiltins.GetAttribute(Eval(a.Target, scope), a.Name, a.Line);
            case ItemExpr i: return JinjaBuiltins.GetItem(Eval(i.Target, scope), Eval(i.Key, scope), i.Line);
            case SliceExpr s:
                return JinjaBuiltins.Slice(Eval(s.Target, scope), Optional(s.Start, scope), Optional(s.Stop, scope), Optional(s.Step, scope), s.Line);
            case CallExpr c:
                var function = Eval(c.Function, scope);
                var (callArgs, callKwargs) = Evaluate(c.Arguments, scope, c.Line);
                return Invoke(function, callArgs, callKwargs, c.Line);
            case FilterExpr f:
                var (filterArgs, filterKwargs) = Evaluate(f.Arguments, scope, f.Line);
                return JinjaBuiltins.Filter(this, f.Name, Eval(f.Target, scope), filterArgs, filterKwargs, f.Line);
            case TestExpr t:
                var result = JinjaBuiltins.Test(t.Name, Eval(t.Target, scope), t.Args.Select(a => Eval(a, scope)).ToList(), t.Line);
                return t.Negated ? !result : result;
            case UnaryExpr u: return Unary(u, Eval(u.Operand, scope));
            case BinaryExpr b when b.Op == "and":
                var left = Eval(b.Left, scope);
                return PyValue.Truthy(left) ? Eval(b.Right, scope) : left;
            case BinaryExpr b when b.Op == "or":
                left = Eval(b.Left, scope);
                return PyValue.Truthy(left) ? left : Eval(b.Right, scope);
            case BinaryExpr b: return JinjaBuiltins.Binary(b.Op, Eval(b.Left, scope), Eval(b.Right, scope), b.Line, _limits.MaxChars);
            case CompareExpr c:
                var first = Eval(c.First, scope);
                foreach (var (op, rightExpr) in c.Rest)
                {
                    var right = Eval(rightExpr, scope);
                    if (!JinjaBuiltins.CompareOp(op, first, right, c.Line)) return false;
                    first = right;
                }
                return true;
            case ConditionalExpr c:
                return PyValue.Truthy(Eval(c.Test, scope)) ? Eval(c.Then, scope)
                    : c.Else is null ? new Undefined("the condition was false and there is no else") : Eval(c.Else, scope);
            default: throw new JinjaException(expr.Line, $"cannot evaluate {expr.GetType().Name}");
        }
    }

    object? Optional(Expr? e, Scope scope) => e is null ? null : Eval(e, scope);

    (List<object?>, Dictionary<string, object?>) Evaluate(Arguments arguments, Scope scope, int line)
    {
        var args = arguments.Positional.Select(a => Eval(a, scope)).ToList();
        if (arguments.Spread is not null) args.AddRange(PyValue.Iterate(Eval(arguments.Spread, scope), line));
        var kwargs = new Dictionary<string, object?>();
        foreach (var (name, value) in arguments.Named) kwargs[name] = Eval(value, scope);
        if (arguments.NamedSpread is not null)
        {
            if (Eval(arguments.NamedSpread, scope) is not OrderedDictionary<object, object?> spread) throw new JinjaException(line, "** needs a dict");
            foreach (var (name, value) in spread) kwargs[PyValue.Str(name)] = value;
        }
        return (args, kwargs);
    }

    static object? Invoke(object? function, List<object?> args, Dictionary<string, object?> kwargs, int line)
    {
        if (function is not Callable callable)
        {
            PyValue.FailIfUndefined(function, line);
            throw new JinjaException(line, $"'{PyValue.TypeName(function)}' object is not callable");
        }
        try { return callable.Invoke(args, kwargs); }
        catch (JinjaException e) when (e.Line == 0) { throw new JinjaException(line, e.Message, e.Raised); }
        catch (Exception e) when (e is InvalidOperationException or ArgumentException or FormatException or OverflowException or InvalidCastException)
        {
            throw new JinjaException(line, $"{callable.Name}(): {e.Message}");
        }
    }

    static object? Unary(UnaryExpr u, object? value)
    {
        if (u.Op == "not") return !PyValue.Truthy(value);
        PyValue.FailIfUndefined(value, u.Line);
        return (u.Op, value) switch
        {
            ("-", long l) => -l,
            ("-", double d) => -d,
            ("-", bool b) => b ? -1L : 0L,
            ("+", long or double) => value,
            ("+", bool b) => b ? 1L : 0L,
            _ => throw new JinjaException(u.Line, $"bad operand type for unary {u.Op}: '{PyValue.TypeName(value)}'"),
        };
    }

    /// <summary>Calls a filter or test by name on behalf of map/select (filters that take another filter's name).</summary>
    public object? ApplyFilter(string name, object? value, List<object?> args, int line) =>
        JinjaBuiltins.Filter(this, name, value, args, new(), line);
}
