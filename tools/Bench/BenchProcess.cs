using System.Diagnostics;
using System.Text;

namespace OnnxLora.Tools.Bench;

/// <summary>
/// One contestant of the benchmark, run as a child process that prints one JSON result line on stdout (so each
/// peak-RSS figure is one process's own): OnnxLora itself (<c>onnxlora bench --self-only</c>), the PyTorch peer, the
/// TorchSharp peer.
/// </summary>
/// <param name="Environment">Variables to set for the child; a null value removes the variable.</param>
public sealed record BenchProcess(string Name, string FileName, IReadOnlyList<string> Arguments, IReadOnlyDictionary<string, string?>? Environment = null)
{
    /// <summary>The command line, shell-quoted, for the report.</summary>
    public string CommandLine => string.Join(" ", new[] { FileName }.Concat(Arguments).Select(Quote));

    static string Quote(string s) => s.Length > 0 && s.All(c => char.IsAsciiLetterOrDigit(c) || "-_./=:,+".Contains(c)) ? s : "'" + s.Replace("'", "'\\''") + "'";

    /// <summary>
    /// Runs the process to completion; each stderr line goes to <paramref name="onStderrLine"/> (progress). Throws with
    /// the tail of stderr when it fails or prints no result line.
    /// </summary>
    public BenchResult Run(Action<string>? onStderrLine, CancellationToken cancel = default)
    {
        var (output, tail) = Execute(onStderrLine, cancel);
        return BenchResult.FromOutput(output)
               ?? throw new InvalidOperationException($"{Name} printed no JSON result line; command: {CommandLine}; stderr: {tail}");
    }

    /// <summary>Runs the process to completion and returns its stdout; throws with the tail of stderr when it fails.</summary>
    public string Output(Action<string>? onStderrLine, CancellationToken cancel = default) => Execute(onStderrLine, cancel).Stdout;

    (string Stdout, string StderrTail) Execute(Action<string>? onStderrLine, CancellationToken cancel)
    {
        var psi = new ProcessStartInfo(FileName) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in Arguments) psi.ArgumentList.Add(a);
        if (Environment is not null)
            foreach (var (k, v) in Environment)
                if (v is null) psi.Environment.Remove(k);
                else psi.Environment[k] = v;
        using var p = new Process { StartInfo = psi };
        var stdout = new StringBuilder();
        var stderr = new List<string>();
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (stdout) stdout.AppendLine(e.Data); };
        p.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is null) return;
            lock (stderr) stderr.Add(e.Data);
            onStderrLine?.Invoke(e.Data);
        };
        try { p.Start(); }
        catch (Exception e) when (e is System.ComponentModel.Win32Exception or InvalidOperationException)
        {
            throw new InvalidOperationException($"{Name}: cannot start '{FileName}' ({e.Message})", e);
        }
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        using (cancel.Register(() => { try { p.Kill(entireProcessTree: true); } catch (InvalidOperationException) { } }))
            p.WaitForExit();
        cancel.ThrowIfCancellationRequested();
        string Tail() { lock (stderr) return string.Join(" | ", stderr.TakeLast(4)); }
        if (p.ExitCode != 0) throw new InvalidOperationException($"{Name} failed (exit code {p.ExitCode}): {Tail()}; command: {CommandLine}");
        lock (stdout) return (stdout.ToString(), Tail());
    }
}
