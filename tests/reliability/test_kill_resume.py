"""Training killed on purpose: SIGKILL at a random step then resume = the uninterrupted run, bit for bit;
SIGTERM / SIGINT write a checkpoint of the step reached before the process exits.

Every run is a real `python -m distill_dag.train --config <yaml>` process (one torch thread each, so
the reference and the killed run reduce in the same order).
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import pytest

from _rel import (TRAIN_CHILD, assert_bitwise_equal, cfg_dict, final_weights, kill_group,  # noqa: E402
                  last_train_step, metrics, run_child, start_child, wait_for, write_cfg)
from distill_dag.training.checkpoint import LATEST, load_trainer_state  # noqa: E402

# saddle interventions every few steps (window 1, any loss change counts as a plateau), so the
# detector's history, boost window and cooldown are live state at every checkpoint. The thresholds are the
# config's upper bounds: a positive loss's relative improvement is always < 1, and this tiny student's
# gradient norms are far below 1e6
SADDLE = dict(enable_saddle_interventions=True, saddle_window=1, saddle_rel_improvement=1.0,
              saddle_grad_norm=1e6, saddle_lr_boost=2.0, saddle_boost_steps=2, saddle_cooldown=1)
MAX_STEPS, SAVE_EVERY = 12, 3


def _run_to_end(cfg_path, *extra):
    r = run_child([*TRAIN_CHILD, "--config", str(cfg_path), *extra])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(tmp_path, small_corpus, tiny_teacher_dir):
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    kill_step = random.Random(seed).randint(SAVE_EVERY + 1, MAX_STEPS - 2)
    why = f"KILL_SEED={seed} (kill after step {kill_step})"

    ref = write_cfg(tmp_path / "ref.yaml", cfg_dict(tmp_path / "ref", small_corpus, tiny_teacher_dir,
                                                   max_steps=MAX_STEPS, save_interval=SAVE_EVERY, **SADDLE))
    killed_d = cfg_dict(tmp_path / "killed", small_corpus, tiny_teacher_dir, max_steps=MAX_STEPS,
                        save_interval=SAVE_EVERY, **SADDLE)
    killed = write_cfg(tmp_path / "killed.yaml", killed_d)
    run_dir = tmp_path / "killed" / "run"

    child = start_child([*TRAIN_CHILD, "--config", str(killed)])
    try:
        wait_for(lambda: last_train_step(run_dir) >= kill_step, child, what=f"step {kill_step}")
    finally:
        kill_group(child, signal.SIGKILL)  # no handler, no atexit: a real crash (maybe inside a checkpoint save)
    assert child.returncode == -signal.SIGKILL
    assert last_train_step(run_dir) < MAX_STEPS, why
    _, state, _ = load_trainer_state(run_dir)  # checkpoint_latest names a whole, verified checkpoint
    resumed_from = int(state["step"])
    assert 0 < resumed_from <= kill_step and resumed_from % SAVE_EVERY == 0, why

    _run_to_end(ref)
    _run_to_end(killed, "--resume-from", str(run_dir))

    assert_bitwise_equal(final_weights(tmp_path / "ref" / "run"), final_weights(run_dir))
    ref_rows = metrics(tmp_path / "ref" / "run")
    # the detector intervened after the resume point, so its restored state decided the LR there
    assert [e for e in ref_rows if e.get("event") == "saddle_intervention" and e["step"] >= resumed_from], why
    # the resumed process logged steps resumed_from+1 .. MAX_STEPS with the reference's losses
    ref_loss = {r["step"]: r["loss"] for r in ref_rows if r.get("kind") == "train"}
    rows = metrics(run_dir)
    start = max(i for i, r in enumerate(rows) if r.get("event") == "resumed")
    after = {r["step"]: r["loss"] for r in rows[start:] if r.get("kind") == "train"}
    assert sorted(after) == list(range(resumed_from + 1, MAX_STEPS + 1)), why
    assert after == {s: ref_loss[s] for s in after}, why
    assert (run_dir / LATEST).read_text().strip() == f"checkpoints/step-{MAX_STEPS:07d}"
    # a save cut by the kill leaves no half checkpoint behind once the rerun is done
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, (leftovers, why)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_write_a_checkpoint_of_the_step_reached_before_exit(tmp_path, small_corpus, tiny_teacher_dir, sig):
    # no periodic checkpoint: the only one on disk can come from the signal
    d = cfg_dict(tmp_path, small_corpus, tiny_teacher_dir, max_steps=10_000, save_interval=0, **SADDLE)
    cfg = write_cfg(tmp_path / "cfg.yaml", d)
    run_dir = tmp_path / "run"
    child = start_child([*TRAIN_CHILD, "--config", str(cfg)])
    try:
        wait_for(lambda: last_train_step(run_dir) >= 3, child, what="step 3")
        os.killpg(child.pid, sig)
        child.wait(120)
    finally:
        kill_group(child)
    out = child.stdout.read().decode(errors="replace")
    assert child.returncode != 0  # it stopped, it did not finish 10000 steps
    stopped = [r for r in metrics(run_dir) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "signal", out[-3000:]
    step = stopped[0]["step"]
    assert step >= 3 and step == last_train_step(run_dir)
    path, state, info = load_trainer_state(run_dir)  # verified against its checksums
    assert path.name == f"step-{step:07d}" and state["step"] == step == info["step"]
    assert state["saddle"]["interventions"] >= 1  # the detector's state went into it
    assert f"resume with --resume-from {run_dir}" in out
