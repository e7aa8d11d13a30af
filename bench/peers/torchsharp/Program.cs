// TorchSharp peer of `onnxlora bench`: the workload of ../workload.json (copied beside the binary),
// as ../torch_peer.py runs it, written against TorchSharp (LibTorch 2.10 CPU).
//
// A GPT-2-style model (pre-LayerNorm, causal attention with separate q/k/v/proj Linear layers,
// tanh GELU MLP 4x, learned positions, final LayerNorm, bias-free head; random weights from a
// seed), every Linear wrapped with LoRA (A [in,r] kaiming-uniform a=sqrt(5), B [r,out] zeros,
// scale alpha/r), AdamW (lr 1e-4, wd 0.01) on the LoRA parameters only. One timed step =
// zero_grad(set_to_none) + forward + cross-entropy + backward + optimizer step.
// Prints one JSON line with the Python peer's fields.
//
//   dotnet build bench/peers/torchsharp -c Release
//   bench/peers/torchsharp/bin/Release/net10.0/linux-x64/TorchSharpPeer --preset gpt2 --task cls --batch 8 --seq 120
//
// The JSON line also says what it ran on (cpu, cpu_flags, blas from LibTorch's at::show_config, called
// straight from libtorch_cpu.so, and its own 2048^3 MatMul rate). --info prints LibTorch's build config and
// parallel info, RSS after load / model build / each step and the per-step losses to stderr.
// On Debian 12 the build needs patch_glibcxx.py (run by the csproj).

using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace TorchSharpPeer;

sealed record Preset(long Vocab, long Ctx, long D, long Heads, long Layers, long MlpRatio, double Eps);

/// nn.Linear with an optional LoRA branch: base(x) + scale * ((x @ A) @ B).
/// The base Linear is created first (as in the Python model); A and B are added later by
/// AddLora, in the same traversal order as the Python add_lora, so the RNG draws line up.
sealed class LoRALinear : Module<Tensor, Tensor>
{
    private readonly Linear @base;
    private Parameter? A;
    private Parameter? B;
    private double scale;

    public LoRALinear(long inFeatures, long outFeatures, bool hasBias = true) : base("LoRALinear")
    {
        @base = Linear(inFeatures, outFeatures, hasBias);
        RegisterComponents();
    }

    public void AddLora(long r, double alpha)
    {
        scale = alpha / r;
        A = Parameter(empty(@base.in_features, r));
        init.kaiming_uniform_(A, a: Math.Sqrt(5));
        B = Parameter(zeros(r, @base.out_features));
        register_parameter("A", A);
        register_parameter("B", B);
    }

    public override Tensor forward(Tensor x)
    {
        if (A is null || B is null) return @base.forward(x);
        using var scope = NewDisposeScope();
        return (@base.forward(x) + scale * x.matmul(A).matmul(B)).MoveToOuterDisposeScope();
    }
}

sealed class Attention : Module<Tensor, Tensor>
{
    private readonly long h, hd;
    private readonly LoRALinear q, k, v, proj;
    private readonly Tensor mask;

    public Attention(long d, long ctx, long heads) : base("Attention")
    {
        h = heads; hd = d / heads;
        q = new LoRALinear(d, d); k = new LoRALinear(d, d); v = new LoRALinear(d, d); proj = new LoRALinear(d, d);
        mask = triu(ones(ctx, ctx, dtype: ScalarType.Bool), diagonal: 1);
        RegisterComponents();
    }

    public IEnumerable<LoRALinear> Linears() { yield return q; yield return k; yield return v; yield return proj; }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], d = x.shape[2];
        Tensor Split(Tensor y) => y.view(b, t, h, hd).transpose(1, 2);
        var qq = Split(q.forward(x));
        var kk = Split(k.forward(x));
        var vv = Split(v.forward(x));
        var s = qq.matmul(kk.transpose(2, 3)).masked_fill(mask.narrow(0, 0, t).narrow(1, 0, t), double.NegativeInfinity);
        var w = softmax(s / Math.Sqrt(hd), dim: -1);
        return proj.forward(w.matmul(vv).transpose(1, 2).reshape(b, t, d)).MoveToOuterDisposeScope();
    }
}

sealed class Block : Module<Tensor, Tensor>
{
    private readonly LayerNorm ln1, ln2;
    private readonly Attention att;
    private readonly LoRALinear fc, @out;

    public Block(Preset c) : base("Block")
    {
        ln1 = LayerNorm(c.D, c.Eps); ln2 = LayerNorm(c.D, c.Eps);
        att = new Attention(c.D, c.Ctx, c.Heads);
        fc = new LoRALinear(c.D, c.MlpRatio * c.D); @out = new LoRALinear(c.MlpRatio * c.D, c.D);
        RegisterComponents();
    }

    public IEnumerable<LoRALinear> Linears() => att.Linears().Append(fc).Append(@out);

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        x = x + att.forward(ln1.forward(x));
        return (x + @out.forward(functional.gelu(fc.forward(ln2.forward(x)), TorchSharp.Modules.GELU.Approximate.tanh))).MoveToOuterDisposeScope();
    }
}

sealed class GPT : Module<Tensor, Tensor>
{
    private readonly Embedding wte, wpe;
    private readonly ModuleList<Block> blocks;
    private readonly LayerNorm ln_f;
    private readonly LoRALinear head;

    public GPT(Preset c, long classes) : base("GPT")
    {
        wte = Embedding(c.Vocab, c.D); wpe = Embedding(c.Ctx, c.D);
        blocks = new ModuleList<Block>();
        for (int i = 0; i < c.Layers; i++) blocks.Add(new Block(c));
        ln_f = LayerNorm(c.D, c.Eps);
        head = new LoRALinear(c.D, classes > 0 ? classes : c.Vocab, hasBias: false);
        RegisterComponents();
    }

    /// Every Linear, in the order Python's add_lora (named_children recursion) visits them.
    public IEnumerable<LoRALinear> Linears() => blocks.SelectMany(b => b.Linears()).Append(head);

    public override Tensor forward(Tensor idx)
    {
        using var scope = NewDisposeScope();
        var x = wte.forward(idx) + wpe.forward(arange(idx.shape[1]));
        foreach (var b in blocks)
        {
            var next = b.forward(x);
            x.Dispose(); // like nn.Sequential rebinding `input`: autograd keeps what backward needs
            x = next;
        }
        return head.forward(ln_f.forward(x)).MoveToOuterDisposeScope();
    }
}

static class Program
{
    static int Main(string[] argv)
    {
        var workload = JsonNode.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "workload.json")))!;
        var lora = workload["lora"]!;
        var optimizer = workload["optimizer"]!;
        var lmShape = workload["shapes"]!["lm"]!;
        string J(JsonNode? n) => n!.ToJsonString();
        var a = new Dictionary<string, string>
        {
            ["preset"] = lmShape["preset"]!.GetValue<string>(), ["task"] = "lm", ["classes"] = J(workload["shapes"]!["cls"]!["classes"]),
            ["batch"] = J(lmShape["batch"]), ["seq"] = J(lmShape["seq"]), ["rank"] = J(lora["rank"]), ["alpha"] = J(lora["alpha"]),
            ["steps"] = "3", ["warmup"] = "1", ["threads"] = "2", ["seed"] = J(workload["seed"]),
        };
        bool info = false;
        for (int i = 0; i < argv.Length; i++)
        {
            var arg = argv[i];
            if (arg == "--info") { info = true; continue; }
            if (!arg.StartsWith("--")) return Usage($"unexpected argument {arg}");
            string key, val;
            int eq = arg.IndexOf('=');
            if (eq > 0) { key = arg[2..eq]; val = arg[(eq + 1)..]; }
            else { key = arg[2..]; if (i + 1 >= argv.Length) return Usage($"{arg} needs a value"); val = argv[++i]; }
            if (!a.ContainsKey(key)) return Usage($"unknown flag --{key}");
            a[key] = val;
        }
        var presets = workload["presets"]!.AsObject();
        if (presets[a["preset"]] is not JsonNode p) return Usage($"--preset must be one of {string.Join(", ", presets.Select(kv => kv.Key))}");
        var model = workload["model"]!;
        var c = new Preset(p["vocab"]!.GetValue<long>(), p["context"]!.GetValue<long>(), p["width"]!.GetValue<long>(), p["heads"]!.GetValue<long>(),
                           p["layers"]!.GetValue<long>(), model["mlp_ratio"]!.GetValue<long>(), model["layer_norm_epsilon"]!.GetValue<double>());
        var task = a["task"];
        if (task != "lm" && task != "cls") return Usage("--task must be lm or cls");
        long classes = long.Parse(a["classes"], CultureInfo.InvariantCulture), batch = long.Parse(a["batch"], CultureInfo.InvariantCulture), seq = long.Parse(a["seq"], CultureInfo.InvariantCulture);
        long rank = long.Parse(a["rank"], CultureInfo.InvariantCulture);
        double alpha = double.Parse(a["alpha"], CultureInfo.InvariantCulture);
        int steps = int.Parse(a["steps"], CultureInfo.InvariantCulture), warmup = int.Parse(a["warmup"], CultureInfo.InvariantCulture), threads = int.Parse(a["threads"], CultureInfo.InvariantCulture);
        long seed = long.Parse(a["seed"], CultureInfo.InvariantCulture);
        if (seq > c.Ctx) return Usage($"--seq {seq} is longer than {a["preset"]}'s context ({c.Ctx})");

        torch.set_num_threads(threads);
        torch.manual_seed(seed);
        var config = LibTorchString("_ZN2at11show_configB5cxx11Ev");
        if (info) Console.Error.WriteLine($"--- libtorch show_config ---\n{config}\n--- parallel_info ---\n{LibTorchString("_ZN2at17get_parallel_infoB5cxx11Ev")}");

        if (info) Console.Error.WriteLine($"rss after libtorch load: {RssMb("VmRSS")} MB");
        var gpt = new GPT(c, task == "cls" ? classes : 0);
        foreach (var w in gpt.parameters()) w.requires_grad = false;
        foreach (var lin in gpt.Linears()) lin.AddLora(rank, alpha);
        var trainable = gpt.parameters().Where(w => w.requires_grad).ToList();
        var opt = optim.AdamW(trainable, lr: optimizer["lr"]!.GetValue<double>(), beta1: optimizer["beta1"]!.GetValue<double>(), beta2: optimizer["beta2"]!.GetValue<double>(),
                              eps: optimizer["eps"]!.GetValue<double>(), weight_decay: optimizer["weight_decay"]!.GetValue<double>());
        var x = randint(0, c.Vocab, new long[] { batch, seq });
        var y = task == "cls" ? randint(0, classes, new long[] { batch }) : randint(0, c.Vocab, new long[] { batch, seq });

        if (info) Console.Error.WriteLine($"rss after model build: {RssMb("VmRSS")} MB");
        float Step()
        {
            using var scope = NewDisposeScope();
            foreach (var w in trainable) w.grad = null; // opt.zero_grad(set_to_none=True)
            var output = gpt.forward(x);
            var loss = task == "cls"
                ? functional.cross_entropy(output.select(1, -1), y)
                : functional.cross_entropy(output.flatten(0, 1), y.flatten());
            loss.backward();
            opt.step();
            return loss.item<float>();
        }

        for (int i = 0; i < warmup; i++) { var l = Step(); if (info) Console.Error.WriteLine($"warmup {i} loss {l:R}, rss {RssMb("VmRSS")} MB, peak {RssMb("VmHWM")} MB"); }
        var sw = Stopwatch.StartNew();
        var cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
        for (int i = 0; i < steps; i++) { var l = Step(); if (info) Console.Error.WriteLine($"step {i} loss {l:R}, rss {RssMb("VmRSS")} MB, peak {RssMb("VmHWM")} MB"); }
        double dt = sw.Elapsed.TotalSeconds / steps;
        double cpu = (Process.GetCurrentProcess().TotalProcessorTime - cpu0).TotalSeconds / steps;

        var tsVersion = typeof(torch).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion?.Split('+')[0]
                        ?? typeof(torch).Assembly.GetName().Version?.ToString() ?? "?";
        var ltVersion = torch.__version__.EndsWith(".0") && torch.__version__.Count(ch => ch == '.') == 3 ? torch.__version__[..^2] : torch.__version__;
        var (cpuModel, flags) = CpuInfo();
        // the BLAS-relevant lines of the build config: MKL / oneDNN versions and the CPU capability ATen dispatches to
        var blasInfo = System.Text.RegularExpressions.Regex.Match(config, @"BLAS_INFO=(\w+)");
        var blas = string.Join("; ", config.Split('\n').Select(l => l.Trim(' ', '-'))
                                           .Where(l => l.StartsWith("Intel(R)") || l.StartsWith("CPU capability"))
                                           .Prepend(blasInfo.Success ? blasInfo.Value : "BLAS_INFO unknown"));
        var result = new Dictionary<string, object>
        {
            ["peer"] = $"torchsharp {tsVersion} (libtorch {ltVersion})", ["preset"] = a["preset"], ["task"] = task,
            ["batch"] = batch, ["seq"] = seq, ["rank"] = rank, ["threads"] = threads,
            ["step_s"] = Math.Round(dt, 4), ["cpu_s"] = Math.Round(cpu, 3), ["tokens_per_s"] = Math.Round(batch * seq / dt, 1),
            ["trainable"] = trainable.Sum(w => w.numel()), ["total"] = gpt.parameters().Sum(w => w.numel()),
            ["peak_rss_mb"] = (long)Math.Round(PeakRssKb() / 1024.0),
            ["cpu"] = cpuModel, ["cpu_flags"] = flags, ["blas"] = blas.Length > 0 ? blas : "unknown", ["matmul_gflops"] = MatMulGflops(),
        };
        Console.WriteLine(JsonSerializer.Serialize(result));
        return 0;
    }

    static int Usage(string msg)
    {
        Console.Error.WriteLine($"error: {msg}");
        Console.Error.WriteLine("usage: TorchSharpPeer [--preset NAME (workload.json)] [--task lm|cls] [--classes N] [--batch N] [--seq N]");
        Console.Error.WriteLine("                      [--rank N] [--alpha X] [--steps N] [--warmup N] [--threads N] [--seed N] [--info]");
        return 2;
    }

    /// LibTorch's own fp32 2048^3 MatMul rate: the best of 3 after one warm-up.
    static double MatMulGflops(long n = 2048)
    {
        using var scope = NewDisposeScope();
        var a = randn(n, n);
        var b = randn(n, n);
        a.matmul(b);
        double best = double.MaxValue;
        for (int i = 0; i < 3; i++)
        {
            var sw = Stopwatch.StartNew();
            a.matmul(b);
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        return Math.Round(2.0 * n * n * n / best / 1e9, 1);
    }

    /// CPU model and the SIMD flags that decide BLAS kernels (avx2, fma, avx512*, amx*).
    static (string Model, string Flags) CpuInfo()
    {
        string model = "unknown", flags = "";
        try
        {
            foreach (var line in File.ReadLines("/proc/cpuinfo"))
            {
                var (key, value) = (line.Split(':')[0].Trim(), line.Contains(':') ? line[(line.IndexOf(':') + 1)..].Trim() : "");
                if (key == "model name" && model == "unknown") model = value;
                if (key != "flags") continue;
                flags = string.Join(" ", value.Split(' ').Where(f => f is "avx2" or "fma" || f.StartsWith("avx512") || f.StartsWith("amx")).Order(StringComparer.Ordinal));
                break;
            }
        }
        catch (IOException) { }
        return (model, flags);
    }

    /// Peak resident set size (VmHWM, the value getrusage's ru_maxrss reports on Linux), in KiB.
    static long PeakRssKb() => StatusKb("VmHWM") ?? Process.GetCurrentProcess().PeakWorkingSet64 / 1024;

    static long RssMb(string field) => (StatusKb(field) ?? 0) / 1024;

    static long? StatusKb(string field)
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith(field + ":"))
                    return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture);
        }
        catch (IOException) { }
        return null;
    }

    /// at::show_config() / at::get_parallel_info() are not wrapped by TorchSharp; call the C++ functions in
    /// libtorch_cpu.so directly. Each returns a std::string by value: on x86-64 SysV the caller passes a hidden
    /// pointer to a 32-byte buffer (libstdc++ cxx11 layout: data pointer, then size). The string is leaked on purpose.
    static unsafe string LibTorchString(string symbol)
    {
        if (!OperatingSystem.IsLinux() || RuntimeInformation.ProcessArchitecture != Architecture.X64) return "(only on linux-x64)";
        torch.get_num_threads(); // make sure TorchSharp has loaded LibTorch
        if (!NativeLibrary.TryLoad("libtorch_cpu.so", typeof(torch).Assembly, DllImportSearchPath.SafeDirectories | DllImportSearchPath.AssemblyDirectory, out var lib))
            return "(could not open libtorch_cpu.so)";
        if (!NativeLibrary.TryGetExport(lib, symbol, out var fn)) return $"({symbol}: not found)";
        var buf = stackalloc byte[32];
        ((delegate* unmanaged<byte*, byte*>)fn)(buf);
        return Encoding.UTF8.GetString(*(byte**)buf, (int)*(long*)(buf + 8)).TrimEnd();
    }
}
