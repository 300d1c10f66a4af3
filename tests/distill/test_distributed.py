"""Data parallelism: torchrun with 2 gloo processes == one process with the matching global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, corpus, teacher, name, batch_size, **train_kw):
    train = dict(teacher_mode="direct", teacher_topk=16, temperature=2.0, distill_alpha=0.5, learning_rate=3e-3,
                 warmup_steps=1, max_steps=4, batch_size=batch_size, grad_accum=2, log_interval=1, eval_interval=0,
                 eval_batches=1, save_interval=2, keep_checkpoints=5, output_dir=str(tmp_path / name), device="cpu",
                 loss_chunk_tokens=64, optimizer="adamw")  # Muon's bf16 Newton-Schulz would blur the comparison
    train.update(train_kw)
    cfg = {
        "data": {"root": str(corpus["root"])},
        "tokenize": {"max_seq_length": 64},
        "teacher": {"model_name_or_path": str(teacher)},
        "student": {"variant": "tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "intermediate_size": 64},
                    "chunk_size": 16},
        "train": train,
        "wandb": {"mode": "disabled"},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def _run(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path, small_corpus, tiny_teacher_dir):
    single = _config(tmp_path, small_corpus, tiny_teacher_dir, "single", batch_size=4)
    ddp = _config(tmp_path, small_corpus, tiny_teacher_dir, "ddp", batch_size=2)
    _run([sys.executable, "-m", "distill_dag.train", "--config", str(single)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
          "-m", "distill_dag.train", "--config", str(ddp)])
    ls, ld = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert ls.keys() == ld.keys() == {1, 2, 3, 4}
    for step in ls:
        assert ld[step] == pytest.approx(ls[step], rel=1e-5), step
    ws, wd = load_file(str(tmp_path / "single" / "final" / "model.safetensors")), load_file(
        str(tmp_path / "ddp" / "final" / "model.safetensors"))
    for k in ws:
        # summation order differs across ranks; Adam/Muon turn 1e-7 gradient noise into at most a few
        # percent of one step (lr 3e-3): a real mismatch (wrong rows, double counting) moves weights ~lr
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-3, atol=3e-4)
    # rank 0 alone wrote the run folder: one train.log, checkpoints at the save interval
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]

    # the 2-process checkpoint at step 2 resumes in ONE process (batch 4) onto the same trajectory
    resumed = _config(tmp_path, small_corpus, tiny_teacher_dir, "resumed", batch_size=4,
                      resume_from=str(tmp_path / "ddp" / "checkpoints" / "step-0000002"))
    _run([sys.executable, "-m", "distill_dag.train", "--config", str(resumed)])
    lr_ = _losses(tmp_path / "resumed")
    assert set(lr_) == {3, 4}
    for step in lr_:
        assert lr_[step] == pytest.approx(ld[step], rel=1e-5), step
