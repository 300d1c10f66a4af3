"""Direct-mode training throughput on a GPU: the trainer's tokens/s at real shapes, against the seed's way in the
same run.

A Llama-3.2-1B-shaped teacher (bf16, SDPA, or flash-attn when installed; top-k 512 in fp32 log-probs) and the 500M
RetNet student (bf16 autocast, Triton retention, chunked sparse KD, clip + Muon/AdamW), one training step in this
process, at seq 1k (16 x 1024) and 4k (4 x 4096): tokens/s, split into the teacher's top-k, the student's
forward + backward and the optimizer step, and the tokens/s at grad_accum 8 (``configs/train_direct.yaml``); the
hybrid student (every 4th layer softmax attention) at the same shapes; the seed's way (fp32 teacher, full
[tokens, V] logits, full-vocabulary KL through autograd); then fla's ``chunk_retention`` vs our Triton kernel at
the 500M head shape. Goal: >= 40k tokens/s at seq 1k.

    python bench/gpu_throughput.py --json out.json   # on a GPU: bash bench/gpu_check.sh runs it on a lent one
    python bench/gpu_throughput.py --quick           # toy shapes: the same code on the CPU, seconds

Its CPU counterpart, peak memory at these shapes through the real CLI, is bench/memory_shapes.py.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from typing import Any

if __package__:  # python -m bench.gpu_throughput
    from bench._common import LLAMA_3_2_1B, LLAMA_TINY, GiB, add_json, bench_parser, write_json
else:  # python bench/gpu_throughput.py, from any folder: bench/ is sys.path[0]
    from _common import LLAMA_3_2_1B, LLAMA_TINY, GiB, add_json, bench_parser, write_json


def _sync(dev: Any) -> None:
    import torch  # lazy: --help without torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, dev: Any, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def packed_batch(B: int, T: int, vocab: int, dev: Any, seed: int = 0) -> dict[str, Any]:
    """Random ids in packed rows (2-4 documents per row, position_ids restarting at each), all scored."""
    import torch  # lazy: --help without torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    pos = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        cuts = sorted(torch.randint(1, T, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist())
        starts = [0, *cuts]
        for s0, s1 in zip(starts, [*cuts, T]):
            pos[b, s0:s1] = torch.arange(s1 - s0)
    return {"input_ids": ids.to(dev), "position_ids": pos.to(dev), "labels": ids.clone().to(dev),
            "attention_mask": torch.ones(B, T, dtype=torch.long, device=dev)}


def gpu_throughput(a: argparse.Namespace) -> dict[str, Any]:
    """Direct-mode training tokens/s, the trainer's way (bf16 teacher top-k k=512 in fp32 log-probs, 500M
    student under bf16 autocast with Triton retention, chunked sparse KD, Muon + AdamW step), against the
    seed's way (fp32 teacher, full [tokens, V] logits, full-vocabulary KL through autograd), at seq 1k and
    4k; then fla's chunk_retention vs our Triton kernel at the 500M head shape. CUDA when present; on the
    CPU (--quick) the same code runs at toy shapes (PyTorch retention, no autocast, fla skipped)."""
    import torch  # lazy: --help without torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill_dag.config import StudentConfig, TrainConfig
    from distill_dag.kernels.retention import decay_log_gammas, retention
    from distill_dag.model.variants import build_student
    from distill_dag.teacher.model import attn_implementation
    from distill_dag.teacher.providers.direct import DirectTeacher
    from distill_dag.training.distributed import StudentLoss, clip_grad_norm
    from distill_dag.training.optim import build_optimizers

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    arch = LLAMA_TINY if a.quick else LLAMA_3_2_1B
    V = arch["vocab_size"]
    variant = "tiny" if a.quick else "500M"
    shapes = [(64, 2), (128, 1)] if a.quick else [(1024, 16), (4096, 4)]  # 16k tokens per step either way
    warmup, iters = (1, 2) if a.quick else (2, 4)
    tcfg = TrainConfig(teacher_topk=a.k, temperature=2.0, distill_alpha=0.5, loss_chunk_tokens=a.loss_chunk_tokens)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                           "attn": attn_implementation(), "variant": variant, "rows": [], "retention": []}
    print(f"== direct-mode throughput on {out['device']} (torch {torch.__version__}, teacher attention "
          f"{out['attn']}, student {variant}, k {a.k}, vocab {V})", flush=True)

    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(dev):
        teacher = LlamaForCausalLM._from_config(LlamaConfig(**arch), dtype=torch.bfloat16 if cuda else torch.float32,
                                                attn_implementation=attn_implementation())
    teacher.eval().requires_grad_(False)
    direct = DirectTeacher(teacher, a.k, dev)
    student = build_student(StudentConfig(variant=variant, retention_backend="auto"), V).to(dev).train()
    loss_mod = StudentLoss(student)
    opt = build_optimizers(student, tcfg)
    print(f"  built teacher + student in {time.time() - t0:.0f} s", flush=True)

    def micro(batch: dict[str, Any]) -> None:  # one micro-batch of the trainer's train_step
        topk = direct.topk(batch)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            o = loss_mod(batch, topk, temperature=tcfg.temperature, distill_alpha=tcfg.distill_alpha,
                         tail=tcfg.tail, chunk_tokens=tcfg.loss_chunk_tokens)
        o.loss.backward()

    def ours(batch: dict[str, Any]) -> None:  # train_step (grad_accum 1) + OptimizerStep
        micro(batch)
        clip_grad_norm(student, tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def seed_way(batch: dict[str, Any], teacher32: Any) -> None:  # full logits, full-vocabulary KL, fp32 teacher
        T_ = tcfg.temperature
        with torch.no_grad():
            t_logits = teacher32(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                 use_cache=False).logits.float()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            s_logits = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
        s, t, y = s_logits[:, :-1], t_logits[:, :-1], batch["labels"][:, 1:]
        kl = F.kl_div(F.log_softmax(s / T_, -1).flatten(0, 1), F.log_softmax(t / T_, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean") * T_ * T_
        ce = F.cross_entropy(s.flatten(0, 1), y.flatten())
        (tcfg.distill_alpha * kl + (1 - tcfg.distill_alpha) * ce).backward()
        clip_grad_norm(student, tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def student_only(batch: dict[str, Any], topk: Any) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            o = loss_mod(batch, topk, temperature=tcfg.temperature, distill_alpha=tcfg.distill_alpha,
                         tail=tcfg.tail, chunk_tokens=tcfg.loss_chunk_tokens)
        o.loss.backward()
        opt.zero_grad(set_to_none=True)

    def measure(fn: Any) -> dict[str, Any]:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            sec = _timed(fn, dev, warmup, iters)
        except torch.OutOfMemoryError as err:
            return {"error": f"OOM: {str(err)[:120]}"}
        return {"s": sec, "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None}

    for T, B in shapes:
        batch = packed_batch(B, T, V, dev)
        n = B * T
        row: dict[str, Any] = {"seq": T, "batch": B, "tokens": n}
        row["micro"] = measure(lambda: micro(batch))  # gradients accumulate, as under grad_accum
        opt.zero_grad(set_to_none=True)
        row["ours"] = measure(lambda: ours(batch))
        if "s" in row["micro"] and "s" in row["ours"]:
            t_opt = max(row["ours"]["s"] - row["micro"]["s"], 0.0)  # clip + Muon/AdamW step
            row["optimizer_s"] = t_opt
            row["tokens_per_s_accum8"] = 8 * n / (8 * row["micro"]["s"] + t_opt)  # configs/train_direct.yaml
        row["teacher_topk"] = measure(lambda: direct.topk(batch))
        topk = direct.topk(batch)
        row["student_step"] = measure(lambda: student_only(batch, topk))
        out["rows"].append(row)
        fmt = lambda r: (f"{n / r['s']:,.0f} tok/s ({r['s'] * 1e3:.0f} ms" + (  # noqa: E731
            f", peak {r['peak_gib']:.1f} GiB)" if r.get("peak_gib") is not None else ")")) if "s" in r else r["error"]
        acc = (f"; optimizer step {row['optimizer_s'] * 1e3:.0f} ms, so with grad_accum 8 (train_direct.yaml) "
               f"{row['tokens_per_s_accum8']:,.0f} tok/s") if "optimizer_s" in row else ""
        print(f"  seq {T} x {B}: ours (grad_accum 1) {fmt(row['ours'])}; micro-batch alone {fmt(row['micro'])}{acc}; "
              f"teacher top-k alone {fmt(row['teacher_topk'])}; student fwd+bwd alone {fmt(row['student_step'])}",
              flush=True)
    # the hybrid student (issue 34): the same 500M student with every 4th layer softmax attention (flash-attn on
    # CUDA when installed, else SDPA), trained the same way at the same shapes
    depth = student.config.num_hidden_layers
    hyb_layers = list(range(3, depth, 4)) or [depth - 1]
    hybrid = build_student(StudentConfig(variant=variant, retention_backend="auto", attention_layers=hyb_layers),
                           V).to(dev).train()
    h_loss, h_opt = StudentLoss(hybrid), build_optimizers(hybrid, tcfg)

    def hybrid_step(batch: dict[str, Any]) -> None:
        topk = direct.topk(batch)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            o = h_loss(batch, topk, temperature=tcfg.temperature, distill_alpha=tcfg.distill_alpha,
                       tail=tcfg.tail, chunk_tokens=tcfg.loss_chunk_tokens)
        o.loss.backward()
        clip_grad_norm(hybrid, tcfg.grad_clip)
        h_opt.step()
        h_opt.zero_grad(set_to_none=True)

    out["hybrid_layers"] = hyb_layers
    for row in out["rows"]:
        batch = packed_batch(row["batch"], row["seq"], V, dev)
        row["hybrid"] = h = measure(lambda: hybrid_step(batch))
        o = row["ours"]
        ratio = f"; ratio hybrid/pure {o['s'] / h['s']:.2f}" if "s" in h and "s" in o else ""
        print(f"  seq {row['seq']} x {row['batch']}: hybrid student (attention layers {hyb_layers}) "
              + (f"{row['tokens'] / h['s']:,.0f} tok/s ({h['s'] * 1e3:.0f} ms"
                 + (f", peak {h['peak_gib']:.1f} GiB)" if h.get("peak_gib") is not None else ")")
                 if "s" in h else h["error"]) + ratio, flush=True)
    del hybrid, h_loss, h_opt
    del direct
    teacher32 = copy.deepcopy(teacher).float()
    del teacher
    if cuda:
        torch.cuda.empty_cache()
    for row in out["rows"]:
        batch = packed_batch(row["batch"], row["seq"], V, dev)
        row["seed"] = measure(lambda: seed_way(batch, teacher32))
        r, o = row["seed"], row["ours"]
        ratio = f"; ours (grad_accum 1) is {r['s'] / o['s']:.2f}x its speed" if "s" in r and "s" in o else ""
        print(f"  seq {row['seq']} x {row['batch']}: seed's way (fp32 teacher, full-vocab KL) "
              + (f"{row['tokens'] / r['s']:,.0f} tok/s ({r['s'] * 1e3:.0f} ms"
                 + (f", peak {r['peak_gib']:.1f} GiB)" if r.get("peak_gib") is not None else ")")
                 if "s" in r else r["error"]) + ratio, flush=True)
    del teacher32, student, opt, loss_mod
    if cuda:
        torch.cuda.empty_cache()

    # retention kernels alone: fla's chunk_retention vs ours, the 500M student's heads
    H, K, Vh = (4, 32, 64) if a.quick else (10, 128, 256)
    backends = ["triton"] if cuda else ["torch"]
    if cuda and importlib.util.find_spec("fla") is not None:
        backends.append("fla")
    elif cuda:
        print("  fla not installed: carry its wheel (bash bench/gpu_check.sh --prepare)")
    ld = decay_log_gammas(H, dev)
    dt = torch.bfloat16 if cuda else torch.float32
    for T, B in shapes:
        q, k, v = (torch.randn(B, T, H, d, device=dev, dtype=dt) * (K**-0.5 if d == K else 1.0) for d in (K, K, Vh))
        do = torch.randn(B, T, H, Vh, device=dev, dtype=dt)
        row = {"seq": T, "batch": B}
        for be in backends:
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

            def step() -> None:
                o, _ = retention(*leaves, ld, None, None, False, 64, be)
                o.backward(do)

            try:
                row[be] = B * T / _timed(step, dev, warmup, iters * 2)
            except Exception as err:  # noqa: BLE001 - a backend that cannot run is reported
                row[be] = f"{type(err).__name__}: {str(err)[:120]}"
        out["retention"].append(row)
        cells = [f"{be} {row[be]:,.0f} tok/s" if isinstance(row[be], float) else f"{be} {row[be]}" for be in backends]
        if "fla" in row and isinstance(row.get("fla"), float) and isinstance(row.get("triton"), float):
            cells.append(f"triton / fla {row['triton'] / row['fla']:.2f}x")
        print(f"  retention fwd+bwd, H {H} K {K} V {Vh}, {dt}, seq {T} x {B}: " + ", ".join(cells), flush=True)
    return out


def main() -> int:
    ap = bench_parser(__doc__.splitlines()[0], quick="toy shapes, the same code (on the CPU without CUDA), seconds")
    ap.add_argument("--k", type=int, default=512, help="teacher top-k (train.teacher_topk)")
    ap.add_argument("--loss-chunk-tokens", type=int, default=1024, help="train.loss_chunk_tokens")
    add_json(ap, help="write every number here")
    a = ap.parse_args()
    res = gpu_throughput(a)
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
