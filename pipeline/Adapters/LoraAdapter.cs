using OnnxLora.GraphRewrite.Artifacts;
using OnnxLora.GraphRewrite.Lora;
using OnnxLora.GraphRewrite.Graphs;

namespace OnnxLora.Pipeline.Adapters;

/// <summary>A float32 tensor held in memory: row-major values and their shape.</summary>
public sealed record AdapterTensor(long[] Shape, float[] Data)
{
    public long ElementCount => Tensors.ElementCount(Shape) ?? throw new InvalidDataException($"shape {ShapeText} is negative or overflows int64");

    public static AdapterTensor Zeros(params long[] shape) => new(shape, new float[checked((int)shape.Aggregate(1L, (a, b) => a * b))]);

    public string ShapeText => $"[{string.Join(", ", Shape)}]";

    /// <summary>The 2-D transpose ([rows, cols] → [cols, rows]), as PEFT stores A and B.</summary>
    public AdapterTensor Transpose2D()
    {
        if (Shape.Length != 2) throw new InvalidOperationException($"transpose needs a 2-D tensor, got {ShapeText}");
        int rows = (int)Shape[0], cols = (int)Shape[1];
        var t = new float[Data.Length];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                t[c * rows + r] = Data[r * cols + c];
        return new AdapterTensor([cols, rows], t);
    }

    /// <summary>A copy with every value multiplied by <paramref name="factor"/>.</summary>
    public AdapterTensor Scaled(double factor) => factor == 1.0 ? this : new(Shape, Array.ConvertAll(Data, v => (float)(v * factor)));
}

/// <summary>
/// A LoRA adapter in memory: the <see cref="LoraManifest"/> that says which modules it adapts, the trained A [in, r]
/// and B [r, out] of every target (unscaled, as trained: the branch is <c>scale · (x·A)·B</c> with the target's
/// scale), and optional fully trained extra tensors (e.g. a classification head) under their model names.
/// Every tensor's name and shape is checked against the manifest on construction.
/// </summary>
public sealed class LoraAdapter
{
    readonly Dictionary<string, AdapterTensor> _lora;
    readonly Dictionary<string, AdapterTensor> _extras;

    LoraAdapter(LoraManifest manifest, Dictionary<string, AdapterTensor> lora, Dictionary<string, AdapterTensor> extras, ClassifierInfo? classifier)
    {
        Manifest = manifest;
        _lora = lora;
        _extras = extras;
        Classifier = classifier;
    }

    public LoraManifest Manifest { get; }

    /// <summary>A classifier's class count, pooling and label names (with a <see cref="ClassHead.Weight"/> extra); null for an LM adapter.</summary>
    public ClassifierInfo? Classifier { get; }

    /// <summary>The classification head [d, classes], when the adapter has one.</summary>
    public AdapterTensor? Head => _extras.GetValueOrDefault(ClassHead.Weight);

    /// <summary>A and B of every target, by the manifest's <see cref="LoraTarget.LoraA"/>/<see cref="LoraTarget.LoraB"/> names; unscaled.</summary>
    public IReadOnlyDictionary<string, AdapterTensor> LoraTensors => _lora;

    /// <summary>Fully trained tensors that are not LoRA factors (e.g. a task head), by their name in the model.</summary>
    public IReadOnlyDictionary<string, AdapterTensor> Extras => _extras;

    /// <summary>A of a target: [in, r].</summary>
    public AdapterTensor A(LoraTarget target) => _lora[target.LoraA];

    /// <summary>B of a target: [r, out], unscaled.</summary>
    public AdapterTensor B(LoraTarget target) => _lora[target.LoraB];

    /// <summary>
    /// Makes an adapter from the manifest and tensors keyed by the manifest's A/B names (every target needs both,
    /// with shapes [in, r] and [r, out]). <paramref name="extras"/> are kept under their own names.
    /// </summary>
    /// <param name="source">Names the origin (a file) in error messages.</param>
    public static LoraAdapter Create(LoraManifest manifest, IReadOnlyDictionary<string, AdapterTensor> loraTensors,
        IReadOnlyDictionary<string, AdapterTensor>? extras = null, string source = "adapter", ClassifierInfo? classifier = null)
    {
        ArgumentNullException.ThrowIfNull(manifest);
        ArgumentNullException.ThrowIfNull(loraTensors);
        var lora = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
        foreach (var t in manifest.Targets)
        {
            lora[t.LoraA] = Expect(source, loraTensors, t.LoraA, [t.In, t.Rank], t.Module);
            lora[t.LoraB] = Expect(source, loraTensors, t.LoraB, [t.Rank, t.Out], t.Module);
        }
        var unknown = loraTensors.Keys.Where(k => !lora.ContainsKey(k)).ToList();
        if (unknown.Count > 0)
            throw new InvalidDataException($"{source}: {unknown.Count} LoRA tensor(s) not in the manifest ({Preview(unknown)}); " +
                $"the manifest '{manifest.BaseModel}' has {manifest.Targets.Count} targets. Was the adapter trained for another rewrite?");
        var extraCopy = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
        foreach (var (name, tensor) in extras ?? new Dictionary<string, AdapterTensor>())
        {
            if (lora.ContainsKey(name)) throw new InvalidDataException($"{source}: extra tensor '{name}' has the name of a LoRA factor");
            CheckData(source, name, tensor);
            extraCopy[name] = tensor;
        }
        if (extraCopy.TryGetValue(ClassHead.Weight, out var head))
        {
            if (head.Shape.Length != 2) throw new InvalidDataException($"{source}: the head '{ClassHead.Weight}' is {head.ShapeText}; expected [d, classes]");
            int classes = checked((int)head.Shape[1]);
            if (classifier is not null && classifier.Classes != classes)
                throw new InvalidDataException($"{source}: the metadata says {classifier.Classes} classes, the head '{ClassHead.Weight}' is {head.ShapeText}");
            if (classifier?.Labels is { } labels && labels.Count != classes)
                throw new InvalidDataException($"{source}: {labels.Count} label names ({string.Join(", ", labels)}) for a {classes}-class head");
            classifier ??= new ClassifierInfo { Classes = classes, Pooling = Pooling.Last };
        }
        else classifier = null;
        return new LoraAdapter(manifest, lora, extraCopy, classifier);
    }

    /// <summary>
    /// An adapter with random A and B (uniform in ±<paramref name="amplitude"/>, seeded): B is not zero, so the
    /// adapter changes the model's outputs. For tests and smoke checks; training starts from B = 0 instead.
    /// </summary>
    public static LoraAdapter CreateRandom(LoraManifest manifest, int seed, double amplitude = 0.1)
    {
        var rng = new Random(seed);
        var tensors = new Dictionary<string, AdapterTensor>();
        foreach (var t in manifest.Targets)
        {
            tensors[t.LoraA] = Random(rng, amplitude, t.In, t.Rank);
            tensors[t.LoraB] = Random(rng, amplitude, t.Rank, t.Out);
        }
        return Create(manifest, tensors);

        static AdapterTensor Random(Random rng, double amplitude, params long[] shape)
        {
            var x = AdapterTensor.Zeros(shape);
            for (int i = 0; i < x.Data.Length; i++) x.Data[i] = (float)((rng.NextDouble() * 2 - 1) * amplitude);
            return x;
        }
    }

    static AdapterTensor Expect(string source, IReadOnlyDictionary<string, AdapterTensor> tensors, string name, long[] shape, string module)
    {
        if (!tensors.TryGetValue(name, out var t))
            throw new InvalidDataException($"{source}: missing tensor '{name}' for module '{module}'");
        CheckData(source, name, t);
        if (!t.Shape.SequenceEqual(shape))
            throw new InvalidDataException($"{source}: tensor '{name}' of module '{module}' has shape {t.ShapeText}, the manifest needs [{string.Join(", ", shape)}]");
        return t;
    }

    static void CheckData(string source, string name, AdapterTensor t)
    {
        if (Tensors.ElementCount(t.Shape) != t.Data.Length)
            throw new InvalidDataException($"{source}: tensor '{name}' has shape {t.ShapeText} but {t.Data.Length} values");
        // a NaN or infinity in an adapter poisons every output it touches; refuse it where it enters
        int bad = Array.FindIndex(t.Data, v => !float.IsFinite(v));
        if (bad >= 0) throw new InvalidDataException($"{source}: tensor '{name}' holds {t.Data[bad]} at index {bad}; adapter values must be finite");
    }

    internal static string Preview(IReadOnlyList<string> names) =>
        string.Join(", ", names.Take(5).Select(n => $"'{n}'")) + (names.Count > 5 ? $", … {names.Count - 5} more" : "");
}
