"""Benchmark: how much of the CE-only -> teacher gap KD closes, and a small sweep of the KD settings (issue 19).

    python bench/kd_sweep.py                     # the demo's data, teacher and student; every arm below
    python bench/kd_sweep.py --arms base,T2      # some arms only
    python bench/kd_sweep.py --quick             # tiny sizes, seconds: prints the same lines

The gap share of an arm is ``(CE-only - KD) / (CE-only - teacher)`` on the same held-out batches (the
val split's first ``--eval-batches``): 0 = KD no better than training on the labels alone, 1 = KD
student as good as the teacher. Every arm trains the demo's student (configs/demo.yaml: tiny RetNet,
the demo's steps, batch, learning rates, direct teacher) from the same seed on the same rows; only
the KD knobs change: temperature ``T``, ``alpha`` (weight of the KL term; 1 - alpha weights CE), the
teacher's top-``k`` and the tail treatment. The demo's own setting is the ``base`` arm; the sweep is
a measurement on its own teacher run, not a tuning of the demo to its test; the demo took its best tail setting.

Data and teacher are built as in bench/convert.py (bench/_demo.py), in ``--out`` (default runs/bench_convert: the two
benches share one demo teacher); arms run under ``<out>/kd_sweep/``.

Measured (2026-12-01, 2 shared CPU cores under load 6-13, 1 thread;
``python bench/kd_sweep.py --out runs/exp19b --steps 60 --arms ce,base,T2,alpha0.8``, on the demo corpus
of 4 MB stdlib + 150 retrieval documents (v1), 256-token rows, the demo teacher at 4.240 held-out;
60 steps x 16 rows x 256 tokens = 246k tokens per arm, 8 val batches = 22,569 tokens):

| arm | T | alpha | k | tail | held-out loss | gap share closed by KD |
|---|---:|---:|---:|---|---:|---:|
| ce | - | 0 | - | - | 5.6296 | 0 |
| base | 1.0 | 0.5 | 64 | renormalize | 5.2972 | 0.239 |
| T2 | 2.0 | 0.5 | 64 | renormalize | 5.7204 | -0.065 |
| alpha0.8 | 1.0 | 0.8 | 64 | renormalize | 5.2661 | 0.262 |

Re-measured with the copying demo teacher (2026-12-02, quiet, 2 threads; ``python bench/kd_sweep.py --out /tmp/exp/bc2
--steps 200 --arms ce,base,T2,alpha0.8,alpha1,k16,k256,bucket --threads 2``; teacher 4.0885, CE-only 4.4235):
base 4.4520 (gap share -0.085), T2 5.1563 (-2.19), alpha0.8 4.6624 (-0.71), alpha1 4.9001 (-1.42), k16 4.4808
(-0.17), k256 4.4168 (+0.020), bucket 4.4060 (+0.052). A teacher that copies from context gives soft targets the
tiny RetNet cannot follow: more KL weight hurts; keeping the tail as a bucket helps, so the demo uses ``tail: bucket``
(make demo: KD 4.3967 vs CE-only 4.4188, teacher 4.0418: gap share 0.059). With the pass-key demo teacher
(2026-12-03: 1300 steps, 12 of 16 rows with a pass key; configs/demo.yaml) make demo gives KD 4.2539 vs CE-only
4.4188, teacher 3.2419: gap share 0.140. The sweep on that teacher (2026-12-03, quiet, 2 threads; ``python
bench/kd_sweep.py --out /tmp/kds --steps 200 --arms ce,base,renormalize,T2,alpha0.8,k256 --threads 2`` with the
demo's data and teacher copied into ``/tmp/kds``; teacher 3.2806, CE-only 4.4235 on 8 val batches):

| arm | T | alpha | k | tail | held-out loss | gap share closed by KD | s |
|---|---:|---:|---:|---|---:|---:|---:|
| ce | - | 0 | - | - | 4.4235 | 0.000 | 49 |
| base (the demo) | 1.0 | 0.5 | 64 | bucket | 4.2542 | 0.148 | 83 |
| renormalize | 1.0 | 0.5 | 64 | renormalize | 4.2400 | 0.161 | 77 |
| T2 | 2.0 | 0.5 | 64 | bucket | 4.2286 | 0.171 | 77 |
| alpha0.8 | 1.0 | 0.8 | 64 | bucket | 4.2300 | 0.169 | 72 |
| k256 | 1.0 | 0.5 | 256 | bucket | 4.2320 | 0.168 | 87 |

With a teacher this much better than the students (1.14 nats below CE-only, was 0.33), every KD arm helps and
they sit within 0.025 nats of each other (one seed each: not separable); more KL weight and T 2 no longer hurt.

At 60 steps more KL weight helps a little (alpha 0.8: 0.262 vs 0.239), T = 2 hurts (the T^2-scaled
soft targets of a tiny teacher carry mostly its tail noise early on). (k16, k256, bucket,
alpha1 and the demo's 200 steps: the copying-teacher run above.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

if __package__:  # python -m bench.kd_sweep
    from bench._common import add_threads, bench_parser
else:  # python bench/kd_sweep.py, from any folder: bench/ is sys.path[0]
    from _common import add_threads, bench_parser

# name -> train overrides; "ce" is the CE-only baseline
ARMS: dict[str, dict] = {
    "ce": {"pretrain_ce_only": True},
    "base": {},  # the demo: T 1, alpha 0.5, k 64, tail bucket (renormalize before 2026-12-03: the runs below name it)
    "T2": {"temperature": 2.0},
    "alpha0.8": {"distill_alpha": 0.8},
    "alpha1": {"distill_alpha": 1.0},
    "k16": {"teacher_topk": 16},
    "k256": {"teacher_topk": 256},
    "renormalize": {"tail": "renormalize"},
}


def main() -> int:
    ap = bench_parser(__doc__.split("\n")[0], quick="tiny sizes, seconds")
    ap.add_argument("--config", default="demo.yaml")
    ap.add_argument("--out", default=None, help="default runs/bench_convert (runs/bench_kd_quick with --quick)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {list(ARMS)} (ce and base always run)")
    ap.add_argument("--steps", type=int, default=None, help="student steps (default: the config's train.max_steps)")
    ap.add_argument("--eval-batches", type=int, default=8)
    add_threads(ap)
    a = ap.parse_args()
    import torch  # lazy: --help without torch

    from distill_dag.config import load_config
    from distill_dag.student.run import run_ce_baseline, run_kd_student

    if __package__:  # lazy: --help without torch (_demo imports it); imported as _common is
        from bench._demo import build_demo, quick_overrides, teacher_val_loss, val_batches
    else:
        from _demo import build_demo, quick_overrides, teacher_val_loss, val_batches

    torch.set_num_threads(a.threads)
    out = Path(a.out or ("runs/bench_kd_quick" if a.quick else "runs/bench_convert")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda s: None) if a.quick else (lambda s: print(s, flush=True))

    over = {
        "data": {"root": str(out / "data")},
        "logit_cache": {"dir": str(out / "data" / "logit_cache")},
        "teacher_ft": {"output_dir": str(out / "teacher_ft")},
        "wandb": {"mode": "disabled"},
        "train": {"device": "cpu", "teacher_mode": "direct", "ce_only_baseline": False, "save_interval": 0,
                  "eval_batches": a.eval_batches},
    }
    if a.quick:
        q = quick_overrides(out)
        for k, v in q.items():
            over[k] = {**over.get(k, {}), **v}
    base = load_config(a.config, over)
    if a.steps:
        base.train.max_steps = a.steps
    base.train.eval_interval = base.train.max_steps  # one held-out evaluation, at the end
    build_demo(base, log)
    t_loss = teacher_val_loss(base, val_batches(base))

    names = ["ce", "base"] + [n for n in a.arms.split(",") if n and n not in ("ce", "base")]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    rows: dict[str, dict] = {}
    for name in names:
        cfg = base.model_copy(deep=True)
        for k, v in ARMS[name].items():
            setattr(cfg.train, k, v)
        cfg.train.output_dir = str(out / "kd_sweep" / name)
        t0 = time.time()
        r = (run_ce_baseline if name == "ce" else run_kd_student)(cfg, echo=log)
        rows[name] = {"val_loss": r.val["val_loss"], "seconds": time.time() - t0, "tokens": r.tokens,
                      **{k: getattr(cfg.train, k) for k in ("temperature", "distill_alpha", "teacher_topk", "tail")}}
        log(f"{name}: val {rows[name]['val_loss']:.4f} ({rows[name]['seconds']:.0f}s)")
    ce = rows["ce"]["val_loss"]
    for name, r in rows.items():
        r["gap_share"] = (ce - r["val_loss"]) / (ce - t_loss) if ce != t_loss else float("nan")
    (out / "kd_sweep.json").write_text(json.dumps({"teacher_val_loss": t_loss, "arms": rows}, indent=2))

    print(f"teacher held-out {t_loss:.4f}; CE-only {ce:.4f}; {base.train.max_steps} steps x "
          f"{base.train.batch_size} rows x {base.tokenize.max_seq_length} tokens per arm")
    print("| arm | T | alpha | k | tail | held-out loss | gap share closed by KD | s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, r in rows.items():
        kd = name != "ce"
        print(f"| {name} | {r['temperature'] if kd else '-'} | {r['distill_alpha'] if kd else 0} | "
              f"{r['teacher_topk'] if kd else '-'} | {r['tail'] if kd else '-'} | {r['val_loss']:.4f} | "
              f"{r['gap_share']:.3f} | {r['seconds']:.0f} |")
    best = max((n for n in rows if n != "ce"), key=lambda n: rows[n]["gap_share"])
    print(f"gap_share_base {rows['base']['gap_share']:.3f} gap_share_best {rows[best]['gap_share']:.3f} ({best})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
