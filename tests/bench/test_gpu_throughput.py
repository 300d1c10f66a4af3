"""bench/gpu_throughput.py's code on the CPU (marked slow: kept out of CI): ``--quick`` runs the GPU throughput
code (ours vs the seed's way, the hybrid student, the retention kernels) at toy sizes; bench/gpu_check.sh runs
it at full size on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_throughput.py"


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


def test_quick_gpu_code_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    p = _run(["--quick", "--json", str(out)], timeout=900)
    r = json.loads(out.read_text())
    assert len(r["rows"]) == 2 and all("s" in row["ours"] and "s" in row["seed"] for row in r["rows"]), r
    assert "seed's way" in p.stdout and "retention fwd+bwd" in p.stdout
