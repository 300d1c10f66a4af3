"""The trainer: exact resume, CE -> KD continuation, NaN guard and the LR schedule, logging, eval interval."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from support import cfg_dict

from distill_dag.config import ConfigError, config_from_dict
from distill_dag.training import distributed as distributed_mod
from distill_dag.training.checkpoint import CheckpointError, load_trainer_state
from distill_dag.training.optim import make_lr_lambda
from distill_dag.student.trainer import train


def _cfg(tmp_path, corpus, teacher_dir, **train_kw):
    kw = dict(max_steps=6, eval_interval=3, save_interval=3, keep_checkpoints=5)
    return config_from_dict(cfg_dict(tmp_path, corpus, teacher_dir, **{**kw, **train_kw}))


def _weights(result):
    return load_file(str(result.final_dir / "model.safetensors"))


def test_resume_continues_the_exact_same_trajectory(tmp_path, small_corpus, tiny_teacher_dir):
    full = train(_cfg(tmp_path / "a", small_corpus, tiny_teacher_dir))
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "b", small_corpus, tiny_teacher_dir), stop_after=4)
    resumed = train(_cfg(tmp_path / "b", small_corpus, tiny_teacher_dir, resume_from=str(tmp_path / "b" / "run")))
    assert resumed.steps == full.steps == 6
    wa, wb = _weights(full), _weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the resumed run logged steps 5..6 with the same losses as the uninterrupted run
    la = {h["step"]: h["loss"] for h in full.history if h["kind"] == "train"}
    lb = {h["step"]: h["loss"] for h in resumed.history if h["kind"] == "train"}
    assert {s: la[s] for s in lb} == lb and min(lb) == 5


def test_ce_only_then_kd_resume_continues_the_step_count_and_the_lr_schedule(tmp_path, small_corpus, tiny_teacher_dir):
    ce = train(_cfg(tmp_path, small_corpus, tiny_teacher_dir, pretrain_ce_only=True, max_steps=3,
                    output_dir=str(tmp_path / "ce")))
    assert all(h["kl"] == 0.0 for h in ce.history if h["kind"] == "train")
    cfg = _cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=6, resume_from=str(tmp_path / "ce"),
               output_dir=str(tmp_path / "kd"))
    kd = train(cfg)
    # the first event after the one naming the run's teacher
    assert [e["event"] for e in kd.events if e["event"] != "teacher"][0] == "transition_ce_to_kd"
    rows = [h for h in kd.history if h["kind"] == "train"]
    # max_steps counts the CE steps: 3 more, numbered on from the CE run, all with the teacher
    assert [h["step"] for h in rows] == [4, 5, 6] and kd.steps == 6
    assert all(h["kl"] > 0.0 for h in rows) and kd.tokens > ce.tokens
    # no second warm-up: the row of step s shows the LR of update s of one 6-step schedule
    lam = make_lr_lambda(cfg.train)
    assert [h["lr_adamw"] for h in rows] == pytest.approx([cfg.train.learning_rate * lam(s) for s in (4, 5, 6)])
    log = (tmp_path / "kd" / "train.log").read_text()
    assert "transition_ce_to_kd" in log and "counts the CE steps too: 3 KD steps to go" in log
    with pytest.raises(ConfigError, match="max_steps counts every step, CE ones included"):
        train(_cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=3, resume_from=str(tmp_path / "ce"),
                   output_dir=str(tmp_path / "kd_none")))


def test_nan_loss_skips_the_step_and_keeps_weights(tmp_path, small_corpus, tiny_teacher_dir, monkeypatch):
    real = distributed_mod.distill_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # both micro-batches of optimizer step 2
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(distributed_mod, "distill_loss", poisoned)
    res = train(_cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=3, eval_interval=0, save_interval=0, pretrain_ce_only=True))
    skips = [e for e in res.events if e["event"] == "nonfinite_step_skipped"]
    assert len(skips) == 1 and skips[0]["step"] == 1


def test_logged_loss_is_the_token_weighted_mean_over_micro_batches(tmp_path, small_corpus, tiny_teacher_dir, monkeypatch):
    seen = []
    real = distributed_mod.distill_loss

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append((out.loss.item(), out.n_tokens))
        return out

    monkeypatch.setattr(distributed_mod, "distill_loss", spy)
    res = train(_cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=1, eval_interval=0, grad_accum=3))
    micro = seen[:3]
    expect = sum(l * n for l, n in micro) / sum(n for _, n in micro)
    assert res.history[0]["loss"] == pytest.approx(expect, rel=1e-6)
    assert res.history[0]["loss"] != pytest.approx(micro[-1][0], rel=1e-6)


def test_skipped_nan_step_does_not_advance_the_lr_schedule(tmp_path, small_corpus, tiny_teacher_dir, monkeypatch):
    real = distributed_mod.distill_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # optimizer step 2 of 4
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(distributed_mod, "distill_loss", poisoned)
    cfg = _cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=4, eval_interval=0, save_interval=0, pretrain_ce_only=True)
    res = train(cfg)
    lam, lr = make_lr_lambda(cfg.train), cfg.train.learning_rate
    # updates taken after steps 1..4: 1, 1 (skipped), 2, 3; each row shows the LR of the next update
    assert [h["lr_adamw"] for h in res.history if h["kind"] == "train"] == pytest.approx(
        [lr * lam(1), lr * lam(1), lr * lam(2), lr * lam(3)])
    _, state, _ = load_trainer_state(res.run_dir)
    assert state["step"] == 4 and state["scheduler"]["adamw"]["last_epoch"] == 3


def test_eval_interval_zero_means_no_held_out_evaluation_at_all(tmp_path, small_corpus, tiny_teacher_dir):
    never = train(_cfg(tmp_path / "never", small_corpus, tiny_teacher_dir, max_steps=4, eval_interval=0, pretrain_ce_only=True))
    assert [h for h in never.history if h["kind"] == "val"] == [] and never.val == {}
    every3 = train(_cfg(tmp_path / "every3", small_corpus, tiny_teacher_dir, max_steps=4, eval_interval=3, pretrain_ce_only=True))
    assert [h["step"] for h in every3.history if h["kind"] == "val"] == [3, 4]  # the interval, then the final one
    assert every3.val["val_loss"] > 0


def test_checkpoint_has_lineage_and_rejects_corruption(tmp_path, small_corpus, tiny_teacher_dir):
    res = train(_cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=3))
    path, state, info = load_trainer_state(res.run_dir)
    assert state["step"] == 3 and info["lineage"]["tokenizer_hash"]
    assert info["lineage"]["teacher"] is not None
    blob = path / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_trainer_state(res.run_dir)


def test_saved_student_loads_with_auto_class_and_generates(tmp_path, small_corpus, tiny_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill_dag  # noqa: F401  (registers the RetNet with the Auto classes)

    res = train(_cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=2, eval_interval=0))
    model = AutoModelForCausalLM.from_pretrained(res.final_dir)
    tok = AutoTokenizer.from_pretrained(res.final_dir)
    ids = tok("def main():", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    cfg = json.loads((res.final_dir / "config.json").read_text())
    assert cfg["model_type"] == "retnet"
