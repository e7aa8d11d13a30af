using System.Runtime.InteropServices;
using Google.Protobuf;
using Onnx;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.GraphRewrite.Graphs;

/// <summary>Builds and reads <see cref="TensorProto"/> values. Writers always use little-endian raw_data.</summary>
public static class Tensors
{
    public static TensorProto Float(string name, long[] dims, ReadOnlySpan<float> data) => Raw(name, DataType.Float, dims, MemoryMarshal.AsBytes(data));
    public static TensorProto Double(string name, long[] dims, ReadOnlySpan<double> data) => Raw(name, DataType.Double, dims, MemoryMarshal.AsBytes(data));
    public static TensorProto Int64(string name, long[] dims, ReadOnlySpan<long> data) => Raw(name, DataType.Int64, dims, MemoryMarshal.AsBytes(data));
    public static TensorProto Int32(string name, long[] dims, ReadOnlySpan<int> data) => Raw(name, DataType.Int32, dims, MemoryMarshal.AsBytes(data));
    public static TensorProto Bool(string name, long[] dims, ReadOnlySpan<bool> data) => Raw(name, DataType.Bool, dims, MemoryMarshal.AsBytes(data));

    /// <summary>A 1-D int64 tensor, the usual form of shape/axes constants.</summary>
    public static TensorProto Int64Vector(string name, params long[] values) => Int64(name, [values.Length], values);

    /// <summary>A scalar of the given element type (float, double, float16, bfloat16 or int64).</summary>
    public static TensorProto Scalar(string name, DataType type, double value) => type switch
    {
        DataType.Float => Float(name, [], [(float)value]),
        DataType.Double => Double(name, [], [value]),
        DataType.Float16 => Raw(name, type, [], MemoryMarshal.AsBytes<Half>([(Half)value])),
        DataType.Bfloat16 => Raw(name, type, [], MemoryMarshal.AsBytes<ushort>([ToBFloat16((float)value)])),
        DataType.Int64 => Int64(name, [], [(long)value]),
        DataType.Int32 => Int32(name, [], [(int)value]),
        _ => throw new NotSupportedException($"scalar of type {type} for '{name}'"),
    };

    public static TensorProto Raw(string name, DataType type, long[] dims, ReadOnlySpan<byte> bytes)
    {
        var t = new TensorProto { Name = name, DataType = (int)type, RawData = ByteString.CopyFrom(bytes) };
        t.Dims.AddRange(dims);
        return t;
    }

    /// <summary>The tensor's element count; throws <see cref="OnnxFormatException"/> naming it for a negative dim or a product past int64.</summary>
    public static long ElementCount(TensorProto t) =>
        ElementCount(t.Dims) ?? throw new OnnxFormatException($"tensor '{t.Name}': dims [{string.Join(", ", t.Dims)}] are negative or their product overflows int64");

    /// <summary>
    /// The product of <paramref name="dims"/> in checked arithmetic, or null when a dim is negative or the product passes
    /// int64 (so [2^62, 4] is refused, not wrapped to 0). Every reader's shape check goes through this one function.
    /// </summary>
    public static long? ElementCount(IEnumerable<long> dims)
    {
        long n = 1;
        foreach (var d in dims)
        {
            if (d < 0) return null;
            try { n = checked(n * d); }
            catch (OverflowException) { return null; }
        }
        return n;
    }

    /// <summary><see cref="ElementCount(IEnumerable{long})"/> × <paramref name="elementSize"/>, or null on a negative dim or overflow.</summary>
    public static long? ByteCount(IEnumerable<long> dims, int elementSize)
    {
        if (ElementCount(dims) is not { } n) return null;
        try { return checked(n * elementSize); }
        catch (OverflowException) { return null; }
    }

    public static int ElementSize(DataType type) => type switch
    {
        DataType.Float or DataType.Int32 or DataType.Uint32 => 4,
        DataType.Double or DataType.Int64 or DataType.Uint64 or DataType.Complex64 => 8,
        DataType.Float16 or DataType.Bfloat16 or DataType.Int16 or DataType.Uint16 => 2,
        DataType.Int8 or DataType.Uint8 or DataType.Bool or DataType.Float8E4M3Fn or DataType.Float8E5M2 => 1,
        DataType.Complex128 => 16,
        _ => throw new NotSupportedException($"element size of {type}"),
    };

    public static long ByteSize(TensorProto t) => t.RawData.Length > 0 ? t.RawData.Length
        : ByteCount(t.Dims, ElementSize((DataType)t.DataType)) ?? throw new OnnxFormatException($"tensor '{t.Name}': dims [{string.Join(", ", t.Dims)}] are negative or too large");

    /// <summary>Reads a float-like tensor (float, double, float16, bfloat16) as float32.</summary>
    public static float[] ToFloats(TensorProto t) => Array.ConvertAll(ToDoubles(t), d => (float)d);

    /// <summary>Reads any numeric tensor as float64, whichever field holds the data.</summary>
    public static double[] ToDoubles(TensorProto t)
    {
        var type = (DataType)t.DataType;
        var raw = t.RawData.Span;
        if (raw.Length > 0)
        {
            long? need = ByteCount(t.Dims, ElementSize(type));
            if (raw.Length != need)
                throw new OnnxFormatException($"tensor '{t.Name}': raw_data has {raw.Length} bytes, dims [{string.Join(", ", t.Dims)}] of {type} need {need?.ToString() ?? "more than int64 can count"}");
            return type switch
            {
                DataType.Float => Array.ConvertAll(MemoryMarshal.Cast<byte, float>(raw).ToArray(), x => (double)x),
                DataType.Double => MemoryMarshal.Cast<byte, double>(raw).ToArray(),
                DataType.Float16 => Array.ConvertAll(MemoryMarshal.Cast<byte, Half>(raw).ToArray(), x => (double)x),
                DataType.Bfloat16 => Array.ConvertAll(MemoryMarshal.Cast<byte, ushort>(raw).ToArray(), x => (double)FromBFloat16(x)),
                DataType.Int64 => Array.ConvertAll(MemoryMarshal.Cast<byte, long>(raw).ToArray(), x => (double)x),
                DataType.Int32 => Array.ConvertAll(MemoryMarshal.Cast<byte, int>(raw).ToArray(), x => (double)x),
                DataType.Int8 => Array.ConvertAll(MemoryMarshal.Cast<byte, sbyte>(raw).ToArray(), x => (double)x),
                DataType.Uint8 or DataType.Bool => Array.ConvertAll(raw.ToArray(), x => (double)x),
                _ => throw new NotSupportedException($"tensor '{t.Name}' of type {type}"),
            };
        }
        return type switch
        {
            DataType.Float => t.FloatData.Select(x => (double)x).ToArray(),
            DataType.Double => t.DoubleData.ToArray(),
            DataType.Int64 => t.Int64Data.Select(x => (double)x).ToArray(),
            DataType.Int32 or DataType.Int8 or DataType.Uint8 or DataType.Bool or DataType.Int16 or DataType.Uint16 => t.Int32Data.Select(x => (double)x).ToArray(),
            DataType.Float16 => t.Int32Data.Select(x => (double)BitConverter.UInt16BitsToHalf((ushort)x)).ToArray(),
            DataType.Bfloat16 => t.Int32Data.Select(x => (double)FromBFloat16((ushort)x)).ToArray(),
            _ => throw new NotSupportedException($"tensor '{t.Name}' of type {type}"),
        };
    }

    /// <summary>Reads an integer tensor (int64/int32) as int64.</summary>
    public static long[] ToInt64s(TensorProto t)
    {
        var type = (DataType)t.DataType;
        var raw = t.RawData.Span;
        if (type == DataType.Int64) return raw.Length > 0 ? MemoryMarshal.Cast<byte, long>(raw).ToArray() : t.Int64Data.ToArray();
        if (type == DataType.Int32) return raw.Length > 0 ? Array.ConvertAll(MemoryMarshal.Cast<byte, int>(raw).ToArray(), x => (long)x) : t.Int32Data.Select(x => (long)x).ToArray();
        return Array.ConvertAll(ToDoubles(t), x => (long)x);
    }

    /// <summary>Writes float64 values into a tensor of the given float-like type (rounding to it).</summary>
    public static TensorProto FromDoubles(string name, DataType type, long[] dims, double[] values) => type switch
    {
        DataType.Float => Float(name, dims, Array.ConvertAll(values, v => (float)v)),
        DataType.Double => Double(name, dims, values),
        DataType.Float16 => Raw(name, type, dims, MemoryMarshal.AsBytes<Half>(Array.ConvertAll(values, v => (Half)v))),
        DataType.Bfloat16 => Raw(name, type, dims, MemoryMarshal.AsBytes<ushort>(Array.ConvertAll(values, v => ToBFloat16((float)v)))),
        _ => throw new NotSupportedException($"tensor '{name}' of type {type}"),
    };

    /// <summary>Round-to-nearest-even float32 → bfloat16 bits.</summary>
    public static ushort ToBFloat16(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        if (float.IsNaN(value)) return 0x7FC0;
        uint rounding = 0x7FFF + ((bits >> 16) & 1);
        return (ushort)((bits + rounding) >> 16);
    }

    public static float FromBFloat16(ushort bits) => BitConverter.UInt32BitsToSingle((uint)bits << 16);

    public static bool IsFloatType(int elemType) =>
        (DataType)elemType is DataType.Float or DataType.Double or DataType.Float16 or DataType.Bfloat16;
}
