"""Issue 30, points 7, 8 and 9: runs that used to end "successfully" with a wrong result.

7. a run whose every step is non-finite (or whose update left NaN weights) exits non-zero and publishes
   nothing: no ``final/``, no ``checkpoint_latest`` naming a bad or untrained state;
8. ``--resume-from`` a checkpoint of another architecture, or distilled from another teacher, is refused
   naming both values; a 0-layer student is refused by the config and by the model itself;
9. cached mode refuses a cache written by another teacher (CLI and the function the Dagster asset runs),
   naming both fingerprints and the fix; a cache of the configured teacher trains, and the model card
   names that teacher instead of ``unknown``.

Each attack runs the real trainer on the session corpus with a one-layer hidden-32 student, a few steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _rel import make_cfg, write_cfg  # noqa: E402
from support import cfg_dict, tiny_llama

from distill_dag import cli
from distill_dag.config import ConfigError, config_from_dict
from distill_dag.training import distributed as distributed_mod
from distill_dag.training import loop as loop_mod
from distill_dag.teacher.cache.codec import LogitCacheError
from distill_dag.training.stability import TrainingFailedError
from distill_dag.student.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _published_nothing(run_dir: Path) -> None:
    assert not (run_dir / "final").exists()
    assert not (run_dir / "checkpoint_latest").exists()
    assert not list((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").exists() else True


def _cli_train(tmp_path: Path, d: dict, *flags: str, capsys) -> tuple[int, str]:
    cfg_file = write_cfg(tmp_path / "cfg.yaml", d)
    capsys.readouterr()
    rc = cli.main(["train", "--config", str(cfg_file), *flags])
    return rc, capsys.readouterr().err


# ---- 7 ------------------------------------------------------------------------------------------------
def test_7_every_step_non_finite_exits_nonzero_and_publishes_nothing(tmp_path, small_corpus, tiny_teacher_dir,
                                                                     monkeypatch, capsys):
    """4 steps, all with a NaN loss: below max_nan_streak (10), so the streak guard never fires."""
    real = distributed_mod.distill_loss

    def nan_loss(*a, **kw):
        out = real(*a, **kw)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(distributed_mod, "distill_loss", nan_loss)
    d = cfg_dict(tmp_path, small_corpus, tiny_teacher_dir, max_steps=4, save_interval=2, pretrain_ce_only=True)
    rc, err = _cli_train(tmp_path, d, capsys=capsys)
    assert rc == 1, err
    assert "all 4 step(s) of this run (steps 1..4) had a non-finite loss" in err
    assert "train.learning_rate" in err and "max_nan_streak 10 was not reached" in err
    assert "Traceback" not in err
    _published_nothing(tmp_path / "run")
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "checkpoint_skipped"] == [2, 4]
    assert any(e.get("event") == "failed" for e in events)


def test_7_update_leaving_weights_non_finite_publishes_nothing_and_keeps_the_last_good_checkpoint(
        tmp_path, small_corpus, tiny_teacher_dir, monkeypatch):
    """The attack of ``train.weight_decay: 1e300``: an update with a finite loss and gradient leaves the weights
    Inf/NaN, and every later step is skipped. Here step 3's update is poisoned (the config now bounds the
    weight decay, so the poison is applied right before that optimizer step)."""
    real = loop_mod.clip_grad_norm
    calls = {"n": 0}

    def poison_third_update(params, max_norm):
        norm = real(params, max_norm)  # finite: the guard lets the update through
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(params.parameters()).fill_(float("inf"))
        return norm

    monkeypatch.setattr(loop_mod, "clip_grad_norm", poison_third_update)
    run = tmp_path / "run"
    with pytest.raises(TrainingFailedError) as exc:
        train(make_cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=4, save_interval=2, pretrain_ce_only=True))
    msg = str(exc.value)
    assert f"checkpoint {run / 'checkpoints' / 'step-0000004'} (step 4)" in msg
    assert "model.embed_tokens.weight" in msg and "hold NaN or Inf" in msg
    assert "checkpoint_latest still names checkpoints/step-0000002" in msg
    assert not (run / "final").exists() and not (run / "checkpoints" / "step-0000004").exists()
    assert (run / "checkpoint_latest").read_text().strip() == "checkpoints/step-0000002"
    good = load_file(str(run / "checkpoints" / "step-0000002" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in good.values())


# ---- 8 ------------------------------------------------------------------------------------------------
def test_8_resume_from_another_architecture_is_refused_naming_both_values(tmp_path, small_corpus, tiny_teacher_dir,
                                                                          capsys):
    wide = cfg_dict(tmp_path / "wide", small_corpus, tiny_teacher_dir, max_steps=1, pretrain_ce_only=True)
    wide["student"]["overrides"]["hidden_size"] = 64
    train(config_from_dict(wide))
    assert (tmp_path / "wide" / "run" / "final").is_dir()

    d = cfg_dict(tmp_path, small_corpus, tiny_teacher_dir, max_steps=3, pretrain_ce_only=True)  # hidden 32
    rc, err = _cli_train(tmp_path, d, "--resume-from", str(tmp_path / "wide" / "run"), capsys=capsys)
    assert rc == 2, err
    assert "train.resume_from" in err and "hidden_size 64 in the checkpoint vs 32 here" in err
    assert "student.overrides" in err and "Traceback" not in err
    _published_nothing(tmp_path / "run")


def test_8_resume_with_another_teacher_is_refused_naming_both(tmp_path, small_corpus, tiny_teacher_dir):
    first = train(make_cfg(tmp_path / "a", small_corpus, tiny_teacher_dir, max_steps=1))
    other = tmp_path / "other_teacher"
    tiny_llama(first.lineage["teacher"]["vocab_size"], seed=1).save_pretrained(other)
    cfg = make_cfg(tmp_path, small_corpus, other, max_steps=3, resume_from=str(first.run_dir))
    with pytest.raises(ConfigError) as exc:
        train(cfg)
    msg = str(exc.value)
    fp_then = first.lineage["teacher_fingerprint"]
    assert f"distilled from teacher {tiny_teacher_dir} (fingerprint {fp_then[:16]})" in msg
    assert f"the configured teacher is {other} (fingerprint " in msg and "teacher.model_name_or_path" in msg
    _published_nothing(tmp_path / "run")
    # the same teacher resumes as before
    again = train(make_cfg(tmp_path / "b", small_corpus, tiny_teacher_dir, max_steps=2, resume_from=str(first.run_dir)))
    assert again.steps == 2 and (again.final_dir / "model.safetensors").exists()


def test_8_zero_layer_student_is_refused_by_the_config_and_by_the_model(tmp_path, small_corpus, tiny_teacher_dir):
    from distill_dag.model.retnet import RetNetConfig
    from distill_dag.model.variants import student_config

    d = cfg_dict(tmp_path, small_corpus, tiny_teacher_dir)
    d["student"]["overrides"]["num_hidden_layers"] = 0
    with pytest.raises(ConfigError, match=r"student\.overrides\.num_hidden_layers"):
        config_from_dict(d)
    # the model path refuses it too, whoever builds the config (a checkpoint's config.json, a script)
    with pytest.raises(Exception, match=r"RetNetConfig\.num_hidden_layers must be an integer >= 1"):
        student_config("tiny", 512, num_hidden_layers=0)
    with pytest.raises(Exception, match=r"RetNetConfig\.num_attention_heads must be an integer >= 1"):
        RetNetConfig(num_attention_heads=0)


# ---- 9 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_corpus(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """~150 rows of stdlib text with the session tokenizer: a whole cache of it is written in seconds."""
    from support import stdlib_jsonl

    from distill_dag.data.pack import tokenize_to_parquet
    from distill_dag.data.tokenizer import tokenizer_hash

    root = tmp_path_factory.mktemp("issue30_mini")
    raw = stdlib_jsonl(root / "raw" / "stdlib.jsonl", 30_000).parent
    tok = shutil.copytree(small_corpus["tokenizer"], root / "tokenizer")
    tokenize_to_parquet(raw, root / "tokenized", tok, 64, val_fraction=0.2, rows_per_shard=64,
                        tokenizer_hash=tokenizer_hash(tok))
    return {"root": root, "tokenizer": tok, "tokenized": root / "tokenized"}


@pytest.fixture(scope="module")
def teacher_and_cache(tmp_path_factory, mini_corpus, tiny_teacher_dir):
    """A teacher folder (a copy of the session teacher) and the k=16 logit cache it wrote, as
    `distill cache-logits` writes it."""
    from distill_dag.teacher.cache_stage import build_logit_cache

    root = tmp_path_factory.mktemp("issue30_cache")
    teacher = shutil.copytree(tiny_teacher_dir, root / "teacher")
    cfg = make_cfg(root, mini_corpus, teacher, teacher_mode="cached")
    build_logit_cache(cfg, log=lambda _m: None)
    return teacher, Path(cfg.logit_cache.dir)


def _cached_dict(tmp_path, corpus, teacher, cache, **kw):
    d = cfg_dict(tmp_path, corpus, teacher, teacher_mode="cached", **kw)
    d["logit_cache"]["dir"] = str(cache)
    return d


def test_9_cache_of_another_teacher_is_refused_in_the_cli_and_the_asset_path(tmp_path, mini_corpus, teacher_and_cache,
                                                                             capsys):
    from distill_dag.student.run import run_kd_student
    from distill_dag.teacher.model import teacher_fingerprint

    teacher, cache = teacher_and_cache
    changed = shutil.copytree(teacher, tmp_path / "teacher")  # the teacher, retrained in place: same shapes
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    tiny_llama(vocab, seed=7).save_pretrained(changed)
    before = json.loads(next(cache.glob("train-*/shard.json")).read_text())["teacher_fingerprint"]["hash"]
    after = teacher_fingerprint(changed)["hash"]
    assert before == teacher_fingerprint(teacher)["hash"] != after

    d = _cached_dict(tmp_path, mini_corpus, changed, cache, max_steps=2)
    rc, err = _cli_train(tmp_path, d, capsys=capsys)
    assert rc == 2, err
    assert f"(fingerprint {before[:16]}), but teacher.model_name_or_path is {changed} (fingerprint {after[:16]})" in err
    assert "`distill cache-logits`" in err and "Traceback" not in err
    _published_nothing(tmp_path / "run")
    with pytest.raises(LogitCacheError, match=rf"fingerprint {after[:16]}"):  # what the student_ckpt asset runs
        run_kd_student(config_from_dict(d))
    _published_nothing(tmp_path / "run")


def test_9_cache_of_the_configured_teacher_trains_and_the_card_names_that_teacher(tmp_path, mini_corpus,
                                                                                 teacher_and_cache):
    teacher, cache = teacher_and_cache
    res = train(config_from_dict(_cached_dict(tmp_path, mini_corpus, teacher, cache, max_steps=2)))
    card = json.loads((res.final_dir / "model_card.json").read_text())["run"]["teacher"]
    assert card["provider"] == "cached" and card["model"] == str(teacher)
    assert card["teacher_fingerprint"] == res.lineage["teacher_fingerprint"] is not None
    readme = (res.final_dir / "README.md").read_text()
    assert "unknown" not in readme and teacher.name in readme
    assert "the cache's teacher fingerprint" in (res.run_dir / "train.log").read_text()
