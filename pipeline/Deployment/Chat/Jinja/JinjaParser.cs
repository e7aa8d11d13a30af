namespace OnnxLora.Pipeline.Deployment.Chat.Jinja;

// The syntax tree: statements render text, expressions produce values. Every node keeps its line for errors.
abstract record Node(int Line);
sealed record TextNode(int Line, string Text) : Node(Line);
sealed record OutputNode(int Line, Expr Value) : Node(Line);
sealed record IfNode(int Line, IReadOnlyList<(Expr Test, IReadOnlyList<Node> Body)> Branches, IReadOnlyList<Node> Else) : Node(Line);
sealed record ForNode(int Line, IReadOnlyList<string> Targets, Expr Items, Expr? Filter, IReadOnlyList<Node> Body, IReadOnlyList<Node> Else) : Node(Line);
sealed record SetNode(int Line, IReadOnlyList<string> Targets, string? Attribute, Expr? Value, IReadOnlyList<Node>? Body) : Node(Line);
sealed record MacroNode(int Line, string Name, IReadOnlyList<(string Name, Expr? Default)> Parameters, IReadOnlyList<Node> Body) : Node(Line);
sealed record LoopControlNode(int Line, bool IsBreak) : Node(Line);
sealed record FilterBlockNode(int Line, IReadOnlyList<(string Name, Arguments Arguments)> Filters, IReadOnlyList<Node> Body) : Node(Line);
sealed record WithNode(int Line, IReadOnlyList<(string Name, Expr Value)> Assignments, IReadOnlyList<Node> Body) : Node(Line);
sealed record CallBlockNode(int Line, CallExpr Call, IReadOnlyList<(string Name, Expr? Default)> Parameters, IReadOnlyList<Node> Body) : Node(Line);

abstract record Expr(int Line);
sealed record LiteralExpr(int Line, object? Value) : Expr(Line);
sealed record NameExpr(int Line, string Name) : Expr(Line);
sealed record ListExpr(int Line, IReadOnlyList<Expr> Items, bool IsTuple) : Expr(Line);
sealed record DictExpr(int Line, IReadOnlyList<(Expr Key, Expr Value)> Pairs) : Expr(Line);
sealed record AttributeExpr(int Line, Expr Target, string Name) : Expr(Line);
sealed record ItemExpr(int Line, Expr Target, Expr Key) : Expr(Line);
sealed record SliceExpr(int Line, Expr Target, Expr? Start, Expr? Stop, Expr? Step) : Expr(Line);
sealed record CallExpr(int Line, Expr Function, Arguments Arguments) : Expr(Line);

/// <summary>A call's arguments: positional, name=value, and Python's *list and **dict spreads.</summary>
sealed record Arguments(IReadOnlyList<Expr> Positional, IReadOnlyList<(string Name, Expr Value)> Named, Expr? Spread = null, Expr? NamedSpread = null)
{
    public static Arguments None { get; } = new([], []);
}
sealed record FilterExpr(int Line, Expr Target, string Name, Arguments Arguments) : Expr(Line);
sealed record TestExpr(int Line, Expr Target, string Name, IReadOnlyList<Expr> Args, bool Negated) : Expr(Line);
sealed record UnaryExpr(int Line, string Op, Expr Operand) : Expr(Line);
sealed record BinaryExpr(int Line, string Op, Expr Left, Expr Right) : Expr(Line);
sealed record CompareExpr(int Line, Expr First, IReadOnlyList<(string Op, Expr Right)> Rest) : Expr(Line);
sealed record ConditionalExpr(int Line, Expr Test, Expr Then, Expr? Else) : Expr(Line);

/// <summary>
/// Jinja2's grammar for what chat templates use: if/elif/else, for (with else, an if filter and tuple targets),
/// set (also ns.attr and block set), macro, break/continue, generation; expressions with Jinja's precedence
/// (condition ← or ← and ← not ← comparisons and in ← + - ← ~ ← * / // % ← ** ← unary ← postfix, filters and tests).
/// Statements that would read other files (include, import, extends) are refused.
/// </summary>
sealed class JinjaParser
{
    readonly List<Segment> _segments;
    int _segment;
    IReadOnlyList<Token> _tokens = [];
    int _pos;

    JinjaParser(List<Segment> segments) => _segments = segments;

    // nesting is recursion here and when rendering: a template nested deeper than real ones ever are is refused
    const int MaxNesting = 200;
    int _nesting;

    T Nested<T>(int line, Func<T> parse)
    {
        if (++_nesting > MaxNesting) throw new JinjaException(line, $"the template nests more than {MaxNesting} deep");
        try { return parse(); }
        finally { _nesting--; }
    }

    public static IReadOnlyList<Node> Parse(string source)
    {
        var parser = new JinjaParser(JinjaLexer.Split(source));
        var body = parser.ParseBody(out var stop);
        if (stop is not null) throw new JinjaException(stop.Value.Line, $"unexpected '{stop.Value.Text}'");
        return body;
    }

    /// <summary>Statements until the end or until a statement whose keyword is one of <paramref name="stops"/> (left as the current tag).</summary>
    List<Node> ParseBody(out Token? stop, params string[] stops)
    {
        var nodes = new List<Node>();
        stop = null;
        while (_segment < _segments.Count)
        {
            var seg = _segments[_segment];
            if (seg.Kind == SegmentKind.Text) { nodes.Add(new TextNode(seg.Line, seg.Text)); _segment++; continue; }
            _tokens = seg.Tokens;
            _pos = 0;
            if (seg.Kind == SegmentKind.Output)
            {
                _segment++;
                var value = ParseTuple(true);
                ExpectEnd();
                nodes.Add(new OutputNode(seg.Line, value));
                continue;
            }
            var keyword = Current;
            if (keyword.Kind != TokenKind.Name) throw new JinjaException(keyword.Line, $"expected a statement keyword, got {keyword}");
            if (stops.Contains(keyword.Text)) { stop = keyword; return nodes; }
            _segment++;
            _pos++;
            nodes.Add(Nested(keyword.Line, () => keyword.Text switch
            {
                "if" => ParseIf(keyword.Line),
                "for" => ParseFor(keyword.Line),
                "set" => ParseSet(keyword.Line),
                "macro" => ParseMacro(keyword.Line),
                "call" => ParseCallBlock(keyword.Line),
                "filter" => ParseFilterBlock(keyword.Line),
                "with" => ParseWith(keyword.Line),
                "break" or "continue" => EndThen(new LoopControlNode(keyword.Line, keyword.Text == "break")),
                "generation" => ParseGeneration(keyword.Line),
                "include" or "import" or "from" or "extends" or "block" => throw new JinjaException(keyword.Line, $"'{keyword.Text}' is not supported in a chat template (templates read no files)"),
                _ => throw new JinjaException(keyword.Line, $"unknown or misplaced statement '{keyword.Text}'"),
            }));
        }
        if (stops.Length > 0) throw new JinjaException(_segments.Count > 0 ? _segments[^1].Line : 1, $"missing {{% {stops[^1]} %}}");
        return nodes;
    }

    Node EndThen(Node node) { ExpectEnd(); return node; }

    /// <summary>Consumes the stop tag the body ended at (already current) and returns its keyword.</summary>
    string TakeStop(Token? stop)
    {
        _segment++;
        _pos = 1;
        return stop!.Value.Text;
    }

    Node ParseIf(int line)
    {
        var branches = new List<(Expr, IReadOnlyList<Node>)>();
        IReadOnlyList<Node> otherwise = [];
        var test = ParseTuple(false);
        while (true)
        {
            ExpectEnd();
            var body = ParseBody(out var stop, "elif", "else", "endif");
            branches.Add((test, body));
            var keyword = TakeStop(stop);
            if (keyword == "elif") { test = ParseTuple(false); continue; }
            if (keyword == "else")
            {
                ExpectEnd();
                otherwise = ParseBody(out stop, "endif");
                TakeStop(stop);
            }
            ExpectEnd();
            return new IfNode(line, branches, otherwise);
        }
    }

    Node ParseFor(int line)
    {
        var targets = new List<string> { ExpectName() };
        while (Current.Is(",")) { _pos++; targets.Add(ExpectName()); }
        if (!Current.IsName("in")) throw new JinjaException(Current.Line, $"expected 'in' in a for loop, got {Current}");
        _pos++;
        var items = ParseTuple(false, allowCondition: false);
        Expr? filter = null;
        if (Current.IsName("if")) { _pos++; filter = ParseTuple(false); }
        if (Current.IsName("recursive")) throw new JinjaException(Current.Line, "recursive loops are not supported");
        ExpectEnd();
        var body = ParseBody(out var stop, "else", "endfor");
        IReadOnlyList<Node> otherwise = [];
        if (TakeStop(stop) == "else")
        {
            ExpectEnd();
            otherwise = ParseBody(out stop, "endfor");
            TakeStop(stop);
        }
        ExpectEnd();
        return new ForNode(line, targets, items, filter, body, otherwise);
    }

    Node ParseSet(int line)
    {
        var targets = new List<string> { ExpectName() };
        string? attribute = null;
        if (Current.Is(".")) { _pos++; attribute = ExpectName(); }
        else while (Current.Is(",")) { _pos++; targets.Add(ExpectName()); }
        if (Current.Kind == TokenKind.End && attribute is null && targets.Count == 1)
        {
            _pos++;
            var body = ParseBody(out var stop, "endset");
            TakeStop(stop);
            ExpectEnd();
            return new SetNode(line, targets, null, null, body);
        }
        if (!Current.Is("=")) throw new JinjaException(Current.Line, $"expected '=' in set, got {Current}");
        _pos++;
        var value = ParseTuple(false);
        ExpectEnd();
        return new SetNode(line, targets, attribute, value, null);
    }

    Node ParseMacro(int line)
    {
        var name = ExpectName();
        Expect("(");
        var parameters = ParseParameters();
        ExpectEnd();
        var body = ParseBody(out var stop, "endmacro");
        TakeStop(stop);
        ExpectEnd();
        return new MacroNode(line, name, parameters, body);
    }

    /// <summary>Macro or caller parameters after "(" up to and including ")": names with optional defaults.</summary>
    List<(string, Expr?)> ParseParameters()
    {
        var parameters = new List<(string, Expr?)>();
        while (!Current.Is(")"))
        {
            if (parameters.Count > 0) Expect(",");
            if (Current.Is(")")) break;
            var parameter = ExpectName();
            Expr? fallback = null;
            if (Current.Is("=")) { _pos++; fallback = ParseExpression(); }
            parameters.Add((parameter, fallback));
        }
        _pos++;
        return parameters;
    }

    // {% call(args) macro(…) %}body{% endcall %}: the macro's caller() renders the body
    Node ParseCallBlock(int line)
    {
        List<(string, Expr?)> parameters = [];
        if (Current.Is("(")) { _pos++; parameters = ParseParameters(); }
        var call = ParseExpression() as CallExpr ?? throw new JinjaException(line, "{% call %} needs a macro call");
        ExpectEnd();
        var body = ParseBody(out var stop, "endcall");
        TakeStop(stop);
        ExpectEnd();
        return new CallBlockNode(line, call, parameters, body);
    }

    // {% filter upper %}…{% endfilter %}: the body's text through one filter or a chain of them
    Node ParseFilterBlock(int line)
    {
        var filters = new List<(string, Arguments)>();
        do
        {
            if (filters.Count > 0) _pos++;           // the '|' between filters
            var name = ExpectName();
            var arguments = Arguments.None;
            if (Current.Is("(")) { _pos++; arguments = ParseArguments(); }
            filters.Add((name, arguments));
        } while (Current.Is("|"));
        ExpectEnd();
        var body = ParseBody(out var stop, "endfilter");
        TakeStop(stop);
        ExpectEnd();
        return new FilterBlockNode(line, filters, body);
    }

    // {% with a = 1, b = a + 1 %}…{% endwith %}: names that live only inside the block
    Node ParseWith(int line)
    {
        var assignments = new List<(string, Expr)>();
        while (Current.Kind != TokenKind.End)
        {
            if (assignments.Count > 0) Expect(",");
            var name = ExpectName();
            Expect("=");
            assignments.Add((name, ParseExpression()));
        }
        _pos++;
        var body = ParseBody(out var stop, "endwith");
        TakeStop(stop);
        ExpectEnd();
        return new WithNode(line, assignments, body);
    }

    // transformers' AssistantTracker marks assistant text with {% generation %}; rendering keeps it as it is
    Node ParseGeneration(int line)
    {
        ExpectEnd();
        var body = ParseBody(out var stop, "endgeneration");
        TakeStop(stop);
        ExpectEnd();
        return new IfNode(line, [(new LiteralExpr(line, true), body)], []);
    }

    Token Current => _tokens[_pos];

    void ExpectEnd()
    {
        if (Current.Kind != TokenKind.End) throw new JinjaException(Current.Line, $"expected the end of the tag, got {Current}");
    }

    void Expect(string op)
    {
        if (!Current.Is(op)) throw new JinjaException(Current.Line, $"expected '{op}', got {Current}");
        _pos++;
    }

    string ExpectName()
    {
        if (Current.Kind != TokenKind.Name) throw new JinjaException(Current.Line, $"expected a name, got {Current}");
        return _tokens[_pos++].Text;
    }

    /// <summary>An expression, or several separated by commas as a tuple (a bare "a, b").</summary>
    Expr ParseTuple(bool allowEmpty, bool allowCondition = true)
    {
        int line = Current.Line;
        var items = new List<Expr>();
        bool comma = false;
        while (true)
        {
            if (items.Count > 0)
            {
                if (!Current.Is(",")) break;
                _pos++;
                comma = true;
            }
            if (Current.Kind == TokenKind.End || Current.Is(")")) break;
            items.Add(ParseExpression(allowCondition));
        }
        if (items.Count == 0 && !allowEmpty) throw new JinjaException(line, $"expected an expression, got {Current}");
        return items.Count == 1 && !comma ? items[0] : new ListExpr(line, items, IsTuple: true);
    }

    Expr ParseExpression(bool allowCondition = true) => Nested(Current.Line, () => ParseCondition(allowCondition));

    Expr ParseCondition(bool allowCondition)
    {
        var expr = ParseOr();
        while (allowCondition && Current.IsName("if"))
        {
            int line = Current.Line;
            _pos++;
            var test = ParseOr();
            Expr? otherwise = null;
            if (Current.IsName("else")) { _pos++; otherwise = ParseExpression(); }
            expr = new ConditionalExpr(line, test, expr, otherwise);
        }
        return expr;
    }

    Expr ParseOr()
    {
        var left = ParseAnd();
        while (Current.IsName("or")) { int line = Current.Line; _pos++; left = new BinaryExpr(line, "or", left, ParseAnd()); }
        return left;
    }

    Expr ParseAnd()
    {
        var left = ParseNot();
        while (Current.IsName("and")) { int line = Current.Line; _pos++; left = new BinaryExpr(line, "and", left, ParseNot()); }
        return left;
    }

    Expr ParseNot()
    {
        if (!Current.IsName("not")) return ParseCompare();
        int line = Current.Line;
        _pos++;
        return new UnaryExpr(line, "not", Nested(line, ParseNot));
    }

    Expr ParseCompare()
    {
        int line = Current.Line;
        var first = ParseMath1();
        var rest = new List<(string, Expr)>();
        while (true)
        {
            string? op = null;
            if (Current.Kind == TokenKind.Operator && Current.Text is "==" or "!=" or "<" or ">" or "<=" or ">=") { op = Current.Text; _pos++; }
            else if (Current.IsName("in")) { op = "in"; _pos++; }
            else if (Current.IsName("not") && _tokens[_pos + 1].IsName("in")) { op = "not in"; _pos += 2; }
            if (op is null) break;
            rest.Add((op, ParseMath1()));
        }
        return rest.Count == 0 ? first : new CompareExpr(line, first, rest);
    }

    Expr ParseMath1()
    {
        var left = ParseConcat();
        while (Current.Kind == TokenKind.Operator && Current.Text is "+" or "-")
        {
            var op = _tokens[_pos++];
            left = new BinaryExpr(op.Line, op.Text, left, ParseConcat());
        }
        return left;
    }

    Expr ParseConcat()
    {
        var left = ParseMath2();
        while (Current.Is("~")) { int line = Current.Line; _pos++; left = new BinaryExpr(line, "~", left, ParseMath2()); }
        return left;
    }

    Expr ParseMath2()
    {
        var left = ParsePow();
        while (Current.Kind == TokenKind.Operator && Current.Text is "*" or "/" or "//" or "%")
        {
            var op = _tokens[_pos++];
            left = new BinaryExpr(op.Line, op.Text, left, ParsePow());
        }
        return left;
    }

    Expr ParsePow()
    {
        var left = ParseUnary(true);
        while (Current.Is("**")) { int line = Current.Line; _pos++; left = new BinaryExpr(line, "**", left, ParseUnary(true)); }
        return left;
    }

    Expr ParseUnary(bool withFilter)
    {
        var token = Current;
        Expr expr;
        if (token.Is("-") || token.Is("+")) { _pos++; expr = new UnaryExpr(token.Line, token.Text, Nested(token.Line, () => ParseUnary(false))); }
        else expr = ParsePrimary();
        expr = ParsePostfix(expr);
        return withFilter ? ParseFilters(expr) : expr;
    }

    Expr ParsePrimary()
    {
        var token = _tokens[_pos++];
        switch (token.Kind)
        {
            case TokenKind.Name:
                return token.Text switch
                {
                    "true" or "True" => new LiteralExpr(token.Line, true),
                    "false" or "False" => new LiteralExpr(token.Line, false),
                    "none" or "None" => new LiteralExpr(token.Line, null),
                    _ => new NameExpr(token.Line, token.Text),
                };
            case TokenKind.String:
                var text = (string)token.Value!;
                while (Current.Kind == TokenKind.String) text += (string)_tokens[_pos++].Value!;   // "a" "b" is "ab"
                return new LiteralExpr(token.Line, text);
            case TokenKind.Integer or TokenKind.Float:
                return new LiteralExpr(token.Line, token.Value);
            case TokenKind.Operator when token.Text == "(":
                var inner = ParseTuple(true);
                Expect(")");
                return inner;
            case TokenKind.Operator when token.Text == "[":
                var items = new List<Expr>();
                while (!Current.Is("]"))
                {
                    if (items.Count > 0) Expect(",");
                    if (Current.Is("]")) break;
                    items.Add(ParseExpression());
                }
                _pos++;
                return new ListExpr(token.Line, items, IsTuple: false);
            case TokenKind.Operator when token.Text == "{":
                var pairs = new List<(Expr, Expr)>();
                while (!Current.Is("}"))
                {
                    if (pairs.Count > 0) Expect(",");
                    if (Current.Is("}")) break;
                    var key = ParseExpression();
                    Expect(":");
                    pairs.Add((key, ParseExpression()));
                }
                _pos++;
                return new DictExpr(token.Line, pairs);
            default:
                throw new JinjaException(token.Line, $"unexpected {token}");
        }
    }

    Expr ParsePostfix(Expr expr)
    {
        while (true)
        {
            var token = Current;
            if (token.Is("."))
            {
                _pos++;
                var name = _tokens[_pos++];
                expr = name.Kind switch
                {
                    TokenKind.Name => new AttributeExpr(token.Line, expr, name.Text),
                    TokenKind.Integer => new ItemExpr(token.Line, expr, new LiteralExpr(token.Line, name.Value)),
                    _ => throw new JinjaException(token.Line, $"expected an attribute name after '.', got {name}"),
                };
            }
            else if (token.Is("[")) { _pos++; expr = ParseSubscript(expr, token.Line); }
            else if (token.Is("(")) { _pos++; expr = ParseCall(expr, token.Line); }
            else return expr;
        }
    }

    Expr ParseSubscript(Expr target, int line)
    {
        Expr?[] parts = [null, null, null];
        int part = 0;
        bool slice = false;
        while (!Current.Is("]"))
        {
            if (Current.Is(":"))
            {
                if (++part > 2) throw new JinjaException(line, "a slice has at most start:stop:step");
                slice = true;
                _pos++;
                continue;
            }
            if (parts[part] is not null) throw new JinjaException(line, $"expected ']' or ':', got {Current}");
            parts[part] = ParseExpression();
        }
        _pos++;
        if (slice) return new SliceExpr(line, target, parts[0], parts[1], parts[2]);
        return new ItemExpr(line, target, parts[0] ?? throw new JinjaException(line, "empty subscript []"));
    }

    Expr ParseCall(Expr function, int line) => new CallExpr(line, function, ParseArguments());

    /// <summary>Call arguments after "(" up to and including ")": positional first, then name=value, *list and **dict.</summary>
    Arguments ParseArguments()
    {
        var args = new List<Expr>();
        var kwargs = new List<(string, Expr)>();
        Expr? spread = null, namedSpread = null;
        while (!Current.Is(")"))
        {
            if (args.Count + kwargs.Count > 0 || spread is not null || namedSpread is not null) Expect(",");
            if (Current.Is(")")) break;
            if (Current.Is("*")) { _pos++; spread = ParseExpression(); }
            else if (Current.Is("**")) { _pos++; namedSpread = ParseExpression(); }
            else if (Current.Kind == TokenKind.Name && _tokens[_pos + 1].Is("="))
            {
                var name = _tokens[_pos].Text;
                _pos += 2;
                kwargs.Add((name, ParseExpression()));
            }
            else
            {
                if (kwargs.Count > 0) throw new JinjaException(Current.Line, "a positional argument follows a keyword argument");
                args.Add(ParseExpression());
            }
        }
        _pos++;
        return new Arguments(args, kwargs, spread, namedSpread);
    }

    Expr ParseFilters(Expr expr)
    {
        while (true)
        {
            var token = Current;
            if (token.Is("|"))
            {
                _pos++;
                var name = ExpectName();
                var arguments = Arguments.None;
                if (Current.Is("(")) { _pos++; arguments = ParseArguments(); }
                expr = new FilterExpr(token.Line, expr, name, arguments);
            }
            else if (token.IsName("is"))
            {
                _pos++;
                bool negated = Current.IsName("not");
                if (negated) _pos++;
                var name = Current.Kind == TokenKind.Name ? ExpectName()
                    : Current.Kind == TokenKind.Operator && Current.Text is "==" or "!=" or "<" or ">" or "<=" or ">=" ? _tokens[_pos++].Text
                    : throw new JinjaException(Current.Line, $"expected a test name after 'is', got {Current}");
                List<Expr> args = [];
                if (Current.Is("("))
                {
                    _pos++;
                    var arguments = ParseArguments();
                    if (arguments.Named.Count > 0 || arguments.Spread is not null || arguments.NamedSpread is not null)
                        throw new JinjaException(token.Line, $"test '{name}' takes only positional arguments");
                    args = [.. arguments.Positional];
                }
                else if (StartsArgument(Current)) args = [ParsePostfix(ParsePrimary())];
                expr = new TestExpr(token.Line, expr, name, args, negated);
            }
            else if (token.Is("(")) { _pos++; expr = ParseCall(expr, token.Line); }
            else return expr;
        }
    }

    // Jinja's "x is divisibleby 3": a test takes one bare argument when a value follows
    static bool StartsArgument(Token t) =>
        t.Kind is TokenKind.String or TokenKind.Integer or TokenKind.Float
        || t.Kind == TokenKind.Name && t.Text is not ("else" or "or" or "and" or "if" or "in" or "not" or "is")
        || t.Is("[") || t.Is("{");
}
