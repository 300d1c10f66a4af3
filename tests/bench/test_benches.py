"""Benchmarks that cannot rot: every bench/*.py runs its --quick mode as a script and must print the
ratio lines it exists for and leave nothing behind in its $TMPDIR; as a module (``python -m bench.X
--help``) it must import the same way.

A bench without ``--quick`` fails here (every benchmark must have one); one that another change is
still bringing in (listed in ``PENDING``) is skipped until it does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

# what each bench must print in --quick: regexes over stdout (a ratio, against its same-run baseline)
EXPECT: dict[str, list[str]] = {
    "logit_cache": [r"^\s+50\s+compact\s+[\d.]+\s.*x DistillKit's 114", r"^\s+128\s+compact\s.*x DistillKit's 315",
                    r"^\s+512\s+compact\s", r"write_cache_shard .* tok/s: ratio \d+\.\d+"],
    "kd_loss": [r'"peak_memory_ratio": \d', r'"time_ratio": \d'],
    "retention": [r"chunkwise time\(\d+\)/time\(\d+\) = \d", r"parallel\s+time\(\d+\)/time\(\d+\) = \d",
                  r"ms/tok|ratio"],
    "tokenization": [r"vs raw encode_batch: .*wall ratio \d", r"vs raw encode_batch_fast: .*wall ratio \d",
                     r"besides encoding .* ceiling ratio \d\.\d+"],
    "cli_startup": [r"wall/base", r"distill --help\s+[\d.]+\s+[\d.]+\s+[\d.]+"],
    "convert": [r"ratio|tokens"],
    # a walkthrough of the seed's QUICKSTART, not a speed target: its line is the time it took, step by step
    "seed_walkthrough": [r'"seed_walkthrough_s": [\d.]+, "steps": \{"download_dry_run"'],
    "memory_shapes": [r"peak|RSS"],
    "gpu_throughput": [r"seed's way .* is [\d.]+x its speed", r"ratio hybrid/pure [\d.]+", r"retention fwd\+bwd"],
    "kd_sweep": [r"gap_share_base [\d.]+ gap_share_best [\d.]+"],
    "cpu_paths": [r"Muon.step.*ratio bf16/fp32 [\d.]+", r"32 MiB .*ratio default/ours [\d.]+",
                  r"LM head .*ratio default/ours [\d.]+", r"teacher training step.*ratio fp32/bf16 [\d.]+",
                  r"student training step.*ratio fp32/bf16 [\d.]+",
                  r"teacher finetune >= .*ratio matmuls-alone/demo budget \(180 s\) [\d.]+"],
    "partitions": [r"ratio load_s keys=\d+/keys=10: [\d.]+", r"ratio status_s keys=\d+/keys=10: [\d.]+"],
}
PENDING: set[str] = set()  # benches another change is still bringing in (none now)


def benches() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


def test_no_bench_shadows_the_standard_library():
    shadowing = [b for b in benches() if b in sys.stdlib_module_names]
    assert not shadowing, f"bench/{shadowing[0]}.py shadows the standard library's {shadowing[0]}: rename it"


def _run(argv: list[str], name: str, tmp: Path) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", OMP_NUM_THREADS="2", TMPDIR=str(tmp))
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, f"{' '.join(argv[1:])} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    # its temp work dirs are removed at the end (a suite run used to leave one per bench in /tmp)
    # (torch's compile cache, torchinductor_<user>, is shared across runs by design)
    left = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_"))
    assert not left, f"{' '.join(argv[1:])} left temp files behind in $TMPDIR: {left}"
    for pat in EXPECT.get(name, [r"ratio"]):
        assert re.search(pat, r.stdout, re.M), f"{' '.join(argv[1:])}: no line matching {pat!r} in:\n{r.stdout[-3000:]}"
    return r.stdout


@pytest.mark.parametrize("how", ["script", "module"])
@pytest.mark.parametrize("name", benches())
def test_bench_quick_prints_its_ratios(name, how, tmp_path):
    src = (BENCH / f"{name}.py").read_text()
    if "--quick" not in src:
        if name in PENDING:
            pytest.skip(f"bench/{name}.py has no --quick yet (owned by another change)")
        pytest.fail(f"bench/{name}.py has no --quick mode")
    if how == "script":
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        _run([sys.executable, f"bench/{name}.py", "--quick"], name, tmp)
    else:  # the module path imports (no stdlib shadowing, no sys.path tricks) and parses its flags
        r = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "--quick" in r.stdout, f"python -m bench.{name} --help:\n{r.stdout}\n{r.stderr}"
