"""issue 17, seed users: `distill migrate-config OLD.yaml > NEW.yaml` maps the seed's flat keys, says on
stderr what maps where and what has no equivalent (and why); the result loads and trains."""

from __future__ import annotations

import shutil

import pytest
import yaml

from distill_dag.cli import main
from distill_dag.config import load_config
from distill_dag.migrate import SEED_KEYS, migrate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED_TWELVE = ["model_variant", "max_seq_length", "teacher_model", "teacher_topk", "distill_alpha", "train_data_path",
               "val_data_path", "num_workers", "use_pretokenized_data", "teacher_adapter_path", "cache_logits",
               "cache_dir"]

# the seed's configs/train_direct.yaml, in its style (flat keys, seed names)
SEED_TRAIN_DIRECT = """\
model_variant: "500M"
teacher_mode: "direct"
teacher_model: "meta-llama/Llama-3.2-1B"
teacher_adapter_path: null
teacher_topk: 512
teacher_temperature: 2.0
distill_alpha: 0.2
max_seq_length: 1024
physical_batch_size: 1
gradient_accumulation_steps: 256
learning_rate: 3.0e-4
min_lr: 3.0e-5
max_steps: 60000
train_data_path: "data/distillation_preprocessed"
val_data_path: "data/distillation_preprocessed"
num_workers: 0
use_pretokenized_data: true
cache_logits: false
cache_dir: "data/teacher_cache/"
use_bf16: true
output_dir: "runs/stage1_kd"
saddle_escape:
  interventions_enabled: false
  cooldown_steps: 250
"""


def test_every_seed_headline_key_is_known():
    assert all(k in SEED_KEYS for k in SEED_TWELVE)


def test_migrate_maps_and_explains(tmp_path, capsys, monkeypatch):
    old = tmp_path / "train_direct.yaml"
    old.write_text(SEED_TRAIN_DIRECT)
    monkeypatch.chdir(tmp_path)  # the seed's project root
    assert main(["migrate-config", str(old)]) == 0
    captured = capsys.readouterr()
    new = yaml.safe_load(captured.out)
    assert new["student"]["variant"] == "500M" and new["tokenize"]["max_seq_length"] == 1024
    assert new["train"]["distill_alpha"] == pytest.approx(0.8)  # the seed's alpha weights CE, ours KL
    assert new["train"]["grad_accum"] == 256 and new["train"]["batch_size"] == 1
    assert new["train"]["min_lr_ratio"] == pytest.approx(0.1)
    assert new["data"]["tokenized_dir"] == str(tmp_path / "data/distillation_preprocessed")  # NEW.yaml on stdout:
    assert new["logit_cache"]["dir"] == str(tmp_path / "data/teacher_cache")  # absolute, from the seed's root
    assert new["tokenizer"]["name_or_path"] == "meta-llama/Llama-3.2-1B"
    assert new["train"]["saddle_cooldown"] == 250
    err = captured.err
    assert "model_variant" in err and "student.variant" in err
    for dropped in ("num_workers", "use_pretokenized_data", "val_data_path", "use_bf16"):
        line = next(x for x in err.splitlines() if x.strip().startswith(dropped + ":"))
        assert "(" in line  # with the reason
    (tmp_path / "new.yaml").write_text(captured.out)
    cfg = load_config(tmp_path / "new.yaml")
    assert cfg.tokenized_dir == tmp_path / "data" / "distillation_preprocessed"  # where the seed's pointed


def test_unknown_variant_is_reported_not_silently_dropped(tmp_path, capsys):
    old = tmp_path / "o.yaml"
    old.write_text("model_variant: titan_mac_350M\n")
    assert main(["migrate-config", str(old)]) == 1
    assert "student.variant" in capsys.readouterr().err


def test_an_already_migrated_config_is_printed_unchanged(tmp_path, capsys):
    p = tmp_path / "ours.yaml"
    p.write_text("train:\n  max_steps: 3\n")
    assert main(["migrate-config", str(p)]) == 0
    out = capsys.readouterr()
    assert out.out == p.read_text() and "already" in out.err


def test_a_migrated_seed_config_trains(tmp_path, monkeypatch, small_corpus, tiny_teacher_dir, capsys):
    """The seed's flat keys, with a tiny teacher and the test corpus, migrated and trained two steps."""
    root = tmp_path / "seedproj"
    shutil.copytree(small_corpus["tokenized"], root / "data" / "distillation_preprocessed")
    shutil.copytree(small_corpus["tokenizer"], root / "data" / "tokenizer")
    seed = yaml.safe_load(SEED_TRAIN_DIRECT)
    seed.update(teacher_model=str(tiny_teacher_dir), max_seq_length=64, teacher_topk=16, physical_batch_size=2,
                gradient_accumulation_steps=1, max_steps=2, device="cpu", save_interval=0, eval_interval=0,
                log_interval=1)
    seed.pop("saddle_escape")
    (root / "old.yaml").write_text(yaml.safe_dump(seed))
    monkeypatch.chdir(root)  # the seed's project root: its relative paths were relative to it
    assert main(["migrate-config", str(root / "old.yaml")]) == 0
    new = yaml.safe_load(capsys.readouterr().out)
    new["tokenizer"] = {"name_or_path": None}  # the teacher folder holds no tokenizer: the corpus' BPE it is
    new["data"]["root"] = "data"
    new["student"].update(variant="tiny", overrides={"hidden_size": 32, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "intermediate_size": 64},
                          chunk_size=16)
    new["train"]["loss_chunk_tokens"] = 64
    new["wandb"] = {"mode": "disabled"}
    (root / "new.yaml").write_text(yaml.safe_dump(new))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(root / "new.yaml")]) == 0, capsys.readouterr().err
    assert "student: 2 steps" in capsys.readouterr().out
    assert (root / "runs" / "stage1_kd" / "final").is_dir()  # output_dir relative to the new config


def test_seed_cache_teacher_logits_flags_work_as_an_alias(tmp_path, monkeypatch, capsys):
    import distill_dag.teacher.cache_stage as stage

    seen = {}

    def fake_build(cfg, **kw):
        seen["cfg"] = cfg
        return {"written": [], "reused": [], "shards_present": 0, "shards_total": 0}

    monkeypatch.setattr(stage, "build_logit_cache", fake_build)
    monkeypatch.chdir(tmp_path)
    assert main(["cache_teacher_logits", "--config", "demo.yaml", "--data-path", "prep", "--output-dir", "cache"]) == 0
    assert seen["cfg"].tokenized_dir == tmp_path / "prep" and seen["cfg"].cache_dir == tmp_path / "cache"
