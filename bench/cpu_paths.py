"""Three CPU-side settings, each against its default in the same run:

    python bench/cpu_paths.py            # demo shapes, 20 repeats
    python bench/cpu_paths.py --quick    # a few repeats (what the test suite runs)

1. Muon's Newton-Schulz dtype (``train.muon_ns_dtype``): one ``Muon.step`` over the demo student's
   block matrices (the tiny RetNet, vocab 2048) with torch's bf16 iteration vs fp32
   (:class:`distill_dag.training.optim.Muon`). On a CPU without native bf16 the bf16 matmuls are
   emulated; ``cpu native bf16`` says which kind this machine is (``auto`` picks fp32 where it is no).
2. The allocator (:func:`distill_dag.device.keep_freed_memory`): in two fresh processes, one with
   ``DISTILL_DAG_MALLOC=system`` (glibc's defaults), a fresh 32 MiB tensor allocated and filled, and
   the demo's LM head forward + log-softmax + backward at 16 x 256 tokens, vocab 2048.

3. Mixed precision (``train.autocast``): one training step (forward, backward, AdamW) of the demo's
   teacher (tiny Llama, 16 x 256 packed rows, documents restarting in each row) and of the demo's
   student (tiny RetNet, chunked CE), float32 vs bf16 autocast (:func:`distill_dag.device.autocast`).
   ``auto`` turns it on only where ``cpu native bf16`` is yes.
4. The demo teacher finetune's floor (``teacher_ft.max_steps`` steps at the demo shape): its FLOPs
   (``torch.utils.flop_counter``) over this CPU's dense GEMM ceiling (2048^3 in the demo's
   precision), and the step's own matrix products replayed alone, against the demo's 3-minute
   budget: ``ratio matmuls-alone/demo budget`` is the share of the budget the finetune would take
   even if everything but its matmuls were free.

Prints ms of each and the ratios default / ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if __package__:  # python -m bench.cpu_paths
    from bench._common import add_threads, bench_parser
else:  # python bench/cpu_paths.py, from any folder: bench/ is sys.path[0]
    from _common import add_threads, bench_parser


def _best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def muon_step_ms(ns_dtype, repeats: int) -> float:
    import torch  # lazy: --help without torch

    from distill_dag.model.retnet import RetNetForCausalLM
    from distill_dag.model.variants import student_config
    from distill_dag.training.optim import Muon, split_parameters

    torch.manual_seed(0)
    model = RetNetForCausalLM(student_config("tiny", 2048))
    params = [p for _, p in split_parameters(model)["muon"]]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = Muon(params, lr=0.02, ns_dtype=ns_dtype)
    return _best_ms(opt.step, repeats)


def allocator_child(repeats: int) -> dict[str, float]:
    import torch  # lazy: --help without torch

    def alloc():
        torch.empty(8 << 20).fill_(1.0)

    x = torch.randn(4096, 128, requires_grad=True)
    w = torch.randn(2048, 128, requires_grad=True)

    def lm_head():
        (x @ w.T).log_softmax(-1).sum().backward()

    return {"alloc_ms": _best_ms(alloc, repeats * 5), "lm_head_ms": _best_ms(lm_head, repeats)}


def train_step_ms(which: str, precision: str, repeats: int, rows: int) -> float:
    """ms of one training step of the demo teacher or student at ``rows`` x 256 tokens."""
    return _best_ms(train_step(which, precision, rows), repeats)


def train_step(which: str, precision: str, rows: int):
    """One training step (forward, backward, AdamW) of the demo teacher or student at ``rows`` x 256, as a
    function."""
    import torch  # lazy: --help without torch

    from distill_dag.device import autocast
    from distill_dag.model.retnet import RetNetForCausalLM
    from distill_dag.model.variants import student_config
    from distill_dag.teacher.model import build_tiny_teacher
    from distill_dag.training.distributed import StudentLoss

    torch.manual_seed(0)
    T, V = 256, 2048
    ids = torch.randint(4, V, (rows, T), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(100), torch.arange(T - 100)]).expand(rows, T)  # two documents per row
    if which == "teacher":
        model = build_tiny_teacher(V, dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2))
        model.config._attn_implementation = "sdpa"

        def loss():
            return model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
    else:
        model = RetNetForCausalLM(student_config("tiny", V, chunk_size=64))
        wrapped = StudentLoss(model)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, position_ids=pos)

        def loss():
            return wrapped(batch, None, temperature=1.0, distill_alpha=0.0, chunk_tokens=1024).loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cpu = torch.device("cpu")

    def step():
        with autocast(cpu, precision):
            out = loss()
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def gemm_gflops(dtype, repeats: int, n: int = 2048) -> float:
    """This CPU's dense GEMM throughput (n x n x n, ``dtype``, torch's threads): the ceiling for any model."""
    import torch  # lazy: --help without torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best_ms(lambda: torch.mm(a, b), repeats) / 1e6


def teacher_floor(repeats: int) -> None:
    """The demo teacher finetune's compute against the machine's GEMM ceiling: how fast it could ever be here."""
    import torch  # lazy: --help without torch
    from torch.utils.flop_counter import FlopCounterMode

    from distill_dag.config import load_config
    from distill_dag.device import autocast_enabled

    cfg = load_config("demo.yaml")
    ft, T = cfg.teacher_ft, cfg.tokenize.max_seq_length
    precision = "bfloat16" if autocast_enabled(torch.device("cpu"), cfg.train.autocast) else "off"
    step = train_step("teacher", precision, ft.batch_size)
    ms = _best_ms(step, repeats)  # first, before any dispatch mode has run on this model
    with FlopCounterMode(display=False) as fc:
        step()
    step_gflop = fc.get_total_flops() / 1e9
    mm_ms, n_mm = matmuls_alone_ms(step, repeats)
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    peak = gemm_gflops(dtype, repeats)
    total = ft.max_steps * step_gflop
    floor, mm_floor, measured, budget = total / peak, ft.max_steps * mm_ms / 1e3, ft.max_steps * ms / 1e3, 180.0
    print(f"demo teacher finetune (configs/demo.yaml: {ft.max_steps} steps of {ft.batch_size} x {T}, "
          f"autocast {precision}): {step_gflop:.1f} GFLOP per step (FlopCounterMode, forward + backward), "
          f"{total / 1e3:.1f} TFLOP in all")
    print(f"  this CPU's {str(dtype).split('.')[-1]} GEMM ceiling (2048^3, {torch.get_num_threads()} threads): "
          f"{peak:.0f} GFLOP/s; the teacher's step: {ms:.1f} ms = {step_gflop / ms * 1e3:.0f} GFLOP/s "
          f"({step_gflop / ms * 1e3 / peak:.0%} of the ceiling)")
    print(f"  the step's own {n_mm} matmuls (forward + backward), replayed bare at their shapes: {mm_ms:.1f} ms "
          f"({mm_ms / ms:.0%} of the step)")
    print(f"  teacher finetune >= {floor:.0f} s at the 2048^3 ceiling, >= {mm_floor:.0f} s for its matmuls alone, "
          f"{measured:.0f} s at the measured step: ratio matmuls-alone/demo budget ({budget:.0f} s) "
          f"{mm_floor / budget:.2f}, measured/budget {measured / budget:.2f}")


def matmuls_alone_ms(step, repeats: int) -> tuple[float, int]:
    """ms of the matrix products one call of ``step`` makes (mm, addmm, bmm: forward and backward), replayed
    back to back on fresh tensors of the same sizes, strides and dtypes: what the step costs with everything
    else (attention softmax, norms, elementwise, optimizer, autograd bookkeeping) free."""
    import torch  # lazy: --help without torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    calls: list = []

    def like(t: torch.Tensor) -> torch.Tensor:
        """Random values in ``t``'s size, stride and dtype (storage as large as the strides reach)."""
        reach = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return torch.randn(reach).to(t.dtype).as_strided(t.shape, t.stride())

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in ops:
                calls.append((func, [like(a) if isinstance(a, torch.Tensor) else a for a in args], kwargs))
            return func(*args, **kwargs)

    with Record():
        step()

    def run():
        for f, args, kw in calls:
            f(*args, **kw)

    return _best_ms(run, repeats), len(calls)


def main() -> None:
    ap = bench_parser(__doc__.split("\n")[0], quick="a few repeats (seconds)")
    ap.add_argument("--repeats", type=int, default=20)
    add_threads(ap, help="torch threads (the demo's lanes run one each)")
    ap.add_argument("--allocator-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    import torch  # lazy: --help without torch

    # importing distill_dag applies keep_freed_memory unless DISTILL_DAG_MALLOC=system (what the allocator child compares)
    from distill_dag.device import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    if args.allocator_child:
        print(json.dumps(allocator_child(repeats)))
        return

    print(f"threads {args.threads}, repeats {repeats}; cpu native bf16: {'yes' if cpu_has_native_bf16() else 'no'}")
    bf16 = muon_step_ms(torch.bfloat16, repeats)
    fp32 = muon_step_ms(torch.float32, repeats)
    print(f"Muon.step, demo student's block matrices: bf16 (torch's) {bf16:.1f} ms, fp32 {fp32:.1f} ms: "
          f"ratio bf16/fp32 {bf16 / fp32:.2f}")

    def child(env_extra: dict[str, str]) -> dict[str, float]:
        env = dict(os.environ, **env_extra)
        argv = [sys.executable, os.path.abspath(__file__), "--allocator-child", "--repeats", str(repeats),
                "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    base = child({"DISTILL_DAG_MALLOC": "system"})
    ours = child({"DISTILL_DAG_MALLOC": ""})
    for key, what in (("alloc_ms", "32 MiB empty + fill_"), ("lm_head_ms", "LM head fwd + log_softmax + bwd, 4096 x 2048")):
        print(f"{what}: glibc default {base[key]:.2f} ms, keep_freed_memory {ours[key]:.2f} ms: "
              f"ratio default/ours {base[key] / ours[key]:.2f}")

    rows = 4 if args.quick else 16
    for which in ("teacher", "student"):
        fp32 = train_step_ms(which, "off", repeats, rows)
        bf16 = train_step_ms(which, "bfloat16", repeats, rows)
        print(f"{which} training step, demo shape {rows} x 256: fp32 {fp32:.1f} ms, bf16 autocast {bf16:.1f} ms: "
              f"ratio fp32/bf16 {fp32 / bf16:.2f}")
    teacher_floor(repeats)


if __name__ == "__main__":
    main()
