"""The training skeleton (training/loop.py) and telemetry: what a step does to the LR schedule, eval and
stop scheduling, W&B names/groups/exit codes, memory and diversity metrics, progress in and out of a terminal."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from torch import nn

from support import cfg_dict

from distill_dag.config import WandbConfig, config_from_dict
from distill_dag.training import distributed as distributed_mod
from distill_dag.training.loop import OptimizerStep, StepOutput, TrainingInterrupted, TrainLoop
from distill_dag.training.stability import NanGuard, TrainingDivergedError
from distill_dag.training.telemetry import Telemetry, log_eval_run, wandb_group
from distill_dag.student.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
    """A stand-in ``wandb`` module recording every run's init arguments, rows, summary and exit code."""
    runs = []

    class Run:
        def __init__(self, **kw):
            self.kw, self.rows, self.summary, self.exit_code = kw, [], {}, None
            self.id, self.url = f"fake{len(runs)}", None
            self.dir = str(tmp_path / "wandb" / self.id / "files")

        def log(self, row, step=None):
            self.rows.append((step, row))

        def finish(self, exit_code=0):
            self.exit_code = exit_code

    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: runs.append(Run(**kw)) or runs[-1]
    mod.Table = lambda columns, data: {"columns": columns, "data": data}
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return runs


def _toy():
    """A linear model on a fixed batch under the skeleton, without a checkpointer."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 / (u + 1))
    return model, opt, sched


def test_skipped_step_keeps_weights_and_schedule_and_counts_as_a_loop_step(tmp_path):
    model, opt, sched = _toy()
    x = torch.ones(2, 3)
    tel = Telemetry(tmp_path, WandbConfig(mode="disabled"), {}, total_steps=4, progress=False, echo=lambda m: None)
    seen = []

    def step(i):
        loss = model(x).pow(2).mean() * (float("nan") if i == 1 else 1.0)
        loss.backward()
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return StepOutput(loss=loss.item(), tokens=2, rows=2)

    loop = TrainLoop("toy", tel, optimizer_step=OptimizerStep(opt, sched, model, 0.0, NanGuard(3)), max_steps=4,
                     log_interval=1)
    with loop:
        loop.run(step)
    lrs = [h["lr"] for h in tel.history]
    assert lrs == pytest.approx([0.1 / 2, 0.1 / 2, 0.1 / 3, 0.1 / 4])  # updates after steps 1..4: 1, 1, 2, 3
    assert all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # the NaN step changed no weight
    assert [e["event"] for e in tel.events] == ["nonfinite_step_skipped"] and tel.events[0]["step"] == 1
    assert loop.step == 4 and loop.tokens == 8


def test_eval_interval_zero_never_evaluates_and_stop_after_raises_the_one_interruption(tmp_path):
    model, opt, sched = _toy()
    x = torch.ones(2, 3)

    def step(_i):
        loss = model(x).pow(2).mean()
        loss.backward()
        return StepOutput(loss=loss.item(), tokens=2, rows=2)

    evals = []
    for interval, want in ((0, []), (2, [2, 4, 6])):
        tel = Telemetry(tmp_path / str(interval), WandbConfig(mode="disabled"), {}, total_steps=6, progress=False,
                        echo=lambda m: None)
        model, opt, sched = _toy()
        evals.clear()
        with TrainLoop("toy", tel, optimizer_step=OptimizerStep(opt, sched, model, 1.0, NanGuard(1)), max_steps=6,
                       log_interval=0, eval_interval=interval) as loop:
            loop.run(step, evaluate=evals.append)
        assert evals == want
    model, opt, sched = _toy()
    tel = Telemetry(tmp_path / "stop", WandbConfig(mode="disabled"), {}, total_steps=6, progress=False,
                    echo=lambda m: None)
    with pytest.raises(TrainingInterrupted, match=r"toy stopped at step 2 \(stop_after\).*run me again") as exc:
        with TrainLoop("toy", tel, optimizer_step=OptimizerStep(opt, sched, model, 1.0, NanGuard(1)), max_steps=6,
                       log_interval=1, stop_after=2, resume_hint="run me again") as loop:
            loop.run(step)
    assert isinstance(exc.value, KeyboardInterrupt) and exc.value.step == 2
    assert tel.events[-1] == {"step": 2, "event": "stopped", "reason": "stop_after"}


def test_kd_and_ce_only_runs_are_grouped_in_wandb_and_a_diverged_run_exits_1(tmp_path, small_corpus, tiny_teacher_dir,
                                                                             fake_wandb, monkeypatch):
    d = cfg_dict(tmp_path, small_corpus, tiny_teacher_dir, max_steps=2, save_interval=0, diversity_weight=0.1,
                 max_nan_streak=2)
    d["wandb"] = {"mode": "offline"}
    kd = train(config_from_dict(d))
    rows = [h for h in kd.history if h["kind"] == "train"]
    assert all(h["diversity"] > 0 and h["rss_gb"] > 0 and h["rows_per_s"] > 0 for h in rows)

    real = distributed_mod.distill_loss

    def nan_loss(*a, **kw):
        out = real(*a, **kw)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(distributed_mod, "distill_loss", nan_loss)
    d["train"].update(pretrain_ce_only=True, output_dir=str(tmp_path / "run_ce_only"))
    with pytest.raises(TrainingDivergedError):
        train(config_from_dict(d))

    kd_run, ce_run = fake_wandb
    assert kd_run.kw["job_type"] == "kd" and ce_run.kw["job_type"] == "ce_only"
    assert kd_run.kw["name"] == "run" and ce_run.kw["name"] == "run_ce_only"
    assert kd_run.kw["group"] == ce_run.kw["group"] == wandb_group(config_from_dict(d))
    assert "kd" in kd_run.kw["tags"] and "direct" in kd_run.kw["tags"] and "ce_only" in ce_run.kw["tags"]
    assert kd_run.exit_code == 0 and kd_run.summary["steps"] == 2
    assert any("train/diversity" in row for _, row in kd_run.rows)
    assert ce_run.exit_code == 1  # the diverged run is a failed W&B run
    failed = [json.loads(x) for x in (tmp_path / "run_ce_only" / "metrics.jsonl").read_text().splitlines()]
    assert failed[-1]["event"] == "failed" and "TrainingDivergedError" in failed[-1]["error"]


def test_teacher_finetune_and_eval_are_logged_in_the_same_group(tmp_path, small_corpus, fake_wandb):
    from distill_dag.teacher.finetune import finetune_teacher

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    cfg = config_from_dict({"teacher": {"model_name_or_path": None, "init_tiny": tiny}, "tokenize": {"max_seq_length": 64},
                            "teacher_ft": {"mode": "full", "max_steps": 2, "batch_size": 4, "eval_batches": 1,
                                           "eval_interval": 0, "save_interval": 0, "log_interval": 1, "warmup_steps": 0},
                            "train": {"device": "cpu"}, "wandb": {"mode": "offline"}})
    m = finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / "ft", tokenizer_dir=small_corpus["tokenizer"],
                         log=lambda s: None)
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("kind") == "train"] == [1, 2]
    where = log_eval_run(cfg, tmp_path / "run" / "eval", {"val_ppl": 12.5, "split": "val"},
                         tables={"perplexity": [{"model": "student", "ppl": 12.5}]})
    ft_run, eval_run = fake_wandb
    assert ft_run.kw["job_type"] == "teacher_ft" and ft_run.exit_code == 0
    assert ft_run.summary["val_ppl_after"] == m["val_ppl_after"]
    assert eval_run.kw["job_type"] == "eval" and eval_run.kw["group"] == ft_run.kw["group"]
    assert eval_run.summary == {"val_ppl": 12.5} and eval_run.exit_code == 0
    assert any("eval/perplexity" in row for _, row in eval_run.rows) and where["wandb_url"] is None


def test_progress_is_a_bar_in_a_terminal_and_lines_elsewhere(tmp_path, capsys, monkeypatch):
    said = []
    tel = Telemetry(tmp_path / "a", WandbConfig(mode="disabled"), {}, total_steps=4, echo=said.append, start_step=1,
                    progress_interval_s=0)
    for _ in range(3):
        tel.advance(rows=8)
    tel.close()
    lines = [s for s in said if s.startswith("train ")]
    assert len(lines) == 3 and lines[-1].startswith("train 4/4 steps (100%)")
    assert "rows/s" in lines[0] and "ETA" in lines[0] and "steps/s" in lines[0]

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    tel = Telemetry(tmp_path / "b", WandbConfig(mode="disabled"), {}, total_steps=4, start_step=1)
    for _ in range(3):
        tel.advance(rows=8)
    tel.close()
    err = capsys.readouterr().err
    assert "4/4" in err and "rows/s" in err


def test_a_loop_whose_every_step_is_skipped_raises_and_checkpoints_nothing(tmp_path):
    """Issue 30 (7): 3 NaN steps, fewer than max_nan_streak (5): the streak never fires, the end check does;
    the checkpoint due at step 2 is not written (it would be the untrained weights)."""
    from distill_dag.training.loop import Checkpointer, CheckpointContents
    from distill_dag.training.stability import TrainingFailedError

    model, opt, sched = _toy()
    x = torch.ones(2, 3)
    tel = Telemetry(tmp_path, WandbConfig(mode="disabled"), {}, total_steps=3, progress=False, echo=lambda m: None)

    def step(i):
        loss = model(x).pow(2).mean() * float("nan")
        loss.backward()
        return StepOutput(loss=loss.item(), tokens=2, rows=2)

    saved = []
    ckpt = Checkpointer(tmp_path, lambda at: saved.append(at) or CheckpointContents(model, {"step": at}, {}), keep=2,
                        tel=tel)
    loop = TrainLoop("toy", tel, optimizer_step=OptimizerStep(opt, sched, model, 0.0, NanGuard(5, fix="FIX-IT")),
                     max_steps=3, log_interval=1, save_interval=2, checkpointer=ckpt)
    with pytest.raises(TrainingFailedError, match=r"toy: all 3 step\(s\) of this run \(steps 1..3\) .* FIX-IT"):
        with loop:
            loop.run(step)
    assert saved == [] and not (tmp_path / "checkpoints").exists()
    events = [(e["event"], e["step"]) for e in tel.events]
    assert ("checkpoint_skipped", 2) in events and events[-1] == ("failed", 3)


def test_a_loop_that_trained_zero_tokens_raises(tmp_path):
    from distill_dag.training.stability import TrainingFailedError

    model, opt, sched = _toy()
    tel = Telemetry(tmp_path, WandbConfig(mode="disabled"), {}, total_steps=2, progress=False, echo=lambda m: None)

    def step(i):
        loss = model(torch.ones(2, 3)).pow(2).mean()
        loss.backward()
        return StepOutput(loss=loss.item(), tokens=0, rows=2)  # e.g. every row all padding

    loop = TrainLoop("toy", tel, optimizer_step=OptimizerStep(opt, sched, model, 0.0, NanGuard(5)), max_steps=2,
                     log_interval=1)
    with pytest.raises(TrainingFailedError, match=r"toy: 2 step\(s\) \(steps 1..2\) trained 0 tokens"):
        with loop:
            loop.run(step)
