using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using OnnxLora.GraphRewrite.Signature;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Pipeline.Deployment;

/// <summary>
/// A padded batch of token rows as a decoder sees it: ids and the attention mask [batch, width] (1 = real token), with
/// no cache. Right padding (training, evaluation, classification) or left padding (batched generation: every row's
/// last token at the same column).
/// </summary>
public sealed record PaddedTokens(int Batch, int Width, long[] Ids, long[] Mask)
{
    /// <summary>Pads <paramref name="rows"/> with <paramref name="padId"/> to <paramref name="width"/>, on the right or the left.</summary>
    public static PaddedTokens Pad(IReadOnlyList<IReadOnlyList<int>> rows, int width, int padId, bool left = false)
    {
        int batch = rows.Count;
        var ids = new long[batch * width];
        var mask = new long[batch * width];
        Array.Fill(ids, padId);
        for (int b = 0; b < batch; b++)
        {
            var row = rows[b];
            if (row.Count > width) throw new ArgumentException($"row {b} has {row.Count} tokens, more than the width {width}");
            int offset = left ? width - row.Count : 0;
            for (int t = 0; t < row.Count; t++) { ids[b * width + offset + t] = row[t]; mask[b * width + offset + t] = 1; }
        }
        return new PaddedTokens(batch, width, ids, mask);
    }

    /// <summary>A right-padded training batch: ids [batch, width] already padded, real lengths per row.</summary>
    public static PaddedTokens RightPadded(long[] ids, IReadOnlyList<long> lengths, int width)
    {
        var mask = new long[ids.Length];
        for (int b = 0; b < lengths.Count; b++)
            for (int t = 0; t < lengths[b]; t++) mask[b * width + t] = 1;
        return new PaddedTokens(lengths.Count, width, ids, mask);
    }

    /// <summary>
    /// Positions from the mask: cumsum(mask) − 1 clamped at 0 (Hugging Face's rule), so real tokens count 0..len−1 with
    /// either padding side and padding gets a valid position that no counted token attends to.
    /// </summary>
    public long[] PositionIds()
    {
        var positions = new long[Mask.Length];
        for (int b = 0; b < Batch; b++)
        {
            long seen = 0;
            for (int t = 0; t < Width; t++)
            {
                seen += Mask[b * Width + t];
                positions[b * Width + t] = Math.Max(0, seen - 1);
            }
        }
        return positions;
    }
}

/// <summary>
/// Feeds a decoder's token-side inputs by role, in the element type the graph declares: ids, mask, positions, zero
/// token types, cache positions, and empty caches ([batch, kv_heads, 0, head_dim]; a with-past graph then recomputes
/// the whole context). One implementation for the training session and every deployment reader.
/// </summary>
public static class SignatureFeeds
{
    /// <summary>True for roles <see cref="Create(SignatureEntry, PaddedTokens)"/> feeds.</summary>
    public static bool Feeds(IoRole role) => role is IoRole.InputIds or IoRole.AttentionMask or IoRole.PositionIds or IoRole.TokenTypeIds
        or IoRole.CachePosition or IoRole.PastKey or IoRole.PastValue or IoRole.PastKeyValue;

    /// <summary>A new value (owned by the caller) for input <paramref name="input"/>.</summary>
    public static OrtValue Create(SignatureEntry input, PaddedTokens tokens)
    {
        long[] shape = [tokens.Batch, tokens.Width];
        return input.Role switch
        {
            IoRole.InputIds => Tensor(tokens.Ids, shape, input),
            IoRole.AttentionMask => Tensor(tokens.Mask, shape, input),
            IoRole.PositionIds => Tensor(tokens.PositionIds(), shape, input),
            IoRole.TokenTypeIds => Tensor(new long[tokens.Ids.Length], shape, input),
            IoRole.CachePosition => Tensor(Enumerable.Range(0, tokens.Width).Select(i => (long)i).ToArray(), [tokens.Width], input),
            IoRole.PastKey or IoRole.PastValue or IoRole.PastKeyValue =>
                OrtValue.CreateAllocatedTensorValue(OrtAllocator.DefaultInstance, (TensorElementType)(int)input.ElemType, SignatureRoles.EmptyPastShape(input, tokens.Batch)),
            _ => throw new ArgumentException($"input '{input.Name}' has role {input.Role.Name()}, which is not fed from tokens"),
        };
    }

    /// <summary>A new value (owned by the caller) holding <paramref name="values"/> in <paramref name="input"/>'s element type.</summary>
    public static OrtValue Create(SignatureEntry input, long[] values, long[] shape) => Tensor(values, shape, input);

    static OrtValue Tensor(long[] values, long[] shape, SignatureEntry input) => input.ElemType switch
    {
        DataType.Int64 => OrtValue.CreateTensorValueFromMemory(values, shape),
        DataType.Int32 => OrtValue.CreateTensorValueFromMemory(Array.ConvertAll(values, v => checked((int)v)), shape),
        DataType.Float => OrtValue.CreateTensorValueFromMemory(Array.ConvertAll(values, v => (float)v), shape),
        DataType.Bool => OrtValue.CreateTensorValueFromMemory(Array.ConvertAll(values, v => v != 0), shape),
        _ => throw new InvalidDataException($"input '{input.Name}' ({input.Role.Name()}) is {input.ElemType.ToString().ToLowerInvariant()}; expected int64, int32, float or bool"),
    };
}
