namespace OnnxLora.Pipeline.Training.Distributed;

/// <summary>
/// The processes of one data-parallel run and the few collectives training needs (torch.distributed calls this a
/// process group). <see cref="SingleProcess"/> is the group of one, where every call is a no-op; under an MPI
/// launcher it is <see cref="MpichProcessGroup"/>. Buffers are host memory: gradients on a GPU are staged through the
/// host by <see cref="DataParallel"/>; a CUDA-aware MPI or NCCL group would add an overload taking device buffers
/// (docs/DISTRIBUTED.md). Every rank must make the same calls in the same order, as with any MPI collective.
/// </summary>
public interface IProcessGroup : IDisposable
{
    /// <summary>This process's index, 0 … <see cref="Size"/>−1; rank 0 writes the run's files.</summary>
    int Rank { get; }
    /// <summary>How many processes take part.</summary>
    int Size { get; }
    /// <summary>Replaces <paramref name="values"/> on every rank by their element-wise sum over all ranks.</summary>
    void AllReduceSum(Span<float> values);
    /// <inheritdoc cref="AllReduceSum(Span{float})"/>
    void AllReduceSum(Span<double> values);
    /// <summary>Returns when every rank has called it.</summary>
    void Barrier();
    /// <summary>Ends every process of the job with <paramref name="exitCode"/> (after an error in this one); does not return.</summary>
    void Abort(int exitCode);
}

/// <summary>The group of one process: nothing to exchange, nothing loaded.</summary>
public sealed class SingleProcess : IProcessGroup
{
    public static readonly SingleProcess Instance = new();

    SingleProcess() { }

    public int Rank => 0;
    public int Size => 1;
    public void AllReduceSum(Span<float> values) { }
    public void AllReduceSum(Span<double> values) { }
    public void Barrier() { }
    public void Abort(int exitCode) => Environment.Exit(exitCode);
    public void Dispose() { }
}
