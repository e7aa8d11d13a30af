using System.Text.Json.Nodes;
using OnnxLora.Pipeline.Data;
using OnnxLora.Pipeline.Deployment.Chat.Jinja;

namespace OnnxLora.Pipeline.Deployment.Chat;

/// <summary>One message of a conversation: its role ("system", "user", "assistant", …) and its text.</summary>
public sealed record ChatTurn(string Role, string Content);

/// <summary>
/// The template failed on these messages: the template's own raise_exception(msg) (e.g. roles out of order), or an
/// error while rendering (a missing field used). A server answers 400 for <see cref="RaisedByTemplate"/>.
/// </summary>
public sealed class ChatTemplateException(string message, int line, bool raisedByTemplate) : Exception(message)
{
    /// <summary>The template line that failed.</summary>
    public int Line { get; } = line;

    /// <summary>True when the template itself rejected the messages with raise_exception.</summary>
    public bool RaisedByTemplate { get; } = raisedByTemplate;
}

/// <summary>
/// A model's chat template as Hugging Face stores it — <c>chat_template.jinja</c> beside the tokenizer, or
/// <c>chat_template</c> in tokenizer_config.json (a string, or a list of {name, template} whose "default" is used) —
/// rendered the way transformers' apply_chat_template does: Jinja2 with trim_blocks and lstrip_blocks, the
/// messages as [{role, content}], add_generation_prompt, the special tokens (bos_token, eos_token, …), tools and
/// documents as none, and raise_exception/strftime_now. Thread-safe: the parsed template is immutable.
/// </summary>
public sealed class ChatTemplate
{
    /// <summary>The template file transformers writes beside tokenizer_config.json (4.50+).</summary>
    public const string TemplateFile = "chat_template.jinja";

    /// <summary>The tokenizer's configuration, holding chat_template and the special tokens.</summary>
    public const string TokenizerConfig = "tokenizer_config.json";

    const string SpecialTokensMap = "special_tokens_map.json";
    const long MaxTemplateBytes = 4 << 20;
    static readonly string[] SpecialTokenNames = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

    readonly IReadOnlyList<Node> _template;
    readonly Dictionary<string, object?> _specialTokens;

    ChatTemplate(IReadOnlyList<Node> template, string origin, Dictionary<string, object?> specialTokens)
    {
        _template = template;
        Origin = origin;
        _specialTokens = specialTokens;
    }

    /// <summary>Where the template came from (a file, or tokenizer_config.json's chat_template), as errors name it.</summary>
    public string Origin { get; }

    /// <summary>The end-of-sequence token's text (tokenizer_config.json's eos_token), so a server can stop at it; null if none.</summary>
    public string? EosToken => _specialTokens.GetValueOrDefault("eos_token") as string;

    /// <summary>
    /// Where an answer rendered with this template ends: the eos_token as a token id when <paramref name="tokenizer"/>
    /// encodes it as one token (else as a stop text), plus <paramref name="extraStopIds"/> (e.g. generation_config.json's
    /// eos_token_id list, which can name an end-of-turn token that eos_token is not).
    /// </summary>
    public (IReadOnlyList<int> TokenIds, string? Text) EndOfAnswer(Microsoft.ML.Tokenizers.Tokenizer tokenizer, IEnumerable<int>? extraStopIds = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        var ids = (extraStopIds ?? []).ToList();
        string? text = null;
        if (EosToken is { Length: > 0 } eos)
        {
            var eosIds = tokenizer.EncodeToIds(eos);
            if (eosIds.Count == 1) ids.Add(eosIds[0]);
            else text = eos;
        }
        return (ids.Distinct().ToList(), text);
    }

    /// <summary>The beginning-of-sequence token's text; null if none.</summary>
    public string? BosToken => _specialTokens.GetValueOrDefault("bos_token") as string;

    /// <summary>Limits on one render (output size, loop iterations, macro depth).</summary>
    internal RenderLimits Limits { get; init; } = new();

    /// <summary>
    /// The chat template of a model or tokenizer folder: its chat_template.jinja if there is one, else
    /// tokenizer_config.json's chat_template; null when the folder has neither. A path to a .jinja file loads that
    /// template (special tokens from its folder); a path to tokenizer_config.json loads its folder.
    /// </summary>
    /// <exception cref="InvalidDataException">The template does not parse (the message names the file and line), or a file is not valid JSON.</exception>
    public static ChatTemplate? Load(string modelOrTokenizerDir)
    {
        ArgumentNullException.ThrowIfNull(modelOrTokenizerDir);
        // a file in such a folder works too: a .jinja template (its special tokens from the folder) or tokenizer_config.json
        string? templateFile = null;
        if (File.Exists(modelOrTokenizerDir))
        {
            if (modelOrTokenizerDir.EndsWith(".jinja", StringComparison.OrdinalIgnoreCase)) templateFile = modelOrTokenizerDir;
            else if (Path.GetFileName(modelOrTokenizerDir) != TokenizerConfig)
                throw new ArgumentException($"{modelOrTokenizerDir}: not a model folder, a .jinja chat template or {TokenizerConfig}", nameof(modelOrTokenizerDir));
            modelOrTokenizerDir = Path.GetDirectoryName(Path.GetFullPath(modelOrTokenizerDir))!;
        }
        if (!Directory.Exists(modelOrTokenizerDir)) throw new DirectoryNotFoundException($"{modelOrTokenizerDir}: no such folder");
        var configPath = Path.Combine(modelOrTokenizerDir, TokenizerConfig);
        var config = File.Exists(configPath) ? TextTokenizer.ReadObject(configPath) : null;
        var templatePath = templateFile ?? Path.Combine(modelOrTokenizerDir, TemplateFile);
        string source, origin;
        if (File.Exists(templatePath))
        {
            // templates are a few KB; a huge file is not one (and is not read whole)
            if (new FileInfo(templatePath).Length > MaxTemplateBytes) throw new InvalidDataException($"{templatePath}: {new FileInfo(templatePath).Length} bytes is too large for a chat template (at most {MaxTemplateBytes})");
            (source, origin) = (File.ReadAllText(templatePath), templatePath);
        }
        else if (config?["chat_template"] is { } node) (source, origin) = (FromConfig(node, configPath), $"{configPath} chat_template");
        else return null;
        return Parse(source, origin, SpecialTokens(config, Path.Combine(modelOrTokenizerDir, SpecialTokensMap)));
    }

    /// <summary>A template from its source text (tests, or a template given on the command line).</summary>
    /// <param name="source">the Jinja2 template</param>
    /// <param name="origin">what errors call it</param>
    /// <param name="bosToken">bos_token's text, or null</param>
    /// <param name="eosToken">eos_token's text, or null</param>
    /// <exception cref="InvalidDataException">The template does not parse; the message names <paramref name="origin"/> and the line.</exception>
    public static ChatTemplate FromSource(string source, string origin, string? bosToken = null, string? eosToken = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(origin);
        var tokens = new Dictionary<string, object?>();
        if (bosToken is not null) tokens["bos_token"] = bosToken;
        if (eosToken is not null) tokens["eos_token"] = eosToken;
        return Parse(source, origin, tokens);
    }

    static ChatTemplate Parse(string source, string origin, Dictionary<string, object?> specialTokens)
    {
        try { return new ChatTemplate(JinjaParser.Parse(source), origin, specialTokens); }
        catch (JinjaException e) { throw new InvalidDataException($"{origin}, line {e.Line}: {e.Message}", e); }
    }

    // chat_template: a string, or [{"name": …, "template": …}] from which transformers takes "default"
    static string FromConfig(JsonNode node, string configPath)
    {
        if (node is JsonValue v && v.TryGetValue<string>(out var text)) return text;
        if (node is not JsonArray list) throw new InvalidDataException($"{configPath}: chat_template is neither a string nor a list of {{name, template}}");
        var names = new List<string>();
        foreach (var item in list)
        {
            var name = item?["name"] is JsonValue n && n.TryGetValue<string>(out var s) ? s : null;
            if (name is null) throw new InvalidDataException($"{configPath}: a chat_template entry has no 'name'");
            names.Add(name);
            if (name == "default")
                return item!["template"] is JsonValue t && t.TryGetValue<string>(out var template) ? template
                    : throw new InvalidDataException($"{configPath}: chat_template 'default' has no 'template' string");
        }
        throw new InvalidDataException($"{configPath}: chat_template has no 'default' entry (it has {string.Join(", ", names)})");
    }

    // transformers' special_tokens_map: tokenizer_config.json's tokens, special_tokens_map.json filling the gaps
    static Dictionary<string, object?> SpecialTokens(JsonObject? config, string mapPath)
    {
        var map = File.Exists(mapPath) ? TextTokenizer.ReadObject(mapPath) : null;
        var tokens = new Dictionary<string, object?>();
        foreach (var name in SpecialTokenNames)
            if ((TextTokenizer.TokenContent(config?[name]) ?? TextTokenizer.TokenContent(map?[name])) is { } text) tokens[name] = text;
        var additional = (config?["additional_special_tokens"] ?? map?["additional_special_tokens"]) as JsonArray;
        if (additional is not null) tokens["additional_special_tokens"] = additional.Select(t => (object?)TextTokenizer.TokenContent(t)).Where(t => t is not null).ToList();
        return tokens;
    }

    /// <summary>
    /// The prompt for <paramref name="messages"/>: what the model reads before it answers. With
    /// <paramref name="addGenerationPrompt"/> the template adds the start of an assistant turn.
    /// </summary>
    /// <exception cref="ChatTemplateException">The template rejected the messages (raise_exception) or failed on them; the message names the template, line and reason.</exception>
    public string Render(IReadOnlyList<ChatTurn> messages, bool addGenerationPrompt) => Render(messages, addGenerationPrompt, null);

    /// <summary>
    /// The prompt for <paramref name="messages"/> with more template variables, as JSON values: what a request's
    /// chat_template_kwargs carry (Qwen3's enable_thinking), or tools (a list of function schemas) for templates that
    /// describe them. They may replace the special tokens, tools and documents, not messages or add_generation_prompt.
    /// </summary>
    /// <exception cref="ArgumentException"><paramref name="variables"/> names messages or add_generation_prompt.</exception>
    /// <exception cref="ChatTemplateException">The template rejected the messages or failed on them.</exception>
    public string Render(IReadOnlyList<ChatTurn> messages, bool addGenerationPrompt, IReadOnlyDictionary<string, JsonNode?>? variables)
    {
        ArgumentNullException.ThrowIfNull(messages);
        var list = new List<object?>(messages.Count);
        foreach (var m in messages)
        {
            ArgumentNullException.ThrowIfNull(m, nameof(messages));
            list.Add(new OrderedDictionary<object, object?> { ["role"] = m.Role, ["content"] = m.Content });
        }
        var all = new Dictionary<string, object?>(_specialTokens) { ["tools"] = null, ["documents"] = null };
        foreach (var (name, value) in variables ?? new Dictionary<string, JsonNode?>())
        {
            if (name is "messages" or "add_generation_prompt") throw new ArgumentException($"'{name}' is set by Render itself, not through variables", nameof(variables));
            all[name] = PyValue.FromJson(value);
        }
        all["messages"] = list;
        all["add_generation_prompt"] = addGenerationPrompt;
        try { return JinjaRenderer.Render(_template, all, Limits); }
        catch (JinjaException e)
        {
            var reason = e.Raised ? $"the template refused the messages: {e.Message}" : e.Message;
            throw new ChatTemplateException($"{Origin}, line {e.Line}: {reason}", e.Line, e.Raised);
        }
    }
}
