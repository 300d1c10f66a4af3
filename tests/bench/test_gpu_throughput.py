"""bench/gpu_throughput.py's code on the CPU (marked slow: kept out of CI): ``--quick`` runs the GPU throughput
code (ours vs the seed's way, the hybrid student, the retention kernels) at toy sizes; bench/gpu_check.sh runs
it at full size on a lent GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import run_bench

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_throughput.py"


def test_quick_gpu_code_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    p = run_bench(SCRIPT, ["--quick", "--json", str(out)], timeout=900)
    r = json.loads(out.read_text())
    assert len(r["rows"]) == 2 and all("s" in row["ours"] and "s" in row["seed"] for row in r["rows"]), r
    assert "seed's way" in p.stdout and "retention fwd+bwd" in p.stdout
