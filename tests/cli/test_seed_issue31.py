"""Issue 31: a seed user's config and habits do what they expect (cache_logits, paths, tokenizer, env var,
distill_alpha, the seed's resume file, defaults, WANDB_MODE, contradicting flags)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from distill_dag.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"variant": "tiny", "chunk_size": 16,
        "overrides": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}}


def seed_project(tmp_path: Path, small_corpus: dict, tiny_teacher_dir: Path, **keys) -> Path:
    """A seed project root: its packed data under data/, its teacher folder (weights + tokenizer, as a hub
    snapshot holds them) and seed/old.yaml, a flat seed config with paths relative to the root."""
    root = tmp_path / "proj"
    shutil.copytree(small_corpus["tokenized"], root / "data" / "distillation_preprocessed")
    shutil.copytree(tiny_teacher_dir, root / "models" / "teacher")
    for f in small_corpus["tokenizer"].iterdir():
        if f.is_file():
            shutil.copy(f, root / "models" / "teacher" / f.name)
    seed = {"model_variant": "tiny", "teacher_model": "models/teacher", "teacher_topk": 16, "distill_alpha": 0.2,
            "max_seq_length": 64, "train_data_path": "data/distillation_preprocessed",
            "val_data_path": "data/distillation_preprocessed", "cache_dir": "data/teacher_cache",
            "physical_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2, "device": "cpu",
            "save_interval": 0, "eval_interval": 0, "log_interval": 1, "output_dir": "runs/direct_mode", **keys}
    (root / "seed").mkdir()
    (root / "seed" / "old.yaml").write_text(yaml.safe_dump(seed))
    return root


def migrate_next_to_old(root: Path, capsys) -> Path:
    """``distill migrate-config seed/old.yaml -o seed/new.yaml`` from the project root, then the test-only
    shrink of the student (a 500M one would not fit a unit test) through a base: chain, NEW.yaml untouched."""
    assert main(["migrate-config", "seed/old.yaml", "-o", "seed/new.yaml"]) == 0, capsys.readouterr().err
    small = root / "seed" / "small.yaml"
    small.write_text(yaml.safe_dump({"base": "new.yaml", "student": TINY, "train": {"loss_chunk_tokens": 64},
                                     "wandb": {"mode": "disabled"}}))
    return small


def events(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("event") == kind]


def test_migrated_config_next_to_the_old_one_trains_from_the_same_data_without_a_hand_made_tokenizer(
        tmp_path, monkeypatch, small_corpus, tiny_teacher_dir, capsys):
    root = seed_project(tmp_path, small_corpus, tiny_teacher_dir)
    monkeypatch.chdir(root)  # the seed's project root: its paths were relative to it
    cfg_path = migrate_next_to_old(root, capsys)
    new = yaml.safe_load((root / "seed" / "new.yaml").read_text())
    # written relative to seed/, pointing at the seed's files under the root
    assert new["data"]["tokenized_dir"] == "../data/distillation_preprocessed"
    assert new["teacher"]["model_name_or_path"] == "../models/teacher"
    assert not (root / "data" / "tokenizer").exists() and not (root / "seed" / "data").exists()
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_path)]) == 0, capsys.readouterr().err
    assert "student: 2 steps" in capsys.readouterr().out
    run = root / "runs" / "direct_mode"
    assert (run / "final").is_dir()  # output_dir where the seed's pointed, not under seed/
    # the tokenizer came from tokenizer.name_or_path (the teacher's), fetched into <data.root>/tokenizer
    from distill_dag.data.manifest import Manifest
    from distill_dag.data.tokenizer import tokenizer_hash

    assert tokenizer_hash(root / "data" / "tokenizer") == Manifest.load(root / "data/distillation_preprocessed").tokenizer_hash
    teacher = events(run, "teacher")[0]
    assert teacher["provider"] == "direct" and teacher["model"].endswith("models/teacher")  # the log names it


def test_cache_logits_true_migrates_to_cached_mode_and_trains_from_the_cache(
        tmp_path, monkeypatch, small_corpus, tiny_teacher_dir, capsys):
    root = seed_project(tmp_path, small_corpus, tiny_teacher_dir, cache_logits=True, teacher_mode="direct",
                        output_dir="runs/cached_mode")
    monkeypatch.chdir(root)
    cfg_path = migrate_next_to_old(root, capsys)
    new = yaml.safe_load((root / "seed" / "new.yaml").read_text())
    assert new["train"]["teacher_mode"] == "cached"
    assert main(["cache-logits", "--config", str(cfg_path)]) == 0, capsys.readouterr().err
    assert (root / "data" / "teacher_cache").is_dir()  # the seed's cache_dir, relative to the root
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_path)]) == 0, capsys.readouterr().err
    teacher = events(root / "runs" / "cached_mode", "teacher")[0]
    assert teacher["mode"] == "cached" and teacher["provider"] == "cached"
    # the report says where it went and how to fill the cache
    assert main(["migrate-config", "seed/old.yaml"]) == 0
    err = capsys.readouterr().err
    assert "train.teacher_mode" in err and "distill cache-logits" in err


def test_migrate_to_stdout_writes_absolute_paths_of_the_seed_root(tmp_path, monkeypatch, capsys):
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "old.yaml").write_text("train_data_path: data/prep\ncache_dir: data/cache\n"
                                                "resume_from: runs/direct_mode/checkpoint_latest.pt\n")
    monkeypatch.chdir(tmp_path)
    assert main(["migrate-config", "seed/old.yaml"]) == 0
    new = yaml.safe_load(capsys.readouterr().out)
    assert new["data"]["tokenized_dir"] == str(tmp_path / "data" / "prep")
    assert new["logit_cache"]["dir"] == str(tmp_path / "data" / "cache")
    assert new["train"]["resume_from"] == str(tmp_path / "runs" / "direct_mode")  # the seed's file -> its folder


def test_distill_teacher_url_redirects_the_clis_network_teacher(tmp_path, monkeypatch, small_corpus, capsys):
    cfg = tmp_path / "net.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"tokenized_dir": str(small_corpus["tokenized"]), "root": str(tmp_path / "d")},
        "tokenizer": {"dir": str(small_corpus["tokenizer"])}, "student": TINY,
        "teacher": {"url": "http://127.0.0.1:9/config-url", "max_retries": 0, "timeout_s": 2},
        "train": {"teacher_mode": "network", "max_steps": 1, "batch_size": 2, "teacher_topk": 16, "device": "cpu",
                  "output_dir": str(tmp_path / "run")},
        "tokenize": {"max_seq_length": 64}, "wandb": {"mode": "disabled"}}))
    monkeypatch.setenv("DISTILL_TEACHER_URL", "http://127.0.0.1:9/env-url")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "env-url" in err and "config-url" not in err

    from distill_dag.config import load_config
    from distill_dag.teacher.providers.factory import teacher_url

    assert teacher_url(load_config(cfg).teacher) == "http://127.0.0.1:9/env-url"
    monkeypatch.delenv("DISTILL_TEACHER_URL")
    assert teacher_url(load_config(cfg).teacher) == "http://127.0.0.1:9/config-url"


def test_distill_alpha_in_our_config_says_its_meaning_is_inverted(tmp_path):
    from distill_dag.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text("distill_alpha: 0.2\n")
    with pytest.raises(ConfigError, match=r"did you mean `train.distill_alpha`\?.*inverted.*1 - the seed's"):
        load_config(p)
    from distill_dag.migrate import migrate

    assert migrate({"distill_alpha": 0.2})[0]["train"]["distill_alpha"] == pytest.approx(0.8)


def test_the_seeds_resume_file_means_its_run_folder(tmp_path, monkeypatch, capsys):
    from distill_dag.cli import _seed_resume
    from distill_dag.config import ConfigError

    (tmp_path / "runs" / "direct_mode").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _seed_resume("runs/direct_mode/checkpoint_latest.pt") == "runs/direct_mode"
    assert "run folder" in capsys.readouterr().err
    assert _seed_resume("runs/direct_mode") == "runs/direct_mode"
    with pytest.raises(ConfigError, match="run folder"):
        _seed_resume("runs/direct_mode/model.pt")


def test_seed_cache_teacher_logits_without_a_config_says_what_to_give(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["cache_teacher_logits", "--data-path", "D", "--output-dir", "C"]) == 2
    err = capsys.readouterr().err
    assert "migrate-config" in err and "--model" in err and "--config" in err


def test_skip_existing_and_force_together_are_refused(tmp_path, capsys):
    assert main(["preprocess", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--skip-existing",
                 "--force"]) == 2
    assert "--skip-existing and --force" in capsys.readouterr().err


@pytest.mark.parametrize("env,mode", [("disabled", "disabled"), ("offline", "offline"), ("", "offline")])
def test_wandb_mode_env_is_honoured_under_auto(monkeypatch, env, mode):
    from distill_dag.config import WandbConfig
    from distill_dag.training.telemetry import wandb_mode

    monkeypatch.setenv("WANDB_MODE", env)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(WandbConfig()) == mode
    assert wandb_mode(WandbConfig(mode="online")) == "online"  # an explicit wandb.mode still wins


def test_train_without_any_tokenizer_names_the_three_ways_to_give_one(tmp_path, small_corpus, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"tokenized_dir": str(small_corpus["tokenized"]), "root": str(tmp_path)},
                                   "tokenizer": {"name_or_path": None}, "student": TINY,
                                   "train": {"pretrain_ce_only": True, "max_steps": 1}, "tokenize": {"max_seq_length": 64}}))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"no tokenizer in {tmp_path / 'tokenizer'}" in err and "distill train --tokenizer DIR" in err
    assert "tokenizer.name_or_path" in err and "distill tokenizer --output" in err


def test_eval_reports_land_beside_the_evaluated_checkpoint(tmp_path):
    from distill_dag.eval.report import report_dir_of

    run = tmp_path / "runs" / "direct"
    (run / "final").mkdir(parents=True)
    assert report_dir_of(run / "final") == run / "eval"
    assert report_dir_of(run) == run / "eval"
    a, b = report_dir_of(run / "checkpoint-000100"), report_dir_of(run / "checkpoint-000200")
    assert a != b and a.parent == run  # two checkpoints, two reports, both in their run


def test_rows_longer_than_the_teachers_positions_are_warned(tmp_path, tiny_teacher_dir):
    from distill_dag.teacher.providers.factory import length_warning, teacher_max_positions

    n = teacher_max_positions(tiny_teacher_dir)
    assert n is not None
    assert length_warning(tiny_teacher_dir, n) is None
    msg = length_warning(tiny_teacher_dir, n + 1)
    assert msg is not None and f"max_position_embeddings {n}" in msg and f"--max-seq-length {n}" in msg
    assert length_warning("no/such-model-offline", 1 << 20) is None


def test_bundled_teacher_ft_has_the_seeds_lora_rank():
    from distill_dag.config import load_config

    assert load_config("teacher_ft.yaml").teacher_ft.lora_r == 64  # the seed's "LoRA rank-64 adapters"
