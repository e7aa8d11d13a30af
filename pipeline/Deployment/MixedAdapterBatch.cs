using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Pipeline.Adapters;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>
/// One run over rows that use different adapters (Punica / S-LoRA style): builds the mixed model of a rewrite
/// (<see cref="BuildMixedDeployable"/>) in memory, stacks the adapters' A and scale·B once (slot 0 = the base model,
/// slot i = adapter i, smaller ranks zero-padded), and feeds each row's slot as <c>adapter_index</c>. Every row gets
/// what <see cref="AdapterHost"/> gives it with its adapter alone, up to float32 summation order.
/// </summary>
/// <remarks>
/// The adapter set is fixed at creation (restacking is a new instance). The stacks live in host memory and are fed on
/// every run; on CUDA ORT copies them per run. Adapters must be LoRA-only (no task head) and adapt modules of this rewrite;
/// a module an adapter does not adapt gets zeros in its slot. Not wired into <see cref="GenerationScheduler"/>.
/// Safe for concurrent <see cref="Run(IReadOnlyList{string?}, IReadOnlyDictionary{string, OrtValue}, IReadOnlyList{string}?)"/> calls.
/// Ownership: the batch owns its session and the stacked values (<see cref="Dispose"/>, after every run has returned);
/// the caller owns the inputs it passes and the outputs it gets back.
/// </remarks>
public sealed class MixedAdapterBatch : IDisposable
{
    readonly InferenceSession _session;
    readonly Dictionary<string, int> _slotOf;
    readonly List<(string Name, OrtValue Value)> _stacks;
    readonly string? _inputIds;

    MixedAdapterBatch(string source, InferenceSession session, Dictionary<string, int> slotOf, List<(string, OrtValue)> stacks, string? inputIds)
    {
        Source = source;
        _session = session;
        _slotOf = slotOf;
        _stacks = stacks;
        _inputIds = inputIds;
    }

    /// <summary>The deployable model the mixed model was built from.</summary>
    public string Source { get; }

    /// <summary>Adapter names by slot: slot 0 is the base model (null), then the adapters in the order given.</summary>
    public IReadOnlyList<string?> AdapterSlots => [null, .. _slotOf.OrderBy(kv => kv.Value).Select(kv => kv.Key)];

    /// <summary>The inputs a run feeds besides the stacks (adapter_index among them; Run fills it).</summary>
    public IReadOnlyDictionary<string, NodeMetadata> Inputs => _session.InputMetadata;

    public IReadOnlyDictionary<string, NodeMetadata> Outputs => _session.OutputMetadata;

    /// <summary>Reads each adapter file (<see cref="AdapterFiles.Read"/>) against the rewrite in <paramref name="rewriteDir"/>.</summary>
    public static MixedAdapterBatch Load(string rewriteDir, IReadOnlyList<KeyValuePair<string, string>> adapterFiles, AdapterHostOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(adapterFiles);
        var manifest = LoraManifest.Load(Path.Combine(rewriteDir, RunLayout.LoraConfig));
        return Create(rewriteDir, adapterFiles.Select(kv => KeyValuePair.Create(kv.Key, AdapterFiles.Read(kv.Value, manifest))).ToList(), options);
    }

    /// <summary>
    /// Builds the mixed model from <paramref name="rewriteDir"/>'s deploy.onnx and lora_config.json and stacks
    /// <paramref name="adapters"/> (by name; each may come from a rewrite of another rank with the same targets).
    /// </summary>
    public static MixedAdapterBatch Create(string rewriteDir, IReadOnlyList<KeyValuePair<string, LoraAdapter>> adapters, AdapterHostOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(rewriteDir);
        ArgumentNullException.ThrowIfNull(adapters);
        options ??= new AdapterHostOptions();
        var deployPath = Path.Combine(rewriteDir, RunLayout.DeployableModel);
        var manifest = LoraManifest.Load(Path.Combine(rewriteDir, RunLayout.LoraConfig));
        var deploy = OnnxFile.Load(deployPath);
        var mixed = BuildMixedDeployable.Run(deploy, manifest, deployPath);
        ModelValidator.Check(mixed, deployPath + " (mixed)");
        // asked of the deployable model: the mixed one always has an integer input, adapter_index
        string? inputIds = SignatureRoles.TakesTokens(deploy) ? SignatureRoles.Decide(mixed, options.InputRoles, deployPath).InputIds : null;

        var slotOf = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var (name, adapter) in adapters)
        {
            ArgumentException.ThrowIfNullOrWhiteSpace(name);
            if (!slotOf.TryAdd(name, slotOf.Count + 1)) throw new ArgumentException($"adapter '{name}' is given twice");
            if (adapter.Extras.Count > 0)
                throw new NotSupportedException($"adapter '{name}' has tensors besides LoRA factors ({string.Join(", ", adapter.Extras.Keys)}); mixed batching serves LoRA-only adapters");
            var known = manifest.Targets.ToDictionary(t => t.LoraA, StringComparer.Ordinal);
            foreach (var t in adapter.Manifest.Targets)
                if (!known.TryGetValue(t.LoraA, out var m) || m.LoraB != t.LoraB || m.In != t.In || m.Out != t.Out)
                    throw new InvalidDataException($"adapter '{name}': module '{t.Module}' ('{t.LoraA}' [{t.In}, r], '{t.LoraB}' [r, {t.Out}]) is not a target of {deployPath}");
        }

        var stacks = new List<(string, OrtValue)>();
        InferenceSession? session = null;
        try
        {
            foreach (var t in manifest.Targets)
            {
                var (a, b) = Stack(t, adapters);
                stacks.Add((BuildMixedDeployable.StackName(t.LoraA), OrtValue.CreateTensorValueFromMemory(a.Data, a.Shape)));
                stacks.Add((BuildMixedDeployable.StackName(t.LoraB), OrtValue.CreateTensorValueFromMemory(b.Data, b.Shape)));
            }
            using var so = options.Device.CreateSessionOptions(options.IntraOpThreads);
            so.LogSeverityLevel = OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR;   // the stacks are inputs with defaults by design
            try { session = new InferenceSession(mixed.ToByteArray(), so); }
            catch (OnnxRuntimeException e) { throw new InvalidDataException($"{deployPath}: ONNX Runtime cannot load the mixed model: {e.Message}", e); }
            return new MixedAdapterBatch(deployPath, session, slotOf, stacks, inputIds);
        }
        catch
        {
            session?.Dispose();
            foreach (var (_, v) in stacks) v.Dispose();
            throw;
        }
    }

    // A [slots, in, r_max] and scale·B [slots, r_max, out] of one target; slot 0 and adapters without the target stay zero.
    static (AdapterTensor A, AdapterTensor B) Stack(LoraTarget target, IReadOnlyList<KeyValuePair<string, LoraAdapter>> adapters)
    {
        var own = adapters.Select(kv => kv.Value.Manifest.Targets.FirstOrDefault(t => t.LoraA == target.LoraA)).ToList();
        int rMax = own.Select(t => t?.Rank ?? 0).DefaultIfEmpty(0).Max();
        long slots = adapters.Count + 1, inDim = target.In, outDim = target.Out;
        var a = AdapterTensor.Zeros(slots, inDim, rMax);
        var b = AdapterTensor.Zeros(slots, rMax, outDim);
        for (int s = 1; s < slots; s++)
        {
            if (own[s - 1] is not { } t) continue;
            var adapter = adapters[s - 1].Value;
            var sa = adapter.A(t).Data;                       // [in, r]
            var sb = adapter.B(t).Scaled(t.Scale).Data;       // [r, out]: the adapter's own scale folded in
            int r = t.Rank;
            for (long i = 0; i < inDim; i++)
                Array.Copy(sa, i * r, a.Data, (s * inDim + i) * rMax, r);
            Array.Copy(sb, 0, b.Data, s * rMax * outDim, (long)r * outDim);
        }
        return (a, b);
    }

    /// <summary>
    /// Runs rows with adapters <paramref name="rowAdapters"/> (one per batch row; null = the base model). An unknown name
    /// is an error naming it.
    /// </summary>
    /// <param name="inputs">the model's inputs except adapter_index and the stacks (owned by the caller)</param>
    /// <returns>The outputs in <paramref name="outputNames"/> order (all when null), owned by the caller.</returns>
    public IDisposableReadOnlyCollection<OrtValue> Run(IReadOnlyList<string?> rowAdapters, IReadOnlyDictionary<string, OrtValue> inputs, IReadOnlyList<string>? outputNames = null)
    {
        ArgumentNullException.ThrowIfNull(rowAdapters);
        var slots = new long[rowAdapters.Count];
        for (int r = 0; r < slots.Length; r++)
        {
            if (rowAdapters[r] is not { } name) continue;
            if (!_slotOf.TryGetValue(name, out var s))
                throw new KeyNotFoundException($"row {r}: no adapter '{name}' in this mixed batch (stacked: {(_slotOf.Count == 0 ? "none" : string.Join(", ", _slotOf.Keys))})");
            slots[r] = s;
        }
        return RunSlots(slots, inputs, outputNames);
    }

    /// <summary>Runs with each row's slot given directly (0 = base, i = <see cref="AdapterSlots"/>[i]); checked against the slot count.</summary>
    public IDisposableReadOnlyCollection<OrtValue> RunSlots(IReadOnlyList<long> slots, IReadOnlyDictionary<string, OrtValue> inputs, IReadOnlyList<string>? outputNames = null)
    {
        ArgumentNullException.ThrowIfNull(slots);
        ArgumentNullException.ThrowIfNull(inputs);
        const string index = BuildMixedDeployable.AdapterIndexInput;
        if (inputs.ContainsKey(index)) throw new ArgumentException($"input '{index}' is filled from the row adapters; do not pass it");
        for (int r = 0; r < slots.Count; r++)
            if (slots[r] < 0 || slots[r] > _slotOf.Count)
                throw new ArgumentOutOfRangeException(nameof(slots), $"input '{index}': row {r} has slot {slots[r]}; slots are 0 (base) to {_slotOf.Count}");
        // a shorter index would still reshape and mix rows: the batch must match the token rows
        if (_inputIds is not null && inputs.TryGetValue(_inputIds, out var ids) && ids.GetTensorTypeAndShape().Shape is [var rows, ..] && rows != slots.Count)
            throw new ArgumentException($"input '{index}': {slots.Count} row adapter(s) for a batch of {rows} rows ('{_inputIds}')");
        using var indexValue = OrtValue.CreateTensorValueFromMemory(slots.ToArray(), [slots.Count]);
        var names = new List<string>(inputs.Keys) { index };
        var values = new List<OrtValue>(inputs.Values) { indexValue };
        foreach (var (name, value) in _stacks) { names.Add(name); values.Add(value); }
        try
        {
            using var runOptions = new RunOptions();
            return _session.Run(runOptions, names, values, outputNames ?? _session.OutputNames);
        }
        catch (OnnxRuntimeException e)
        {
            throw new InvalidOperationException($"{Source} (mixed): run failed: {e.Message}", e);
        }
    }

    public void Dispose()
    {
        _session.Dispose();
        foreach (var (_, v) in _stacks) v.Dispose();
    }
}
