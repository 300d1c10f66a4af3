"""`distill --help` and `distill <verb> --help` start-up time, against `python -c pass` measured in the
same run (issue 17: under 1.5 s; torch and transformers must not be imported for --help).

    python bench/cli_startup.py            # every verb, 5 runs each
    python bench/cli_startup.py --quick    # distill --help and distill train --help, 3 runs each

Prints, per command, the median wall time and the median CPU time (user + sys of the child: on a
loaded machine wall time includes waiting for a core, CPU time does not), and both as a ratio to the
baseline. It also checks that `--help` imports neither torch nor transformers.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__:  # python -m bench.cli_startup
    from bench._common import bench_parser
else:  # python bench/cli_startup.py, from any folder: bench/ is sys.path[0]
    from _common import bench_parser

TARGET_S = 1.5


def _distill() -> list[str]:
    exe = Path(sys.executable).with_name("distill")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "distill_dag.cli"]


def _time(cmd: list[str], runs: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(runs):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=os.getcwd())
        walls.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    return statistics.median(walls), statistics.median(cpus)


def _heavy_imports() -> list[str]:
    code = ("import contextlib, io, sys; from distill_dag.cli import build_parser\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        build_parser().parse_args(['train', '--help'])\n    except SystemExit:\n        pass\n"
            "print('HEAVY:' + ','.join(m for m in ('torch', 'transformers', 'dagster', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("HEAVY:")][-1]
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def main() -> int:
    ap = bench_parser(__doc__.splitlines()[0], quick="two commands, 3 runs each")
    ap.add_argument("--runs", type=int, default=None)
    a = ap.parse_args()
    from distill_dag.cli import build_parser  # lazy: --help imports no distill_dag
    runs = a.runs or (3 if a.quick else 5)
    verbs = sorted(next(x for x in build_parser()._subparsers._group_actions).choices)  # type: ignore[union-attr]
    verbs = ["train"] if a.quick else [v for v in verbs if "_" not in v]
    d = _distill()
    base_wall, base_cpu = _time([sys.executable, "-c", "pass"], runs)
    print(f"baseline `python -c pass`: wall {base_wall * 1000:.0f} ms, cpu {base_cpu * 1000:.0f} ms ({runs} runs, median)")
    print(f"{'command':<34} {'wall s':>7} {'cpu s':>7} {'wall/base':>10} {'cpu/base':>9}  target wall < {TARGET_S} s")
    worst = 0.0
    for cmd in [["--help"]] + [[v, "--help"] for v in verbs]:
        wall, cpu = _time(d + cmd, runs)
        worst = max(worst, wall)
        print(f"{'distill ' + ' '.join(cmd):<34} {wall:>7.3f} {cpu:>7.3f} {wall / base_wall:>10.1f} {cpu / base_cpu:>9.1f}"
              f"  {'ok' if wall < TARGET_S else 'SLOW'}")
    heavy = _heavy_imports()
    print(f"modules imported by `distill train --help`: {', '.join(heavy) or 'none of torch/transformers/dagster/datasets'}")
    print(f"worst wall {worst:.3f} s ({'meets' if worst < TARGET_S else 'misses'} the {TARGET_S} s target)")
    return 0 if worst < TARGET_S and not heavy else 1


if __name__ == "__main__":
    sys.exit(main())
