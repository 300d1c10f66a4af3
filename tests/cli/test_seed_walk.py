"""bench/seed_walkthrough.py --quick end to end (marked slow, ~80 s on 2 cores): the seed's QUICKSTART through
``distill``, from download --dry-run to a trust_remote_code load, on tiny data, with no edit between steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_seed_walkthrough_quick_runs_every_step(tmp_path):
    walk = tmp_path / "walk"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "seed_walkthrough.py"), "--quick", "--keep", str(walk)],
                       cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(summary["steps"]) >= {"download_dry_run", "tokenizer", "preprocess", "migrate", "finetune_teacher",
                                     "train_ce", "train_kd", "eval", "cache", "train_cached", "train_network",
                                     "trust_remote_code_load"}
    # the runs a seed user would look for, where the seed put them
    for run in ("direct_mode", "cached", "network"):
        assert (walk / "runs" / run / "final" / "config.json").is_file(), run
    assert (walk / "runs" / "direct_mode" / "eval").is_dir()  # the report beside the evaluated checkpoint
    rows = [json.loads(x) for x in (walk / "runs" / "cached" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any(r.get("event") == "teacher" and r.get("provider") == "cached" for r in rows)
