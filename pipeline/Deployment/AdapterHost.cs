using Microsoft.ML.OnnxRuntime;
using OnnxLora.GraphRewrite.Signature;
using OnnxLora.Pipeline.Adapters;
using OnnxLora.Pipeline.Runtime;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>Options for <see cref="AdapterHost.Create"/>.</summary>
public sealed class AdapterHostOptions
{
    /// <summary>CPU (default) or CUDA; CUDA that cannot load is an error, never a silent CPU fallback.</summary>
    public ExecutionDevice Device { get; init; } = ExecutionDevice.Cpu;

    /// <summary>Threads for one operator (0 = all cores).</summary>
    public int IntraOpThreads { get; init; }

    /// <summary>Roles for inputs the names do not tell (<c>--input-role</c>), on top of those the rewrite recorded in the model.</summary>
    public IReadOnlyDictionary<string, RoleOverride>? InputRoles { get; init; }
}

/// <summary>
/// Deployed inference with many LoRA adapters on one base: loads the deployable model once (one
/// <see cref="InferenceSession"/>), holds any number of named ONNX Runtime adapters (<see cref="OrtLoraAdapter"/>), and
/// runs each request with one adapter or none. Safe for concurrent <see cref="Run(string?, IReadOnlyDictionary{string, OrtValue}, IReadOnlyList{string}?)"/> calls; adapters can be added and
/// removed while requests are in flight.
/// </summary>
/// <remarks>
/// Ownership: the host owns its session, its CUDA allocator and every adapter it loaded; <see cref="Dispose"/> releases
/// them, and must be called only after every <c>Run</c> has returned. An adapter removed while a request uses it
/// is released when the last such request finishes (each request holds a reference). The caller owns the input values it
/// passes to <c>Run</c> and the outputs it gets back (dispose them).
/// The deployable model must declare each adapter parameter as a graph input with a same-named default initializer
/// (zero rank for LoRA factors), so that a request with no adapter runs the base model.
/// </remarks>
public sealed class AdapterHost : IDisposable
{
    readonly InferenceSession _session;
    readonly OrtAllocator? _deviceAllocator;     // CUDA only: adapters are copied to the GPU once, at load
    readonly OrtMemoryInfo? _deviceMemory;
    readonly Dictionary<string, Entry> _adapters = new(StringComparer.Ordinal);
    readonly object _gate = new();
    bool _disposed;

    AdapterHost(string modelPath, InferenceSession session, ExecutionDevice device, OrtMemoryInfo? memory, OrtAllocator? allocator,
                IReadOnlyDictionary<string, RoleOverride>? inputRoles)
    {
        ModelPath = modelPath;
        InputRoles = SignatureRoles.Merge(SignatureRoles.FromMetadata(session.ModelMetadata.CustomMetadataMap, modelPath), inputRoles);
        Device = device;
        _session = session;
        _deviceMemory = memory;
        _deviceAllocator = allocator;
        Slots = session.OverridableInitializerMetadata.ToDictionary(
            kv => kv.Key,
            kv => new ParameterSlot(kv.Key, (DataType)(int)kv.Value.ElementDataType, kv.Value.Dimensions.Select(d => d > 0 ? (long?)d : null).ToArray()),
            StringComparer.Ordinal);
    }

    /// <summary>Loads the deployable model at <paramref name="modelPath"/> once.</summary>
    public static AdapterHost Create(string modelPath, AdapterHostOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(modelPath);
        options ??= new AdapterHostOptions();
        if (!File.Exists(modelPath)) throw new FileNotFoundException($"{modelPath}: no such model (give the deployable model, deploy.onnx, that 'onnxlora rewrite' writes)", modelPath);
        // CUDA that cannot load throws CudaUnavailableException naming the missing library: no silent CPU fallback
        using var so = options.Device.CreateSessionOptions(options.IntraOpThreads);
        // every LoRA input has a same-named default initializer by design; ORT warns about each one at load
        so.LogSeverityLevel = OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR;
        InferenceSession session;
        try { session = new InferenceSession(modelPath, so); }
        catch (OnnxRuntimeException e) { throw new InvalidDataException($"{modelPath}: ONNX Runtime cannot load the model: {e.Message}", e); }
        OrtMemoryInfo? memory = null;
        OrtAllocator? allocator = null;
        try
        {
            if (options.Device.IsCuda)
            {
                memory = options.Device.DeviceMemoryInfo();
                allocator = new OrtAllocator(session, memory);
            }
            return new AdapterHost(modelPath, session, options.Device, memory, allocator, options.InputRoles);
        }
        catch
        {
            allocator?.Dispose();
            memory?.Dispose();
            session.Dispose();
            throw;
        }
    }

    public string ModelPath { get; }
    public ExecutionDevice Device { get; }

    /// <summary>The inputs a request feeds (not the adapter parameters).</summary>
    public IReadOnlyDictionary<string, NodeMetadata> Inputs => _session.InputMetadata;
    public IReadOnlyDictionary<string, NodeMetadata> Outputs => _session.OutputMetadata;

    /// <summary>Input roles given by name: those recorded in the model's metadata by the rewrite, then the host's options.</summary>
    public IReadOnlyDictionary<string, RoleOverride> InputRoles { get; }

    /// <summary>The model's metadata_props (e.g. the builder's "onnxlora.gpt_config").</summary>
    public IReadOnlyDictionary<string, string> ModelMetadata => _session.ModelMetadata.CustomMetadataMap;

    /// <summary>The inputs an adapter may feed (LoRA factors with defaults, heads), with their types and dims.</summary>
    public IReadOnlyDictionary<string, ParameterSlot> Slots { get; }

    /// <summary>Names of the adapters loaded now.</summary>
    public IReadOnlyList<string> AdapterNames { get { lock (_gate) return _adapters.Keys.Order(StringComparer.Ordinal).ToList(); } }

    /// <summary>Loads an <c>.onnx_adapter</c> file under <paramref name="name"/>; see <see cref="AddAdapter(string, byte[], string?, bool)"/>.</summary>
    public void AddAdapter(string name, string path, bool replace = false)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such adapter file (adapter '{name}')", path);
        AddAdapter(name, File.ReadAllBytes(path), path, replace);
    }

    /// <summary>
    /// Loads adapter bytes under <paramref name="name"/>, after checking the header and every parameter's name, type and
    /// shape against the model. A bad adapter throws <see cref="InvalidDataException"/> and changes nothing: the host
    /// keeps serving the adapters it has. An existing name is an error unless <paramref name="replace"/>.
    /// </summary>
    public void AddAdapter(string name, byte[] bytes, string? source = null, bool replace = false)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(name);
        ArgumentNullException.ThrowIfNull(bytes);
        source ??= $"adapter '{name}'";
        var contents = OnnxAdapterFile.Parse(bytes, source);
        AdapterValidation.Validate(contents.Parameters, Slots, source, ModelPath);
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (!replace && _adapters.ContainsKey(name)) throw new InvalidOperationException($"adapter '{name}' is already loaded; remove it first or pass replace");
        }
        OrtLoraAdapter adapter;
        // a CPU allocator makes ORT throw: on the CPU the parameters stay in the adapter's own buffer
        try { adapter = OrtLoraAdapter.Create(bytes, _deviceAllocator); }
        catch (OnnxRuntimeException e) { throw new InvalidDataException($"{source}: ONNX Runtime cannot load the adapter: {e.Message}", e); }
        var entry = new Entry(name, adapter, contents.Parameters.Count);
        lock (_gate)
        {
            if (_disposed) { adapter.Dispose(); ObjectDisposedException.ThrowIf(true, this); }
            if (_adapters.TryGetValue(name, out var old))
            {
                if (!replace) { adapter.Dispose(); throw new InvalidOperationException($"adapter '{name}' is already loaded; remove it first or pass replace"); }
                old.Retire();
            }
            _adapters[name] = entry;
        }
    }

    /// <summary>Unloads an adapter; requests already running with it finish with it. False when no such adapter.</summary>
    public bool RemoveAdapter(string name)
    {
        lock (_gate)
        {
            if (!_adapters.Remove(name, out var entry)) return false;
            entry.Retire();
            return true;
        }
    }

    /// <summary>
    /// Runs one request with adapter <paramref name="adapterName"/> active, or the base model when null. Uses a fresh
    /// <see cref="RunOptions"/> per request and plain <c>Run</c> (IOBinding would ignore the adapter).
    /// </summary>
    /// <param name="inputs">the request's inputs by name (owned by the caller)</param>
    /// <param name="outputNames">outputs to fetch; null = all</param>
    /// <returns>The outputs in <paramref name="outputNames"/> order, owned by the caller.</returns>
    public IDisposableReadOnlyCollection<OrtValue> Run(string? adapterName, IReadOnlyDictionary<string, OrtValue> inputs, IReadOnlyList<string>? outputNames = null)
    {
        using var lease = Lease(adapterName);
        return lease.Run(inputs, outputNames);
    }

    /// <summary>
    /// Holds adapter <paramref name="adapterName"/> (null = the base model) for a request of several runs, such as a
    /// generation with a KV cache: every run through the lease uses that adapter, even if it is replaced or removed
    /// meanwhile (it is freed when the last lease ends). Dispose the lease when the request ends.
    /// </summary>
    public AdapterLease Lease(string? adapterName)
    {
        if (adapterName is null) return new AdapterLease(this, null);
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (!_adapters.TryGetValue(adapterName, out var entry))
                throw new KeyNotFoundException($"no adapter '{adapterName}' is loaded (loaded: {(_adapters.Count == 0 ? "none" : string.Join(", ", _adapters.Keys.Order()))})");
            entry.Acquire();
            return new AdapterLease(this, entry);
        }
    }

    IDisposableReadOnlyCollection<OrtValue> Run(AdapterLease lease, IReadOnlyDictionary<string, OrtValue> inputs, IReadOnlyList<string>? outputNames)
    {
        ArgumentNullException.ThrowIfNull(inputs);
        ObjectDisposedException.ThrowIf(lease.Ended, lease);
        outputNames ??= _session.OutputNames;
        try
        {
            using var runOptions = new RunOptions();
            if (lease.Entry is { } entry) runOptions.AddActiveLoraAdapter(entry.Adapter);
            return _session.Run(runOptions, inputs.Keys.ToList(), inputs.Values.ToList(), outputNames);
        }
        catch (OnnxRuntimeException e)
        {
            throw new InvalidOperationException($"{ModelPath}: run{(lease.Entry is null ? "" : $" with adapter '{lease.Entry.Name}'")} failed: {e.Message}", e);
        }
    }

    /// <summary>A request's hold on one adapter (or on the base model); from <see cref="Lease"/>.</summary>
    public sealed class AdapterLease : IDisposable
    {
        internal AdapterLease(AdapterHost host, Entry? entry) { Host = host; Entry = entry; }
        internal AdapterHost Host { get; }
        internal Entry? Entry { get; }
        internal bool Ended { get; private set; }

        /// <summary>The adapter's name; null for the base model.</summary>
        public string? AdapterName => Entry?.Name;

        /// <summary>Runs with the lease's adapter; see <see cref="AdapterHost.Run(string?, IReadOnlyDictionary{string, OrtValue}, IReadOnlyList{string}?)"/>.</summary>
        public IDisposableReadOnlyCollection<OrtValue> Run(IReadOnlyDictionary<string, OrtValue> inputs, IReadOnlyList<string>? outputNames = null) =>
            Host.Run(this, inputs, outputNames);

        public void Dispose()
        {
            if (Ended) return;
            Ended = true;
            if (Entry is not null) lock (Host._gate) Entry.Release();
        }
    }

    /// <summary>Releases the session, the allocator and every adapter. Call after all requests have returned.</summary>
    public void Dispose()
    {
        lock (_gate)
        {
            if (_disposed) return;
            _disposed = true;
            foreach (var e in _adapters.Values) e.Retire();
            _adapters.Clear();
        }
        _session.Dispose();
        _deviceAllocator?.Dispose();
        _deviceMemory?.Dispose();
    }

    /// <summary>A loaded adapter and the number of requests using it; all members are called under the host's lock.</summary>
    internal sealed class Entry(string name, OrtLoraAdapter adapter, int parameterCount)
    {
        int _inUse;
        bool _retired;
        public string Name { get; } = name;
        public int ParameterCount { get; } = parameterCount;
        public OrtLoraAdapter Adapter { get; } = adapter;

        public void Acquire() => _inUse++;

        public void Release()
        {
            if (--_inUse == 0 && _retired) Adapter.Dispose();
        }

        /// <summary>No new requests; released now or when the last running request ends.</summary>
        public void Retire()
        {
            _retired = true;
            if (_inUse == 0) Adapter.Dispose();
        }
    }
}
