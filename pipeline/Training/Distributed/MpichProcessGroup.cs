using System.Runtime.InteropServices;

namespace OnnxLora.Pipeline.Training.Distributed;

/// <summary>
/// MPI_COMM_WORLD through a thin binding of the nine MPI calls data parallelism needs, over MPICH's ABI
/// (libmpich.so.12; Intel MPI, MVAPICH and Cray MPICH share it). We bind it ourselves rather than take MPI.NET: that
/// package targets MS-MPI's msmpi.dll and would need a process-wide DllImport resolver to reach MPICH, brings a large
/// API we do not use, and hides the handle values; here the library is opened only when a launcher started several
/// processes (<see cref="DataParallel.Detect"/>), so a single-process run never loads it.
/// <para>
/// In MPICH's ABI handles are ints; the constants are those of mpich/mpi.h (MPICH 4.0.2, unchanged since 3.x).
/// Errors come back as return codes (MPI_ERRORS_RETURN) and are thrown with the call's name and MPI's message.
/// Calls are made from one thread at a time (MPI_THREAD_SERIALIZED). Dispose calls MPI_Finalize.
/// </para>
/// </summary>
public sealed unsafe class MpichProcessGroup : IProcessGroup
{
    // mpich/mpi.h: typedef int MPI_Comm, MPI_Datatype, MPI_Op, MPI_Errhandler
    const int CommWorld = 0x44000000, Float = 0x4c00040a, Double = 0x4c00080b, Sum = 0x58000003, ErrorsReturn = 0x54000001;
    const int ThreadSerialized = 2, MaxErrorString = 512, MaxCount = 1 << 30;
    static readonly void* InPlace = (void*)-1;   // MPI_IN_PLACE

    /// <summary>The library opened by default; <c>ONNXLORA_MPI_LIBRARY</c> names another MPICH-ABI build.</summary>
    public const string DefaultLibrary = "libmpich.so.12", LibraryVariable = "ONNXLORA_MPI_LIBRARY";

    readonly nint _library;
    readonly delegate* unmanaged<int*, byte***, int, int*, int> _initThread;
    readonly delegate* unmanaged<int, int*, int> _commRank, _commSize;
    readonly delegate* unmanaged<int, int, int> _setErrhandler, _abort;
    readonly delegate* unmanaged<void*, void*, int, int, int, int, int> _allreduce;
    readonly delegate* unmanaged<int, int> _barrier;
    readonly delegate* unmanaged<int> _finalize;
    readonly delegate* unmanaged<int, byte*, int*, int> _errorString;
    bool _finalized;

    /// <summary>Opens the MPI library and joins MPI_COMM_WORLD (MPI_Init_thread), which must hold <paramref name="expectedSize"/> processes.</summary>
    public MpichProcessGroup(int expectedSize)
    {
        var path = Environment.GetEnvironmentVariable(LibraryVariable) is { Length: > 0 } p ? p : DefaultLibrary;
        if (!NativeLibrary.TryLoad(path, out _library))
            throw new DllNotFoundException($"the MPI launcher started {expectedSize} processes, but {path} cannot be loaded: install MPICH (apt-get install mpich) or set {LibraryVariable} to an MPICH-ABI libmpi");
        nint F(string name) => NativeLibrary.TryGetExport(_library, name, out var f) ? f
            : throw new EntryPointNotFoundException($"{path}: has no {name}; it is not an MPI library");
        _initThread = (delegate* unmanaged<int*, byte***, int, int*, int>)F("MPI_Init_thread");
        _commRank = (delegate* unmanaged<int, int*, int>)F("MPI_Comm_rank");
        _commSize = (delegate* unmanaged<int, int*, int>)F("MPI_Comm_size");
        _setErrhandler = (delegate* unmanaged<int, int, int>)F("MPI_Comm_set_errhandler");
        _abort = (delegate* unmanaged<int, int, int>)F("MPI_Abort");
        _allreduce = (delegate* unmanaged<void*, void*, int, int, int, int, int>)F("MPI_Allreduce");
        _barrier = (delegate* unmanaged<int, int>)F("MPI_Barrier");
        _finalize = (delegate* unmanaged<int>)F("MPI_Finalize");
        _errorString = (delegate* unmanaged<int, byte*, int*, int>)F("MPI_Error_string");

        int provided, rank, size;
        Check(_initThread(null, null, ThreadSerialized, &provided), "MPI_Init_thread");
        Check(_setErrhandler(CommWorld, ErrorsReturn), "MPI_Comm_set_errhandler");
        Check(_commRank(CommWorld, &rank), "MPI_Comm_rank");
        Check(_commSize(CommWorld, &size), "MPI_Comm_size");
        if (provided < ThreadSerialized) throw new NotSupportedException($"{path}: provides MPI thread level {provided}; OnnxLora needs MPI_THREAD_SERIALIZED ({ThreadSerialized})");
        // a library of another launcher's family (e.g. MPICH under Open MPI's mpiexec) initializes alone: each process would train by itself
        if (size != expectedSize)
            throw new InvalidOperationException($"{path}: MPI_COMM_WORLD has {size} process(es) but the launcher started {expectedSize}: launch with MPICH's mpiexec (mpiexec.mpich) or srun --mpi=pmi2");
        (Rank, Size) = (rank, size);
    }

    public int Rank { get; }
    public int Size { get; }

    public void AllReduceSum(Span<float> values)
    {
        fixed (float* p = values) AllReduce(p, values.Length, sizeof(float), Float);
    }

    public void AllReduceSum(Span<double> values)
    {
        fixed (double* p = values) AllReduce(p, values.Length, sizeof(double), Double);
    }

    // MPI counts are ints: larger buffers go in chunks
    void AllReduce(void* data, int length, int elementSize, int type)
    {
        for (long start = 0; start < length; start += MaxCount)
        {
            int count = (int)Math.Min(MaxCount, length - start);
            Check(_allreduce(InPlace, (byte*)data + start * elementSize, count, type, Sum, CommWorld), "MPI_Allreduce");
        }
    }

    public void Barrier() => Check(_barrier(CommWorld), "MPI_Barrier");

    public void Abort(int exitCode)
    {
        _abort(CommWorld, exitCode);
        Environment.Exit(exitCode);   // MPI_Abort does not return on MPICH; this is for one that does
    }

    void Check(int code, string call)
    {
        if (code == 0) return;
        var text = new byte[MaxErrorString];
        int length = 0;
        fixed (byte* t = text)
            if (_errorString(code, t, &length) != 0) length = 0;
        var message = length > 0 ? System.Text.Encoding.ASCII.GetString(text, 0, length).Trim() : $"error code {code}";
        throw new InvalidOperationException($"{call} failed on rank {Rank} of {Size}: {message}");
    }

    public void Dispose()
    {
        if (_finalized) return;
        _finalized = true;
        Check(_finalize(), "MPI_Finalize");
    }
}
