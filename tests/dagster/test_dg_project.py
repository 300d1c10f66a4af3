"""The code location is a ``dg`` project: ``dg check defs`` and ``dg list defs`` read the same definitions as
``dagster dev -m distill_dag.definitions`` (everything under ``distill_dag/defs/``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill_dag.definitions import defs

REPO = Path(__file__).resolve().parents[2]
DG = Path(sys.executable).parent / "dg"


def _dg(*args: str) -> subprocess.CompletedProcess:
    if not DG.exists():
        pytest.fail(f"{DG} is missing: dagster-dg-cli is a dev dependency (make install)")
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parent.parent)}
    return subprocess.run([str(DG), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_dg_check_defs_loads_the_code_location():
    r = _dg("check", "defs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All definitions loaded successfully" in r.stdout + r.stderr


def test_dg_lists_the_same_assets_checks_and_resources_as_the_code_location():
    r = _dg("list", "defs", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    graph = defs.resolve_asset_graph()
    assert {a["asset_key"] for a in listed["assets"]} == {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert len(listed["asset_checks"]) == len(graph.asset_check_keys)
    assert {r["name"] for r in listed["resources"]} == set(defs.resources)
    assert "pipes_subprocess_client" in defs.resources  # the torchrun launcher is a resource, not built inline
