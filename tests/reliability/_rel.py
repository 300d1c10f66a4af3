"""Shared builders of the reliability tests: a tiny train config (dict, PipelineConfig or YAML file),
subprocess helpers that kill on purpose, and readers of a run's metrics.

Everything runs on the session corpus (`small_corpus`: real stdlib text, a 512-token BPE, 64-token
rows) and the session teacher (`tiny_teacher_dir`: a random-init tiny Llama) of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from safetensors.torch import load_file

from support import cfg_dict

from distill_dag.config import PipelineConfig, config_from_dict

TRAIN_CHILD = [sys.executable, "-m", "distill_dag.train"]


def make_cfg(tmp_path: Path, corpus: dict[str, Path], teacher_dir: Path | None, **train_kw: Any) -> PipelineConfig:
    return config_from_dict(cfg_dict(tmp_path, corpus, teacher_dir, **train_kw))


def write_cfg(path: Path, d: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def child_env(**extra: str) -> dict[str, str]:
    # one thread per child: the same matmul reduction order in every process, and no oversubscription
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                WANDB_MODE="disabled", **extra)


def run_child(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run to the end (stdout and stderr apart). Past ``timeout`` the whole process group is killed
    (torchrun's workers too) and the test fails showing what the child printed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(**env),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} still ran after {timeout} s:\n{out[-3000:]}\n{err[-5000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def start_child(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(**env),
                            start_new_session=True)


def wait_for(pred: Callable[[], bool], child: subprocess.Popen | None, timeout: float = 240, what: str = "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if child is not None and child.poll() is not None:
            out = child.stdout.read().decode(errors="replace") if child.stdout else ""
            pytest.fail(f"child ended (rc={child.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def kill_group(child: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if child.poll() is None:
        os.killpg(child.pid, sig)
    child.wait(60)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (a line cut by a kill is skipped)."""
    p = run_dir / "metrics.jsonl"
    out = []
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def last_train_step(run_dir: Path) -> int:
    steps = [r["step"] for r in metrics(run_dir) if r.get("kind") == "train"]
    return max(steps) if steps else 0


def final_weights(run_dir: Path) -> dict[str, Any]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ: {diff}"
