"""Benchmark: RetNet retention forms (ratios measured in one run).

    python bench/retention.py                         # CPU: training scaling + generation (several minutes)
    python bench/retention.py --quick                 # seconds: lengths 256/512, contexts 128/512, 8 decode tokens
    python bench/retention.py --gpu --json out.json   # GPU: Triton vs PyTorch chunkwise (vs fla) + correctness

CPU, training: forward + backward of a ``tiny``-width RetNet (d 128, 2 layers, 4 heads, vocab 512 so the
LM head does not hide the retention) at sequence lengths 512 .. 16384, chunkwise vs parallel. Each point
runs in a fresh subprocess: time = median of ``--iters`` steps after a warm-up; peak memory = the resident
high-water mark (VmHWM, reset through /proc/self/clear_refs after the model and inputs exist) minus the
resident size before the steps. Targets: chunkwise time(16384) / time(1024) <= 20 (linear is 16) and
memory growing linearly; parallel shows its quadratic curve (it stops at ``--parallel-max``, 4096 by
default: its [B, H, T, T] mask alone is 4 GiB at 16384).

CPU, generation: per-token decode latency (median of ``--decode-tokens`` steps, measured round-robin
across contexts and models so a shared machine's load changes hit every cell alike) and the size of the
generation state at contexts 1k and 32k, RetNet (recurrent state) beside a same-width ``LlamaForCausalLM``
with a KV cache (d 128, 2 layers, 4 heads, gated FFN 256). The RetNet context is a real chunkwise
prefill; the Llama cache is filled with random keys/values of the context's length, since a decode
step's cost depends only on that length (a real 32k prefill would take minutes on two cores and
measure nothing more). Target: RetNet latency(32k) / latency(1k) <= 1.2.

GPU (``--gpu``): tokens/s of retention forward + backward for the ``500M`` head shape (10 heads, key dim
128, value dim 256) in bf16 at 4k and 16k tokens per row (16k tokens per step), Triton kernel vs PyTorch
chunkwise (and flash-linear-attention's chunk_retention when installed); then the whole 500M student,
forward + backward under bf16 autocast at 4k and 16k, per backend; and the Triton kernel's error against
the parallel reference in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the imports themselves are in the functions (--help without torch)
    import torch

if __package__:  # python -m bench.retention
    from bench._common import add_json, add_threads, bench_parser, write_json
else:  # python bench/retention.py, from any folder: bench/ is sys.path[0]
    from _common import add_json, add_threads, bench_parser, write_json

VOCAB = 512


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tiny_retnet(vocab: int = VOCAB, **overrides):
    import torch  # lazy: --help without torch

    from distill_dag.model.retnet import RetNetForCausalLM
    from distill_dag.model.variants import student_config

    torch.manual_seed(0)
    return RetNetForCausalLM(student_config("tiny", vocab, **overrides))


# ---------------------------------------------------------------------------------------------
# CPU: training scaling (one subprocess per point)
# ---------------------------------------------------------------------------------------------
def worker_train(mode: str, T: int, iters: int, chunk_size: int) -> dict:
    import torch  # lazy: --help without torch

    model = tiny_retnet(retention_mode=mode, chunk_size=chunk_size, retention_backend="torch")
    x = torch.randint(0, VOCAB, (1, T))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x).loss
        loss.backward()

    rss0 = _status_kb("VmRSS")
    _reset_hwm()
    step()  # warm-up (also the memory peak: every step is the same)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status_kb("VmHWM") - rss0
    return {"mode": mode, "T": T, "time_s": statistics.median(times), "peak_mb": peak / 1024}


def run_worker(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_training(lengths: list[int], parallel_max: int, iters: int, chunk_size: int) -> dict:
    import torch  # lazy: --help without torch

    rows = []
    print(f"\n== training: tiny RetNet fwd+bwd, batch 1, vocab {VOCAB}, chunk {chunk_size} (CPU, {torch.get_num_threads()} threads)")
    print(f"{'T':>6} | {'chunkwise s':>11} {'peak MB':>9} | {'parallel s':>10} {'peak MB':>9}")
    for T in lengths:
        common = ["--T", str(T), "--iters", str(iters), "--chunk-size", str(chunk_size), "--threads", str(torch.get_num_threads())]
        c = run_worker(["--worker", "train", "--mode", "chunkwise", *common])
        p = run_worker(["--worker", "train", "--mode", "parallel", *common]) if T <= parallel_max else None
        rows.append({"T": T, "chunkwise": c, "parallel": p})
        ptxt = f"{p['time_s']:>10.3f} {p['peak_mb']:>9.1f}" if p else f"{'skipped':>10} {'(T^2)':>9}"
        print(f"{T:>6} | {c['time_s']:>11.3f} {c['peak_mb']:>9.1f} | {ptxt}", flush=True)
    out = {"rows": rows}
    by_t = {r["T"]: r for r in rows}
    hi = max(lengths)
    lo = 1024 if 1024 in by_t and hi > 1024 else min(lengths)
    if lo in by_t and hi != lo:
        n = hi / lo
        tr = by_t[hi]["chunkwise"]["time_s"] / by_t[lo]["chunkwise"]["time_s"]
        mr = by_t[hi]["chunkwise"]["peak_mb"] / by_t[lo]["chunkwise"]["peak_mb"]
        out["chunkwise_time_ratio"] = tr
        out["chunkwise_mem_ratio"] = mr
        print(f"chunkwise time({hi})/time({lo}) = {tr:.2f}  (linear {n:.0f}, target <= {n * 1.25:.0f})")
        print(f"chunkwise peak({hi})/peak({lo}) = {mr:.2f}  (linear {n:.0f})")
    par = [r for r in rows if r["parallel"]]
    if len(par) >= 2:
        a, b = par[0], par[-1]
        n = b["T"] / a["T"]
        tr = b["parallel"]["time_s"] / a["parallel"]["time_s"]
        mr = b["parallel"]["peak_mb"] / a["parallel"]["peak_mb"]
        out["parallel_time_ratio"], out["parallel_mem_ratio"] = tr, mr
        print(f"parallel  time({b['T']})/time({a['T']}) = {tr:.2f}, peak ratio = {mr:.2f}  (linear {n:.0f}, quadratic {n * n:.0f})")
    return out


# ---------------------------------------------------------------------------------------------
# CPU: generation latency / state size
# ---------------------------------------------------------------------------------------------
def _cache_bytes(cache) -> int:
    import torch  # lazy: --help without torch

    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        for t in (getattr(layer, "recurrent_states", None) or {}).values():
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _decode_step(model, cache, pos: int, tok: torch.Tensor) -> tuple[float, torch.Tensor]:
    import torch  # lazy: --help without torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(tok, position_ids=torch.tensor([[pos]]), cache=cache, use_cache=True)
        sec = time.perf_counter() - t0
    return sec, out.logits[:, -1:].argmax(-1)


def bench_generation(contexts: list[int], decode_tokens: int) -> dict:
    import torch  # lazy: --help without torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from distill_dag.model.retnet import RetNetCache

    retnet = tiny_retnet(retention_backend="torch").eval()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=256, max_position_embeddings=max(contexts) + decode_tokens + 8, tie_word_embeddings=True,
        )
    ).eval()
    states = {}
    for L in contexts:
        cache = RetNetCache(retnet.config)
        with torch.no_grad():
            for s in range(0, L, 8192):  # chunkwise prefill, in pieces to bound the logits' memory
                e = min(L, s + 8192)
                retnet(torch.randint(0, VOCAB, (1, e - s)), position_ids=torch.arange(s, e)[None], cache=cache, use_cache=True, logits_to_keep=1)
        kv = DynamicCache(config=llama.config)
        g = torch.Generator().manual_seed(0)
        for i in range(llama.config.num_hidden_layers):
            kv.update(torch.randn(1, 4, L, 32, generator=g), torch.randn(1, 4, L, 32, generator=g), i)
        states[L] = {"retnet": cache, "llama": kv, "bytes": (_cache_bytes(cache), _cache_bytes(kv))}
    # Round-robin over contexts and models, so load changes on a shared machine hit every cell alike.
    times = {(L, name): [] for L in contexts for name in ("retnet", "llama")}
    toks = {key: torch.randint(0, VOCAB, (1, 1)) for key in times}
    for i in range(decode_tokens + 2):
        for L in contexts:
            for name, model in (("retnet", retnet), ("llama", llama)):
                sec, toks[(L, name)] = _decode_step(model, states[L][name], L + i, toks[(L, name)])
                if i >= 2:  # two warm-up steps
                    times[(L, name)].append(sec)
    rows = []
    print(f"\n== generation: per-token decode latency (median of {decode_tokens}) and state size, batch 1 (CPU, {torch.get_num_threads()} threads)")
    print(f"{'context':>8} | {'RetNet ms/tok':>13} {'state KB':>9} | {'Llama ms/tok':>12} {'KV cache KB':>12}")
    for L in contexts:
        r_ms = statistics.median(times[(L, "retnet")]) * 1e3
        l_ms = statistics.median(times[(L, "llama")]) * 1e3
        r_bytes = _cache_bytes(states[L]["retnet"])
        l_bytes = _cache_bytes(states[L]["llama"])
        rows.append({"context": L, "retnet_ms": r_ms, "retnet_state_bytes": r_bytes, "llama_ms": l_ms, "llama_kv_bytes": l_bytes})
        print(f"{L:>8} | {r_ms:>13.3f} {r_bytes / 1024:>9.1f} | {l_ms:>12.3f} {l_bytes / 1024:>12.1f}", flush=True)
    a, b = rows[0], rows[-1]
    out = {
        "rows": rows,
        "retnet_latency_ratio": b["retnet_ms"] / a["retnet_ms"],
        "llama_latency_ratio": b["llama_ms"] / a["llama_ms"],
        "retnet_state_ratio": b["retnet_state_bytes"] / a["retnet_state_bytes"],
        "llama_kv_ratio": b["llama_kv_bytes"] / a["llama_kv_bytes"],
    }
    print(
        f"latency({b['context']})/latency({a['context']}): RetNet {out['retnet_latency_ratio']:.2f} (target <= 1.2), "
        f"Llama {out['llama_latency_ratio']:.2f}; state size ratio: RetNet {out['retnet_state_ratio']:.2f}, "
        f"Llama KV {out['llama_kv_ratio']:.2f}"
    )
    return out


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
def _cuda_time(fn, iters: int) -> float:
    import torch  # lazy: --help without torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def bench_gpu(iters: int) -> dict:
    import torch  # lazy: --help without torch

    from distill_dag.kernels.retention import decay_log_gammas, retention, retention_parallel
    from distill_dag.model.retnet import RetNetForCausalLM
    from distill_dag.model.variants import student_config

    dev = torch.device("cuda")
    print(f"\n== GPU: {torch.cuda.get_device_name(0)}")
    H, K, V = 10, 128, 256  # the 500M student's heads
    backends = ["torch", "triton"] + (["fla"] if importlib.util.find_spec("fla") else [])
    out: dict = {"device": torch.cuda.get_device_name(0), "kernel": [], "model": [], "errors": {}}

    # correctness first: Triton vs the parallel reference, with document resets and an initial state
    g = torch.Generator().manual_seed(0)
    T = 1000
    q, k, v = (torch.randn(2, T, H, d, generator=g).to(dev) for d in (K, K, V))
    k = k * K**-0.5
    h0 = torch.randn(2, H, K, V, generator=g).to(dev)
    reset = torch.zeros(2, T, dtype=torch.bool, device=dev)
    reset[:, [0, 100, 457, 640]] = True
    ld = decay_log_gammas(H, dev)
    for dt in (torch.float32, torch.bfloat16):
        leaves = [x.to(dt).clone().requires_grad_(True) for x in (q, k, v)]
        o, S = retention(*leaves, ld, reset, h0, True, 64, "triton")
        do = torch.randn_like(o, dtype=torch.float32)
        (o.float() * do).sum().add((S * S).sum()).backward()
        got = [o.float(), S] + [x.grad.float() for x in leaves]
        refl = [x.detach().to(dt).float().requires_grad_(True) for x in (q, k, v)]
        o_r, S_r = retention_parallel(*refl, ld, reset, h0, True)
        (o_r * do).sum().add((S_r * S_r).sum()).backward()
        ref = [o_r, S_r] + [x.grad for x in refl]
        errs = {n: ((a - b).abs().max() / b.abs().max()).item() for n, a, b in zip(["o", "S", "dq", "dk", "dv"], got, ref)}
        out["errors"][str(dt)] = errs
        print(f"triton vs parallel reference ({dt}): " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))

    print(f"\nretention fwd+bwd, 500M heads (H {H}, K {K}, V {V}), bf16, 16k tokens per step")
    print(f"{'T':>6} {'B':>3} | " + " | ".join(f"{b:>14}" for b in backends))
    for T in (4096, 16384):
        B = 16384 // T
        q, k, v = (torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16) * (K**-0.5 if d == K else 1) for d in (K, K, V))
        do = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)
        row = {"T": T, "B": B}
        for be in backends:
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

            def step():
                o, _ = retention(*leaves, ld, None, None, False, 64, be)
                o.backward(do)

            try:
                torch.cuda.reset_peak_memory_stats()
                sec = _cuda_time(step, iters)
                row[be] = {"tokens_per_s": B * T / sec, "ms": sec * 1e3, "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
            except Exception as err:  # a backend that cannot run this shape is reported, not fatal
                row[be] = {"error": f"{type(err).__name__}: {err}"[:200]}
        out["kernel"].append(row)
        cells = [f"{row[b]['tokens_per_s'] / 1e6:>9.2f} Mtok/s" if "tokens_per_s" in row[b] else f"{'failed':>14}" for b in backends]
        print(f"{T:>6} {B:>3} | " + " | ".join(cells), flush=True)

    print("\n500M student fwd+bwd (bf16 autocast, fp32 weights), batch 1")
    model = RetNetForCausalLM(student_config("500M", 128256)).to(dev)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for T in (4096, 16384):
        x = torch.randint(0, 128256, (1, T), device=dev)
        row = {"T": T}
        for be in ["torch", "triton"]:
            model.config.retention_backend = be

            def step():
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    h = model.model(x).last_hidden_state
                h.float().square().mean().backward()  # the LM head + loss are the trainer's (chunked) business

            try:
                torch.cuda.reset_peak_memory_stats()
                sec = _cuda_time(step, max(2, iters // 2))
                row[be] = {"tokens_per_s": T / sec, "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
            except Exception as err:
                row[be] = {"error": f"{type(err).__name__}: {err}"[:200]}
        out["model"].append(row)
        print(f"T {T:>6}: " + ", ".join(
            f"{be} {row[be]['tokens_per_s'] / 1e3:.1f} ktok/s ({row[be]['peak_gb']:.1f} GB)" if "tokens_per_s" in row[be] else f"{be} failed: {row[be]['error']}"
            for be in ("torch", "triton")
        ), flush=True)
    return out


def main() -> int:
    ap = bench_parser(__doc__.splitlines()[0], quick="tiny sizes (seconds): lengths 256 and 512, contexts 128 and 512")
    ap.add_argument("--gpu", action="store_true", help="GPU benchmark (Triton vs PyTorch chunkwise, fla)")
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--parallel-max", type=int, default=4096)
    ap.add_argument("--contexts", default="1024,32768")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-generation", action="store_true")
    add_json(ap)
    add_threads(ap, help="torch CPU threads (default 1: on a shared 2-core box two OpenMP threads spin on each "
                         "other's barriers)")
    # internal: one measurement in a fresh process
    ap.add_argument("--worker", choices=["train"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="chunkwise", help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch  # lazy: --help without torch

    torch.set_num_threads(args.threads)

    if args.worker == "train":
        print(json.dumps(worker_train(args.mode, args.T, args.iters, args.chunk_size)))
        return 0
    results: dict = {}
    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu: CUDA is not available on this machine", file=sys.stderr)
            return 2
        results["gpu"] = bench_gpu(max(args.iters, 5))
    else:
        lengths = [256, 512] if args.quick else [int(x) for x in args.lengths.split(",")]
        contexts = [128, 512] if args.quick else [int(x) for x in args.contexts.split(",")]
        if args.quick:
            args.parallel_max, args.decode_tokens, args.iters = min(args.parallel_max, 512), 8, 1
        if not args.skip_training:
            results["training"] = bench_training(lengths, args.parallel_max, args.iters, args.chunk_size)
        if not args.skip_generation:
            results["generation"] = bench_generation(contexts, args.decode_tokens)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
