using System.Diagnostics;
using System.Text.Json;
using Microsoft.ML.OnnxRuntimeGenAI;

// The ONNX Runtime GenAI contestant of `onnxlora bench --generate`:
//   dotnet OnnxLora.GenAiBench.dll --model DIR --prompts FILE --new-tokens N [--adapter FILE]
// FILE holds the prompts as a JSON array of equal-length token id arrays (one per row of the batch). Greedy search with
// min_length = max_length, so no row stops at eos; one warm-up request (2 new tokens) first, then one timed request.
// Prints one JSON line: first_token_s (from the generator's creation to the first new token, prefill included),
// total_s, tokens_per_s (all rows' new tokens over total_s) and tokens (every row's new tokens).

try { return Run(args); }
catch (Exception e) when (e is OnnxRuntimeGenAIException or IOException or UnauthorizedAccessException or ArgumentException or InvalidOperationException)
{
    Console.Error.WriteLine($"error: {e.Message}");
    return 1;
}

static int Run(string[] args)
{
    string? modelDir = null, promptsFile = null, adapterFile = null;
    int newTokens = 0;
    for (int i = 0; i < args.Length; i++)
    {
        string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
        switch (args[i])
        {
            case "--model": modelDir = Next(); break;
            case "--prompts": promptsFile = Next(); break;
            case "--adapter": adapterFile = Next(); break;
            case "--new-tokens": newTokens = int.TryParse(Next(), out var n) && n >= 1 ? n : throw new ArgumentException($"--new-tokens must be an integer ≥ 1 (got '{args[i]}')"); break;
            default: Console.Error.WriteLine($"error: unknown argument '{args[i]}'"); return 2;
        }
    }
    if (modelDir is null || promptsFile is null || newTokens == 0)
    {
        Console.Error.WriteLine("usage: OnnxLora.GenAiBench --model DIR --prompts FILE --new-tokens N [--adapter FILE]");
        return 2;
    }
    int[][] prompts;
    try { prompts = JsonSerializer.Deserialize<int[][]>(File.ReadAllText(promptsFile)) ?? []; }
    catch (JsonException e) { Console.Error.WriteLine($"error: {promptsFile}: not a JSON array of token id arrays ({e.Message})"); return 1; }
    if (prompts.Length == 0 || prompts[0].Length == 0 || prompts.Any(p => p is null || p.Length != prompts[0].Length))
    {
        Console.Error.WriteLine($"error: {promptsFile}: needs at least one prompt, all non-empty and of the same length");
        return 1;
    }
    int batch = prompts.Length, promptLength = prompts[0].Length;
    int[] flat = prompts.SelectMany(p => p).ToArray();

    using var model = new Model(modelDir);
    using var adapters = new Adapters(model);
    if (adapterFile is not null) adapters.LoadAdapter(adapterFile, "bench");

    (double FirstS, double TotalS, int[][] Tokens) Generate(int count)
    {
        var clock = Stopwatch.StartNew();
        using var parameters = new GeneratorParams(model);
        parameters.SetSearchOption("batch_size", batch);
        parameters.SetSearchOption("max_length", promptLength + count);
        parameters.SetSearchOption("min_length", promptLength + count);   // never stop early at eos
        using var generator = new Generator(model, parameters);
        if (adapterFile is not null) generator.SetActiveAdapter(adapters, "bench");
        generator.AppendTokens(flat);   // [batch, prompt] row-major; runs the prefill
        generator.GenerateNextToken();
        double first = clock.Elapsed.TotalSeconds;
        while (!generator.IsDone()) generator.GenerateNextToken();
        double total = clock.Elapsed.TotalSeconds;
        var tokens = Enumerable.Range(0, batch).Select(row => generator.GetSequence((ulong)row).ToArray()[promptLength..]).ToArray();
        if (tokens.Any(t => t.Length != count)) throw new InvalidOperationException($"a row generated {tokens.Min(t => t.Length)} tokens, not {count}");
        return (first, total, tokens);
    }

    Generate(Math.Min(2, newTokens));   // warm-up: first-run allocations and kernels
    var (firstS, totalS, generated) = Generate(newTokens);
    Console.WriteLine(JsonSerializer.Serialize(new { first_token_s = firstS, total_s = totalS, tokens_per_s = batch * newTokens / totalS, tokens = generated }));
    return 0;
}
