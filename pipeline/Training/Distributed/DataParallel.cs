using System.Diagnostics;
using System.Globalization;
using OnnxLora.Pipeline.Data;

namespace OnnxLora.Pipeline.Training.Distributed;

/// <summary>Where a data-parallel run's time went (steady state: the first step, which loads and plans, is left out).</summary>
public sealed record DataParallelStats(int Processes, int Steps, TimeSpan StepTime, TimeSpan GradientAllReduce, TimeSpan Sync, long GradientBytes)
{
    /// <summary>The gradient Allreduce's share of the wall-clock step time.</summary>
    public double AllReduceShare => StepTime > TimeSpan.Zero ? GradientAllReduce / StepTime : 0;
}

/// <summary>
/// Data-parallel training over an <see cref="IProcessGroup"/>: each rank trains on a disjoint slice of every global
/// batch and the ranks combine their gradients so that the optimizer step equals the one a single process takes on the
/// whole batch. The train graph's loss is a mean over its own batch (counted target tokens for lm, rows for cls), so a
/// rank's gradient is weighted by its share of the global batch's count, n_r / n, before the sum:
/// Σ_r (n_r/n)·∇(Σ_{i∈r} ℓ_i / n_r) = ∇(Σ_i ℓ_i / n). The counts are summed first (a three-value Allreduce per
/// micro-batch, which also yields the global loss and tokens); the weighted gradients are summed in host memory, and
/// clipping and the optimizer then run on every rank on the same global sum.
/// <para>
/// With one process every method does what the single-process loop did before, and no MPI library is loaded.
/// Not thread-safe: one training loop drives it.
/// </para>
/// </summary>
public sealed class DataParallel
{
    static readonly Lazy<DataParallel> s_current = new(() => new DataParallel(Detect()));

    readonly IProcessGroup _group;
    float[]? _local, _sum;   // this rank's last micro-batch gradient; the weighted sum over micro-batches, then over ranks
    int _microBatches;
    readonly Stopwatch _sinceLastStep = new();
    TimeSpan _stepTime, _allReduce, _sync;
    int _steps;

    public DataParallel(IProcessGroup group) => _group = group;

    /// <summary>The process's group, detected once from the launcher's environment (see <see cref="Detect"/>).</summary>
    public static DataParallel Current => s_current.Value;

    public int Rank => _group.Rank;
    public int Size => _group.Size;
    /// <summary>Rank 0 writes checkpoints, metrics, the plot and the adapter.</summary>
    public bool IsRoot => _group.Rank == 0;
    public bool IsDistributed => _group.Size > 1;

    /// <summary>
    /// The group this process belongs to: MPICH's Hydra <c>mpiexec</c> and Slurm's <c>srun --mpi=pmi2</c> set
    /// PMI_SIZE/PMI_RANK; with more than one process MPI is started (<see cref="MpichProcessGroup"/>), otherwise
    /// nothing is loaded. Open MPI's launcher (OMPI_COMM_WORLD_SIZE) is refused: its ABI is not MPICH's.
    /// </summary>
    public static IProcessGroup Detect()
    {
        if (LauncherValue("OMPI_COMM_WORLD_SIZE") is > 1 and var openMpi)
            throw new NotSupportedException($"Open MPI's mpiexec started {openMpi} processes (OMPI_COMM_WORLD_SIZE), but OnnxLora's data parallelism binds MPICH's ABI (libmpich.so.12): launch with mpiexec.mpich, or srun --mpi=pmi2 with MPICH");
        return LauncherValue("PMI_SIZE") is > 1 and var size ? new MpichProcessGroup(size) : SingleProcess.Instance;
    }

    /// <summary>
    /// The rank the launcher gave this process, read from its environment without starting MPI (0 outside a launcher):
    /// the CLI keeps stdout for rank 0 before any verb runs.
    /// </summary>
    public static int LauncherRank => LauncherValue("PMI_RANK") ?? LauncherValue("OMPI_COMM_WORLD_RANK") ?? 0;

    /// <summary>How many processes the launcher started, from its environment without starting MPI (1 outside a launcher).</summary>
    public static int LauncherSize => LauncherValue("PMI_SIZE") ?? LauncherValue("OMPI_COMM_WORLD_SIZE") ?? 1;

    static int? LauncherValue(string name) =>
        int.TryParse(Environment.GetEnvironmentVariable(name), NumberStyles.None, CultureInfo.InvariantCulture, out var v) ? v : null;

    /// <summary>Intra-op threads per process: the requested count, or (0 = all cores) the cores shared by the ranks on this node.</summary>
    public int ThreadsPerProcess(int requested)
    {
        if (requested > 0 || !IsDistributed) return requested;
        int local = LauncherValue("MPI_LOCALNRANKS") ?? LauncherValue("SLURM_NTASKS_PER_NODE") ?? Size;
        return Math.Max(1, Environment.ProcessorCount / Math.Max(1, local));
    }

    /// <summary>
    /// Forward and backward on this rank's slice of global batch <paramref name="index"/>; returns the loss and the
    /// token count of the whole global batch (as one process would report them). Gradients add up over the calls of one
    /// optimizer step until <see cref="ReduceGradients"/>.
    /// </summary>
    public (double Loss, long Tokens) TrainStep(TrainingSession session, Batcher batcher, int epoch, int index, int[] order)
    {
        if (!IsDistributed)
        {
            var batch = batcher.Get(epoch, index, order);
            return (session.TrainStep(batch).Loss, batch.TokenCount);
        }
        if (_microBatches == 0) _sinceLastStep.Start();
        var shard = batcher.GetShard(epoch, index, order, Rank, Size);
        double loss = 0;
        long count = 0;
        if (shard is not null)
        {
            session.LazyResetGrad();   // this micro-batch's gradient alone: it is weighted before it joins the sum
            loss = session.TrainStep(shard).Loss;
            count = session.Spec.Task == GraphRewrite.Artifacts.TrainingTask.Cls ? shard.BatchSize : shard.CountedTargets;
        }
        Span<double> totals = [count, count * loss, shard?.TokenCount ?? 0];
        var clock = Stopwatch.StartNew();
        _group.AllReduceSum(totals);   // also where ranks wait for the slowest one
        _sync += clock.Elapsed;

        _sum ??= new float[session.GradientLength];
        if (_microBatches++ == 0) Array.Clear(_sum);
        if (count > 0)
        {
            _local ??= new float[_sum.Length];
            session.CopyGradientsTo(_local);
            float weight = (float)(count / totals[0]);
            for (int i = 0; i < _sum.Length; i++) _sum[i] += weight * _local[i];
        }
        return (totals[0] > 0 ? totals[1] / totals[0] : 0, (long)totals[2]);
    }

    /// <summary>Sums the weighted gradients over the ranks and hands the global sum to the session for its optimizer step (nothing with one process).</summary>
    public void ReduceGradients(TrainingSession session)
    {
        if (!IsDistributed) return;
        var clock = Stopwatch.StartNew();
        _group.AllReduceSum(_sum);
        var reduce = clock.Elapsed;
        session.SetGradients(_sum, _microBatches);
        _microBatches = 0;
        // step time from one reduction to the next: forward, backward, optimizer, metrics and checkpoints of a step
        if (_steps++ == 0) { _sync = TimeSpan.Zero; _sinceLastStep.Restart(); return; }
        _stepTime += _sinceLastStep.Elapsed;
        _allReduce += reduce;
        _sinceLastStep.Restart();
    }

    /// <summary>True on every rank when <paramref name="flag"/> is true on any (stop together on Ctrl+C or SIGTERM).</summary>
    public bool AnyRank(bool flag)
    {
        if (!IsDistributed) return flag;
        Span<double> v = [flag ? 1 : 0];
        _group.AllReduceSum(v);
        return v[0] > 0;
    }

    /// <summary>
    /// Checks that every rank holds bit-identical parameters and moments (call on every rank at the same step; rank 0's
    /// checkpoint and adapter stand for all). They stay identical because every rank applies the same optimizer step
    /// to the same reduced gradient; nodes whose kernels round differently (e.g. other SIMD widths) would drift apart.
    /// </summary>
    public void VerifyReplicas(TrainingSession session)
    {
        if (!IsDistributed) return;
        ulong hash = 14695981039346656037;   // FNV-1a over names and float bits
        foreach (var (name, (_, data)) in session.GetState(withMoments: true).OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            foreach (var c in name) hash = (hash ^ c) * 1099511628211;
            foreach (var v in data) hash = (hash ^ BitConverter.SingleToUInt32Bits(v)) * 1099511628211;
        }
        // sums of 40-bit values stay exact in a double for up to 2^13 ranks: all equal ⇔ each rank sees Size × its own
        double own = hash >> 24;
        Span<double> sum = [own];
        _group.AllReduceSum(sum);
        if (AnyRank(sum[0] != own * Size))
            throw new InvalidOperationException($"the {Size} ranks no longer hold the same parameters (rank {Rank}: {own:R} × {Size} vs {sum[0]:R} summed): their ONNX Runtime kernels round differently; run all ranks on one kind of node");
    }

    /// <summary>Replaces each value by its sum over the ranks (evaluation sums; nothing with one process).</summary>
    public void Sum(Span<double> values) => _group.AllReduceSum(values);

    /// <summary>Runs <paramref name="work"/> on rank 0, then on the others once it is done there (files rank 0 writes and the others read).</summary>
    public T RootFirst<T>(Func<T> work)
    {
        if (!IsDistributed) return work();
        T result = default!;
        if (IsRoot) result = work();
        _group.Barrier();
        return IsRoot ? result : work();
    }

    /// <summary>Returns when every rank has called it.</summary>
    public void Barrier() => _group.Barrier();

    /// <summary>Step time and gradient Allreduce time so far (null with one process).</summary>
    public DataParallelStats? Stats => IsDistributed && _sum is not null
        ? new DataParallelStats(Size, Math.Max(0, _steps - 1), _stepTime, _allReduce, _sync, _sum.LongLength * sizeof(float))
        : null;

    /// <summary>After an error in this process: with several processes, ends them all (MPI_Abort) so none waits forever.</summary>
    public static void AbortIfDistributed(int exitCode)
    {
        if (s_current.IsValueCreated && s_current.Value.IsDistributed) s_current.Value._group.Abort(exitCode);
    }

    /// <summary>At exit: leaves MPI (MPI_Finalize) if this process started it.</summary>
    public static void Shutdown()
    {
        if (s_current.IsValueCreated) s_current.Value._group.Dispose();
    }
}
