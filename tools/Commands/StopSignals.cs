using System.Runtime.InteropServices;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// Ctrl+C and SIGTERM as a cancellation token: long verbs stop after the current step and write their checkpoint
/// instead of dying mid-write. Dispose to give both signals back their default behaviour.
/// </summary>
sealed class StopSignals : IDisposable
{
    readonly CancellationTokenSource _stop;
    readonly ConsoleCancelEventHandler _onCancel;
    readonly PosixSignalRegistration _onTerm;

    public StopSignals(CancellationToken outer)
    {
        _stop = CancellationTokenSource.CreateLinkedTokenSource(outer);
        _onCancel = (_, e) => { e.Cancel = true; Stop(); };
        Console.CancelKeyPress += _onCancel;
        _onTerm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; Stop(); });
    }

    public CancellationToken Token => _stop.Token;

    // a handler runs on its own thread and can still run while the verb returns (a launcher that signals every rank
    // twice): stopping a run that already ended is nothing to do, not a crash
    void Stop()
    {
        try { _stop.Cancel(); }
        catch (ObjectDisposedException) { }
    }

    public void Dispose()
    {
        Console.CancelKeyPress -= _onCancel;
        _onTerm.Dispose();
        _stop.Dispose();
    }
}
