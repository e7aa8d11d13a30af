#!/usr/bin/env python3
"""PyTorch peer of `onnxlora bench`: trains the workload defined in workload.json (beside this file) and prints one
JSON line (peer, preset, task, batch, seq, rank, threads, step_s, cpu_s (process CPU seconds per step), tokens_per_s, trainable, total, peak_rss_mb, and
what it ran on: cpu, cpu_flags, blas, matmul_gflops, env).

Needs torch with a real BLAS (Debian: python3-torch and libopenblas0-pthread; torch's reference BLAS is ~40x slower).
Start it with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (`onnxlora bench` does): a pinned core type makes OpenBLAS
run, e.g., Haswell kernels on an AVX-512 CPU. The line reports the kernel OpenBLAS chose (openblas_get_corename).

  python3 torch_peer.py --preset gpt2 --task cls --classes 2 --batch 8 --seq 120 --steps 3
"""
import argparse, ctypes, json, math, os, re, resource, time
# Debian's torch runs its OpenMP pool beside OpenBLAS's own; with busy-waiting OpenMP threads the two fight
# over the cores (about 30 % slower on 2). Passive waiting gives the peer its best showing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch, torch.nn as nn

WORKLOAD = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "workload.json")))
MODEL = WORKLOAD["model"]


class Attention(nn.Module):
    def __init__(self, d, ctx, heads):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), diagonal=1))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.h, self.hd).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = (q @ k.transpose(2, 3)).masked_fill(self.mask[:t, :t], -torch.inf)
        w = torch.softmax(s / math.sqrt(self.hd), dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, eps = c["width"], MODEL["layer_norm_epsilon"]
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.att = Attention(d, c["context"], c["heads"])
        self.fc, self.out = nn.Linear(d, MODEL["mlp_ratio"] * d), nn.Linear(MODEL["mlp_ratio"] * d, d)

    def forward(self, x):
        x = x + self.att(self.ln1(x))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, c, classes):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c["vocab"], c["width"]), nn.Embedding(c["context"], c["width"])
        self.blocks = nn.Sequential(*[Block(c) for _ in range(c["layers"])])
        self.ln_f = nn.LayerNorm(c["width"], eps=MODEL["layer_norm_epsilon"])
        self.head = nn.Linear(c["width"], classes or c["vocab"], bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        return self.head(self.ln_f(self.blocks(x)))


class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = nn.Parameter(torch.empty(base.in_features, r)); nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(r, base.out_features))

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.A) @ self.B)


def add_lora(m, r, alpha):
    for name, child in m.named_children():
        if isinstance(child, nn.Linear): setattr(m, name, LoRALinear(child, r, alpha))
        else: add_lora(child, r, alpha)


def cpu_info():
    """CPU model and the SIMD flags that decide BLAS kernels (avx2, fma, avx512*, amx*)."""
    model, flags = "unknown", []
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown": model = value.strip()
            if key.strip() == "flags":
                flags = sorted(f for f in value.split() if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))
                break
    except OSError:
        pass
    return model, flags


def blas_info():
    """torch's BLAS as built (torch.__config__.show()) and, for OpenBLAS, the kernel it runs (openblas_get_corename)."""
    config = torch.__config__.show()
    found = lambda pattern: (re.search(pattern, config) or [None, "?"])[1]
    blas, capability = found(r"BLAS_INFO=(\w+)"), found(r"CPU capability usage: (\w+)")
    built = f"BLAS_INFO={blas}, CPU capability {capability}"
    try:
        maps = open("/proc/self/maps").read().split()
        path = next(p for p in maps if "libopenblas" in os.path.basename(p))
        lib = ctypes.CDLL(path)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        lib.openblas_get_config.restype = ctypes.c_char_p
        return f"{built}; OpenBLAS core {lib.openblas_get_corename().decode()} ({lib.openblas_get_config().decode().strip()}), {lib.openblas_get_num_threads()} BLAS threads"
    except (StopIteration, OSError, AttributeError):
        return built


def matmul_gflops(n=2048, reps=3):
    """torch's own fp32 n×n×n MatMul rate (the best of reps, after one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(reps))
    return round(2 * n ** 3 / best / 1e9, 1)


def timed(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0


def main():
    lora, opt_spec = WORKLOAD["lora"], WORKLOAD["optimizer"]
    shape = WORKLOAD["shapes"]["lm"]
    ap = argparse.ArgumentParser(description="PyTorch peer of onnxlora bench (workload.json beside this file)")
    ap.add_argument("--preset", default=shape["preset"], choices=WORKLOAD["presets"])
    ap.add_argument("--task", default="lm", choices=["lm", "cls"])
    ap.add_argument("--classes", type=int, default=WORKLOAD["shapes"]["cls"]["classes"])
    ap.add_argument("--batch", type=int, default=shape["batch"]); ap.add_argument("--seq", type=int, default=shape["seq"])
    ap.add_argument("--rank", type=int, default=lora["rank"]); ap.add_argument("--alpha", type=float, default=lora["alpha"])
    ap.add_argument("--steps", type=int, default=3); ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2); ap.add_argument("--seed", type=int, default=WORKLOAD["seed"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
    c = WORKLOAD["presets"][a.preset]
    if a.seq > c["context"]: ap.error(f"--seq {a.seq} is longer than {a.preset}'s context ({c['context']})")
    model = GPT(c, a.classes if a.task == "cls" else 0)
    for p in model.parameters(): p.requires_grad = False
    add_lora(model, a.rank, a.alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opt_spec["lr"], weight_decay=opt_spec["weight_decay"],
                            betas=(opt_spec["beta1"], opt_spec["beta2"]), eps=opt_spec["eps"])
    x = torch.randint(0, c["vocab"], (a.batch, a.seq))
    y = torch.randint(0, a.classes, (a.batch,)) if a.task == "cls" else torch.randint(0, c["vocab"], (a.batch, a.seq))

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = nn.functional.cross_entropy(out[:, -1, :], y) if a.task == "cls" else nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())
        loss.backward(); opt.step()
        return loss.item()

    for _ in range(a.warmup): step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps): step()
    dt, cpu_s = (time.perf_counter() - t0) / a.steps, (time.process_time() - c0) / a.steps
    cpu, flags = cpu_info()
    print(json.dumps(dict(peer="pytorch " + torch.__version__, preset=a.preset, task=a.task, batch=a.batch, seq=a.seq,
                          rank=a.rank, threads=a.threads, step_s=round(dt, 4), cpu_s=round(cpu_s, 3), tokens_per_s=round(a.batch * a.seq / dt, 1),
                          trainable=sum(p.numel() for p in params), total=sum(p.numel() for p in model.parameters()),
                          peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                          cpu=cpu, cpu_flags=" ".join(flags), blas=blas_info(), matmul_gflops=matmul_gflops(),
                          env={k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_WAIT_POLICY") if k in os.environ})))


if __name__ == "__main__":
    main()
