"""Data parallelism: torchrun with 2 gloo processes (DDP, and FSDP-sharded) == one process with the
matching global batch; checkpoints move between world sizes and modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file


def _config(tmp_path, corpus, teacher, name, batch_size, layers=1, **train_kw):
    train = dict(teacher_mode="direct", teacher_topk=16, temperature=2.0, distill_alpha=0.5, learning_rate=3e-3,
                 warmup_steps=1, max_steps=4, batch_size=batch_size, grad_accum=2, log_interval=1, eval_interval=0,
                 eval_batches=1, save_interval=2, keep_checkpoints=5, output_dir=str(tmp_path / name), device="cpu",
                 loss_chunk_tokens=64, optimizer="adamw", dist_timeout_s=120)  # Muon's bf16 Newton-Schulz would blur the comparison
    train.update(train_kw)
    cfg = {
        "data": {"root": str(corpus["root"])},
        "tokenize": {"max_seq_length": 64},
        "teacher": {"model_name_or_path": str(teacher)},
        "student": {"variant": "tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": layers,
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


def _run(args, timeout=300):
    """Run to the end; on a hang kill the whole process group (torchrun's workers too) and show what
    it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} still ran after {timeout} s; its output:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def _train(config, nproc=1):
    if nproc == 1:
        return _run([sys.executable, "-m", "distill_dag.train", "--config", str(config)])
    # --standalone: torchrun picks a free port itself (no race with a port we chose and released)
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                 "-m", "distill_dag.train", "--config", str(config)])


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path, small_corpus, tiny_teacher_dir):
    single = _config(tmp_path, small_corpus, tiny_teacher_dir, "single", batch_size=4)
    ddp = _config(tmp_path, small_corpus, tiny_teacher_dir, "ddp", batch_size=2)
    _train(single)
    _train(ddp, nproc=2)
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
    _train(resumed)
    lr_ = _losses(tmp_path / "resumed")
    assert set(lr_) == {3, 4}
    for step in lr_:
        assert lr_[step] == pytest.approx(ld[step], rel=1e-5), step


def _weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_shards_the_student_and_matches_one_process(tmp_path, small_corpus, tiny_teacher_dir, optimizer):
    kw = dict(layers=2, optimizer=optimizer)
    single = _config(tmp_path, small_corpus, tiny_teacher_dir, "single", batch_size=4, **kw)
    fsdp = _config(tmp_path, small_corpus, tiny_teacher_dir, "fsdp", batch_size=2, parallel="fsdp", **kw)
    _train(single)
    _train(fsdp, nproc=2)
    ls, lf = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp")
    # Muon's Newton-Schulz runs in bf16: a sharded matmul rounds differently from a whole one
    rel, atol = (1e-5, 3e-4) if optimizer == "adamw" else (1e-3, 3e-3)
    assert ls.keys() == lf.keys() == {1, 2, 3, 4}
    for step in ls:
        assert lf[step] == pytest.approx(ls[step], rel=rel), step
    ws, wf = _weights(tmp_path / "single"), _weights(tmp_path / "fsdp")
    assert ws.keys() == wf.keys()  # gathered, whole tensors under the model's own names
    for k in ws:
        torch.testing.assert_close(wf[k], ws[k], rtol=1e-3, atol=atol)
    # each rank held half of every parameter: the model really was sharded
    log = (tmp_path / "fsdp" / "train.log").read_text()
    total = sum(t.numel() for t in ws.values())
    local = float(log.split("fsdp: ")[1].split("M parameters on this rank")[0]) * 1e6
    assert local == pytest.approx(total / 2, rel=0.02)

    # a one-process checkpoint resumes sharded over 2 ranks onto the same trajectory...
    resumed = _config(tmp_path, small_corpus, tiny_teacher_dir, "fsdp_resumed", batch_size=2, parallel="fsdp",
                      resume_from=str(tmp_path / "single" / "checkpoints" / "step-0000002"), **kw)
    _train(resumed, nproc=2)
    lr_ = _losses(tmp_path / "fsdp_resumed")
    assert set(lr_) == {3, 4}
    for step in lr_:
        assert lr_[step] == pytest.approx(ls[step], rel=rel), step
    # ...and the sharded run's checkpoint resumes in one process
    back = _config(tmp_path, small_corpus, tiny_teacher_dir, "back", batch_size=4,
                   resume_from=str(tmp_path / "fsdp" / "checkpoints" / "step-0000002"), **kw)
    _train(back)
    lb = _losses(tmp_path / "back")
    for step in lb:
        assert lb[step] == pytest.approx(ls[step], rel=rel), step
