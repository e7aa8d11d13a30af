using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using Onnx;
using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Graphs;
using OnnxLora.Pipeline.Runtime;

namespace OnnxLora.Pipeline.Training;

/// <summary>
/// Parameters, gradients and optimizer moments as OrtValues in the execution device's memory, two of each (current
/// and next) so that a step reads one set and writes the other, then swaps. On the CPU the values wrap pinned managed
/// arrays; on CUDA they are allocated by ORT's CUDA allocator and moved to and from the host through a one-node
/// Identity session, since device memory cannot be read from .NET directly. Owns every OrtValue it creates.
/// </summary>
sealed class DeviceBuffers : IDisposable
{
    sealed class Pair(long[] shape, OrtValue current, OrtValue next, float[]? hostCurrent, float[]? hostNext)
    {
        public long[] Shape { get; } = shape;
        public OrtValue Current = current, Next = next;
        public float[]? HostCurrent = hostCurrent, HostNext = hostNext;   // CPU only: the arrays behind the values

        public void Swap()
        {
            (Current, Next) = (Next, Current);
            (HostCurrent, HostNext) = (HostNext, HostCurrent);
        }
    }

    readonly Dictionary<string, Pair> _values = new(StringComparer.Ordinal);   // params and moments by name
    readonly Dictionary<string, Pair> _grads = new(StringComparer.Ordinal);    // by param name
    readonly List<string> _params = new();
    readonly ExecutionDevice _device;
    readonly OrtAllocator? _deviceAllocator;
    readonly OrtMemoryInfo? _deviceMemory;
    readonly InferenceSession? _copySession;
    readonly SessionOptions? _copyOptions;

    public DeviceBuffers(ArtifactsSpec spec, ExecutionDevice device, InferenceSession anySession)
    {
        _device = device;
        if (device.IsCuda)
        {
            _deviceMemory = device.DeviceMemoryInfo();
            _deviceAllocator = new OrtAllocator(anySession, _deviceMemory);
            _copyOptions = device.CreateSessionOptions(1);
            _copySession = new InferenceSession(IdentityModel(), _copyOptions);
        }
        foreach (var p in spec.Params)
        {
            _params.Add(p.Name);
            _values[p.Name] = NewPair(p.Shape);
            _grads[p.Name] = NewPair(p.Shape);
            foreach (var m in p.Moments) _values[m] = NewPair(p.Shape);
        }
        if (device.IsCuda)   // ORT's allocator does not zero memory; moments and gradients must start at 0
            foreach (var (name, pair) in _values.Concat(_grads.Select(kv => KeyValuePair.Create(kv.Key + "#grad", kv.Value))))
            {
                var zeros = new float[ElementCount(pair.Shape)];
                CopyToDevice(zeros, pair.Shape, pair.Current);
                CopyToDevice(zeros, pair.Shape, pair.Next);
            }
    }

    Pair NewPair(long[] shape)
    {
        if (!_device.IsCuda)
        {
            var a = new float[ElementCount(shape)];
            var b = new float[a.Length];
            return new Pair(shape, OrtValue.CreateTensorValueFromMemory(a, shape), OrtValue.CreateTensorValueFromMemory(b, shape), a, b);
        }
        return new Pair(shape,
            OrtValue.CreateAllocatedTensorValue(_deviceAllocator!, TensorElementType.Float, shape),
            OrtValue.CreateAllocatedTensorValue(_deviceAllocator!, TensorElementType.Float, shape), null, null);
    }

    public bool Has(string name) => _values.ContainsKey(name);
    public OrtValue Param(string name) => _values[name].Current;
    public OrtValue NextParam(string name) => _values[name].Next;
    public OrtValue Value(string name) => _values.TryGetValue(name, out var p) ? p.Current
        : throw new InvalidDataException($"the artifacts name a tensor '{name}' that is neither a parameter nor a moment; rebuild them");
    public OrtValue NextValue(string name) => _values[name].Next;
    public OrtValue Grad(string param) => _grads[param].Current;
    public OrtValue NextGrad(string param) => _grads[param].Next;

    public void SwapGrads() { foreach (var g in _grads.Values) g.Swap(); }
    public void SwapParamsAndMoments() { foreach (var v in _values.Values) v.Swap(); }

    /// <summary>Writes host values into the current buffer of a parameter or moment.</summary>
    public void Upload(string name, float[] data)
    {
        if (!_values.TryGetValue(name, out var pair)) throw new KeyNotFoundException($"'{name}' is not a trainable parameter or moment of these artifacts");
        if (data.Length != ElementCount(pair.Shape))
            throw new InvalidDataException($"'{name}' has {data.Length} values, the artifacts expect [{string.Join(", ", pair.Shape)}]");
        if (pair.HostCurrent is { } host) data.CopyTo(host, 0);
        else CopyToDevice(data, pair.Shape, pair.Current);
    }

    /// <summary>Copies the current parameters (and moments) to the host.</summary>
    public Dictionary<string, (long[] Shape, float[] Data)> Download(bool withMoments)
    {
        var result = new Dictionary<string, (long[], float[])>(StringComparer.Ordinal);
        var names = withMoments ? _values.Keys.ToList() : _params;
        foreach (var name in names)
        {
            var pair = _values[name];
            result[name] = (pair.Shape, pair.HostCurrent is { } host ? (float[])host.Clone() : CopyToHost(pair.Current));
        }
        return result;
    }

    /// <summary>Elements of all gradients together.</summary>
    public int GradLength => checked((int)_params.Sum(p => ElementCount(_grads[p].Shape)));

    /// <summary>Copies the current gradients to <paramref name="flat"/>, one parameter after another in the artifacts' order.</summary>
    public void DownloadGrads(Span<float> flat)
    {
        int offset = 0;
        foreach (var name in _params)
        {
            var pair = _grads[name];
            ReadOnlySpan<float> values = pair.HostCurrent ?? CopyToHost(pair.Current);
            values.CopyTo(flat[offset..]);
            offset += values.Length;
        }
    }

    /// <summary>Overwrites the current gradients from <paramref name="flat"/> (the layout of <see cref="DownloadGrads"/>).</summary>
    public void UploadGrads(ReadOnlySpan<float> flat)
    {
        int offset = 0;
        foreach (var name in _params)
        {
            var pair = _grads[name];
            int length = (int)ElementCount(pair.Shape);
            if (pair.HostCurrent is { } host) flat.Slice(offset, length).CopyTo(host);
            else CopyToDevice(flat.Slice(offset, length).ToArray(), pair.Shape, pair.Current);
            offset += length;
        }
    }

    void CopyToDevice(float[] data, long[] shape, OrtValue target)
    {
        using var source = OrtValue.CreateTensorValueFromMemory(data, shape);
        using var binding = _copySession!.CreateIoBinding();
        binding.BindInput("x", source);
        binding.BindOutput("y", target);
        using var run = new RunOptions();
        _copySession.RunWithBinding(run, binding);
        binding.SynchronizeBoundOutputs();
    }

    float[] CopyToHost(OrtValue source)
    {
        using var binding = _copySession!.CreateIoBinding();
        binding.BindInput("x", source);
        binding.BindOutputToDevice("y", OrtMemoryInfo.DefaultInstance);
        using var run = new RunOptions();
        _copySession.RunWithBinding(run, binding);
        using var outputs = binding.GetOutputValues();
        return outputs[0].GetTensorDataAsSpan<float>().ToArray();
    }

    static byte[] IdentityModel()
    {
        var model = new ModelProto { IrVersion = 8, ProducerName = "onnxlora", Graph = new GraphProto { Name = "copy" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(model);
        g.AddInput(ValueInfos.Tensor("x", (int)TensorProto.Types.DataType.Float, null));
        g.AddNode("Identity", ["x"], ["y"], "copy");
        g.AddOutput(ValueInfos.Tensor("y", (int)TensorProto.Types.DataType.Float, null));
        using var s = new MemoryStream();
        Google.Protobuf.MessageExtensions.WriteTo(model, s);
        return s.ToArray();
    }

    static long ElementCount(long[] shape) => shape.Aggregate(1L, (a, b) => a * b);

    public void Dispose()
    {
        foreach (var p in _values.Values.Concat(_grads.Values)) { p.Current.Dispose(); p.Next.Dispose(); }
        _copySession?.Dispose();
        _copyOptions?.Dispose();
        _deviceAllocator?.Dispose();
        _deviceMemory?.Dispose();
    }
}
