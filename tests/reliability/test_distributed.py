"""Scale: torchrun with 2 gloo processes, DDP and FSDP-sharded, trains exactly like one process with the
matching global batch; checkpoints (rank 0 only) move between world sizes and modes; a signal that
reaches one rank stops every rank at the same step, with a checkpoint.

Every run is a real `python -m distill_dag.train` (or `torch.distributed.run ... -m distill_dag.train`)
process with one torch thread per process.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from _rel import (TRAIN_CHILD, cfg_dict, final_weights, kill_group, last_train_step, metrics,  # noqa: E402
                  run_child, start_child, wait_for, write_cfg)
from distill_dag.training.checkpoint import load_trainer_state  # noqa: E402

# no Muon by default and no bf16 autocast (train.autocast auto turns it on where the CPU has native bf16):
# bf16 rounding would blur a bit-level comparison of summation orders (each has its own test)
BASE = dict(max_steps=4, batch_size=4, save_interval=2, keep_checkpoints=5, warmup_steps=1, eval_batches=1,
            optimizer="adamw", autocast="off", dist_timeout_s=120)


def _config(tmp_path, corpus, teacher, name, layers=1, **train_kw):
    d = cfg_dict(tmp_path, corpus, teacher, **{**BASE, "output_dir": str(tmp_path / name), **train_kw})
    d["student"]["overrides"]["num_hidden_layers"] = layers
    return write_cfg(tmp_path / f"{name}.yaml", d)


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return TRAIN_CHILD
    # --standalone: the agent's store listens on a free port before any worker connects (a port chosen
    # and released by us could be taken meanwhile); --local-addr: workers reach it by IP, whatever
    # "localhost" or the host name resolve to
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
            "--nproc-per-node", str(nproc), "-m", "distill_dag.train"]


def _train(config, nproc=1):
    # ~15 s each here; a hang fails within pytest's own timeout, with every process killed
    r = run_child([*_launcher(nproc), "--config", str(config)], timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in metrics(run_dir) if r.get("kind") == "train"}


def _same_losses(got, want, rel):
    assert got.keys() <= want.keys() and got
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=rel), step


def test_two_ddp_processes_match_one_process_with_the_global_batch(tmp_path, small_corpus, tiny_teacher_dir):
    _train(_config(tmp_path, small_corpus, tiny_teacher_dir, "single", batch_size=4))
    _train(_config(tmp_path, small_corpus, tiny_teacher_dir, "ddp", batch_size=2), nproc=2)
    ls, ld = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert ls.keys() == ld.keys() == {1, 2, 3, 4}
    _same_losses(ld, ls, rel=1e-5)
    ws, wd = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for k in ws:
        # summation order differs across ranks; Adam turns 1e-7 gradient noise into at most a few
        # percent of one step (lr 3e-3): a real mismatch (wrong rows, double counting) moves weights ~lr
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-3, atol=3e-4)
    # rank 0 alone wrote the run folder: checkpoints at the save interval
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]

    # the 2-process checkpoint at step 2 resumes in ONE process (batch 4) onto the same trajectory
    _train(_config(tmp_path, small_corpus, tiny_teacher_dir, "resumed", batch_size=4,
                   resume_from=str(tmp_path / "ddp" / "checkpoints" / "step-0000002")))
    lr_ = _losses(tmp_path / "resumed")
    assert set(lr_) == {3, 4}
    _same_losses(lr_, ld, rel=1e-5)


# adamw is slow-marked (27 s; `make test-all`): muon covers the FSDP path with the harder optimizer state
@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "muon"])
def test_fsdp_shards_the_student_and_matches_one_process(tmp_path, small_corpus, tiny_teacher_dir, optimizer):
    kw = dict(layers=2, optimizer=optimizer)
    _train(_config(tmp_path, small_corpus, tiny_teacher_dir, "single", batch_size=4, **kw))
    _train(_config(tmp_path, small_corpus, tiny_teacher_dir, "fsdp", batch_size=2, parallel="fsdp", **kw), nproc=2)
    ls, lf = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp")
    # Muon's Newton-Schulz runs in bf16: a sharded matmul rounds differently from a whole one
    rel, atol = (1e-5, 3e-4) if optimizer == "adamw" else (1e-3, 3e-3)
    assert ls.keys() == lf.keys() == {1, 2, 3, 4}
    _same_losses(lf, ls, rel)
    ws, wf = final_weights(tmp_path / "single"), final_weights(tmp_path / "fsdp")
    assert ws.keys() == wf.keys()  # gathered, whole tensors under the model's own names
    for k in ws:
        torch.testing.assert_close(wf[k], ws[k], rtol=1e-3, atol=atol)
    # each rank held half of every parameter: the model really was sharded
    log = (tmp_path / "fsdp" / "train.log").read_text()
    total = sum(t.numel() for t in ws.values())
    local = float(log.split("fsdp: ")[1].split("M parameters on this rank")[0]) * 1e6
    assert local == pytest.approx(total / 2, rel=0.02)

    # a one-process checkpoint resumes sharded over 2 ranks onto the same trajectory...
    _train(_config(tmp_path, small_corpus, tiny_teacher_dir, "fsdp_resumed", batch_size=2, parallel="fsdp",
                   resume_from=str(tmp_path / "single" / "checkpoints" / "step-0000002"), **kw), nproc=2)
    assert set(_losses(tmp_path / "fsdp_resumed")) == {3, 4}
    _same_losses(_losses(tmp_path / "fsdp_resumed"), ls, rel)
    # ...and the sharded run's checkpoint resumes in one process
    _train(_config(tmp_path, small_corpus, tiny_teacher_dir, "back", batch_size=4,
                   resume_from=str(tmp_path / "fsdp" / "checkpoints" / "step-0000002"), **kw))
    assert set(_losses(tmp_path / "back")) == {3, 4}
    _same_losses(_losses(tmp_path / "back"), ls, rel)


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's workers (its children whose environment says RANK)."""
    out = {}
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                out[int(rank[0][5:])] = int(pid)
    return out


def test_a_signal_to_one_rank_stops_all_ranks_at_one_step_with_a_checkpoint(tmp_path, small_corpus, tiny_teacher_dir):
    cfg = _config(tmp_path, small_corpus, tiny_teacher_dir, "run", batch_size=2, max_steps=10_000, save_interval=0)
    run_dir = tmp_path / "run"
    child = start_child([*_launcher(2), "--config", str(cfg)])
    try:
        wait_for(lambda: last_train_step(run_dir) >= 2, child, what="step 2")
        ranks = _worker_pids(child.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGTERM)  # rank 1 only: rank 0 must learn of it through the step's all-reduce
        child.wait(120)
    finally:
        kill_group(child)
    out = child.stdout.read().decode(errors="replace")
    assert child.returncode != 0, out[-3000:]  # stopped, not 10000 steps done
    stopped = [r for r in metrics(run_dir) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "signal", out[-3000:]
    step = stopped[0]["step"]
    path, state, _ = load_trainer_state(run_dir)  # rank 0 wrote it, after rank 1 got the signal
    assert path.name == f"step-{step:07d}" and state["step"] == step == last_train_step(run_dir)
    assert "resume with --resume-from" in out
