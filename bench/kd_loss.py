"""Benchmark: chunked sparse top-k KD loss vs a naive full-vocabulary implementation (forward + backward).

    python bench/kd_loss.py                       # vocab 128256, 4096 tokens, d 1152, k 512
    python bench/kd_loss.py --quick                               # seconds: 256 tokens, vocab 8192, d 64, k 64

Both implementations compute the same loss, alpha * T^2 * sparse KL (renormalised top-k) + (1 - alpha)
* CE, from hidden [N, d] and the LM head [V, d], and produce grads for both (the checked loss values
must agree). The baseline is what one writes without chunking: full logits [N, V], F.cross_entropy,
log_softmax(z / T), gather on the teacher's support, autograd.

Peak memory, measured in the same run for both:
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the step (inputs and weights), in one process.
* CPU: each variant runs in its own fresh subprocess; the kernel's resident-set high-water mark
  (VmHWM in /proc/self/status) is reset by writing "5" to /proc/self/clear_refs after the inputs
  are built, and peak = VmHWM after the steps - VmRSS before them. PyTorch's CPU allocator does not
  cache and glibc serves blocks this large with mmap/munmap, so resident memory follows the live
  tensors; no Python-level tracing (tracemalloc sees none of torch's buffers) is involved.
Time: median wall time of ``--iters`` forward+backward steps after one warm-up step. On CUDA both
variants run in one process one after the other. On the CPU the memory workers only run one step
each, and the times come from one more process that alternates naive and chunked steps (so load
from other processes on a shared machine hits both alike) and also reports process CPU time.
Ratios are chunked / naive: targets are peak memory <= 0.25 and time <= 1.0.

Measured (defaults: 4096 tokens, vocab 128256, d 1152, k 512, chunk 1024, T 2, renormalize):
  H200, torch 2.11, fp32, triton tail:      memory 0.138, time 0.91  (74 vs 82 ms, 1103 vs 8016 MiB)
  H200, bf16 autocast, triton tail:         memory 0.195, time 0.60  (13 vs 22 ms)
  H200, pure bf16, triton tail:             memory 0.165, time 0.62
  H200, fp32 / autocast, torch tail:        memory 0.20 / 0.23, time 1.01 / 1.01
  CPU, 2 cores, quiet, fp32, torch tail:    memory 0.203 (1642 vs 8077 MiB), time 0.62 (14.2 vs 23.1 s; CPU time 0.63)
  CPU, 2 cores shared with other jobs:     time 1.23 (CPU time 1.17): load skews the alternating timer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__:  # python -m bench.kd_loss
    from bench._common import add_json, add_threads, bench_parser, write_json
else:  # python bench/kd_loss.py, from any folder: bench/ is sys.path[0]
    from _common import add_json, add_threads, bench_parser, write_json


def naive_kd_loss(h, W, y, idx, lp, *, temperature, distill_alpha):
    import torch  # lazy: --help without torch
    import torch.nn.functional as F

    z = h @ W.T  # [N, V]
    ce = F.cross_entropy(z.float(), y)
    log_q = torch.log_softmax(z.float() / temperature, -1)
    log_p = torch.log_softmax(lp / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q.gather(1, idx))).sum(-1).mean()
    return distill_alpha * temperature**2 * kl + (1 - distill_alpha) * ce


def make_inputs(a, device):
    import torch  # lazy: --help without torch

    g = torch.Generator().manual_seed(0)
    N, V, d, k = a.tokens, a.vocab, a.dim, a.k
    dt = torch.float32 if a.dtype == "autocast" else getattr(torch, a.dtype)
    h = (torch.randn(N, d, generator=g)).to(device, dt).requires_grad_()
    W = (torch.randn(V, d, generator=g) * d**-0.5).to(device, dt).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(device)
    # distinct ids per row without a [N, V] temporary: an arithmetic progression of step 7 (7 * k < V)
    start = torch.randint(0, V, (N, 1), generator=g)
    idx = ((start + 7 * torch.arange(k)) % V).to(device)
    lp = torch.log_softmax(2 * torch.randn(N, k, generator=g), -1).sort(-1, descending=True).values - 0.05
    return h, W, y, idx, lp.to(device)


def step(variant, inputs, a):
    import torch  # lazy: --help without torch

    from distill_dag.kernels.kd_loss import fused_linear_kd_loss

    h, W, y, idx, lp = inputs
    h.grad = W.grad = None
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=a.dtype == "autocast"):
        if variant == "naive":
            loss = naive_kd_loss(h, W, y, idx, lp, temperature=a.temperature, distill_alpha=a.alpha)
        else:
            loss = fused_linear_kd_loss(h, W, y, idx, lp, temperature=a.temperature, distill_alpha=a.alpha,
                                        tail="renormalize", chunk_tokens=a.chunk, backend=a.backend)[0]
    loss.backward()
    return float(loss.detach())


def _status_kb(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def run_worker(a):
    """One variant in this process (CPU): print a JSON line with peak memory and times."""
    import torch  # lazy: --help without torch; both loaded before the memory baseline below

    import distill_dag.kernels.kd_loss  # noqa: F401

    torch.set_num_threads(a.threads)
    inputs = make_inputs(a, "cpu")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base_kb = _status_kb("VmRSS")
    loss = None
    for _ in range(a.iters + 1):
        loss = step(a.worker, inputs, a)
    peak_kb = _status_kb("VmHWM") - base_kb
    print(json.dumps({"variant": a.worker, "peak_bytes": peak_kb * 1024, "loss": loss}))


def run_time_worker(a):
    """Both variants in this process, steps alternating (CPU timing): wall and process CPU times."""
    import torch  # lazy: --help without torch

    torch.set_num_threads(a.threads)
    inputs = make_inputs(a, "cpu")
    res = {v: {"variant": v, "times_s": [], "cpu_s": [], "loss": None} for v in ("naive", "chunked")}
    for i in range(a.iters + 1):
        for v in ("naive", "chunked") if i % 2 == 0 else ("chunked", "naive"):
            t0, c0 = time.perf_counter(), time.process_time()
            res[v]["loss"] = step(v, inputs, a)
            if i:  # the first round is the warm-up
                res[v]["times_s"].append(time.perf_counter() - t0)
                res[v]["cpu_s"].append(time.process_time() - c0)
    print(json.dumps(res))


def _sub(args):
    proc = subprocess.run([sys.executable, __file__] + args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cpu(a):
    mem_args = _common_args(a)
    mem_args[mem_args.index("--iters") + 1] = "0"  # memory: one step is enough
    out = {v: _sub(["--worker", v] + mem_args) for v in ("naive", "chunked")}
    timed = _sub(["--worker", "time"] + _common_args(a))
    for v in out:
        out[v].update(times_s=timed[v]["times_s"], cpu_s=timed[v]["cpu_s"], loss=timed[v]["loss"])
    return out


def run_cuda(a):
    import torch  # lazy: --help without torch

    dev = torch.device("cuda")
    inputs = make_inputs(a, dev)
    out = {}
    for variant in ("naive", "chunked"):
        step(variant, inputs, a)  # warm-up (Triton compile, cuBLAS handles)
        torch.cuda.synchronize()
        for t in inputs:
            t.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times, loss = [], None
        for _ in range(a.iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step(variant, inputs, a)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[variant] = {"variant": variant, "peak_bytes": torch.cuda.max_memory_allocated() - base,
                        "times_s": times, "loss": loss}
        for t in inputs:
            t.grad = None
    return out


def _common_args(a):
    return ["--vocab", str(a.vocab), "--tokens", str(a.tokens), "--dim", str(a.dim), "--k", str(a.k),
            "--chunk", str(a.chunk), "--temperature", str(a.temperature), "--alpha", str(a.alpha),
            "--iters", str(a.iters), "--threads", str(a.threads), "--backend", a.backend, "--dtype", a.dtype]


def main(argv=None):
    p = bench_parser(__doc__.splitlines()[0], quick="tiny sizes (seconds): 256 tokens, vocab 8192, d 64, k 64, 1 iter")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--iters", type=int, default=2)
    add_threads(p, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "autocast"], default="float32",
                   help="hidden and LM head in fp32 or bf16, or fp32 under bf16 autocast (the trainer's GPU "
                   "setting); the losses are computed in fp32 either way")
    add_json(p, help="also write the result here")
    p.add_argument("--worker", choices=["naive", "chunked", "time"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.vocab, a.dim, a.k, a.chunk, a.iters, a.threads = 256, 8192, 64, 64, 128, 1, min(a.threads, 2)
    if 7 * a.k >= a.vocab:
        p.error("--k must be < vocab / 7 (the synthetic top-k ids are an arithmetic progression of step 7)")
    import torch  # lazy: --help without torch

    if a.worker == "time":
        return run_time_worker(a)
    if a.worker:
        return run_worker(a)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    res = run_cuda(a) if device == "cuda" else run_cpu(a)
    n, c = res["naive"], res["chunked"]
    tol = 1e-3 if a.dtype == "float32" else 1e-2
    if abs(n["loss"] - c["loss"]) > tol * (abs(n["loss"]) + 1):
        raise SystemExit(f"the two implementations disagree: naive {n['loss']} vs chunked {c['loss']}")
    t_n, t_c = statistics.median(n["times_s"]), statistics.median(c["times_s"])
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({a.threads} threads)",
        "shape": {"tokens": a.tokens, "vocab": a.vocab, "dim": a.dim, "k": a.k, "chunk": a.chunk},
        "dtype": a.dtype,
        "backend": a.backend,
        "naive": {"peak_MiB": n["peak_bytes"] / 2**20, "time_s": t_n},
        "chunked": {"peak_MiB": c["peak_bytes"] / 2**20, "time_s": t_c},
        "peak_memory_ratio": c["peak_bytes"] / n["peak_bytes"],
        "time_ratio": t_c / t_n,
        **({"cpu_time_ratio": statistics.median(c["cpu_s"]) / statistics.median(n["cpu_s"])} if "cpu_s" in c else {}),
        "loss": {"naive": n["loss"], "chunked": c["loss"]},
    }
    summary["targets_met"] = summary["peak_memory_ratio"] <= 0.25 and summary["time_ratio"] <= 1.0
    print(json.dumps(summary, indent=2))
    if a.json:
        write_json(a.json, summary)
    return summary


if __name__ == "__main__":
    main()
