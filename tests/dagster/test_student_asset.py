"""student_ckpt through Dagster: in process, and launched by torchrun through Dagster Pipes."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from distill_dag.assets import student
from distill_dag.resources import PipelineConfigResource, TeacherEndpointResource, WandbSettingsResource


def _config_file(tmp_path, corpus, teacher, **train_kw):
    train = dict(teacher_mode="direct", teacher_topk=16, max_steps=3, batch_size=4, grad_accum=1, warmup_steps=1,
                 log_interval=1, eval_interval=0, eval_batches=2, save_interval=0, device="cpu",
                 loss_chunk_tokens=64, ce_only_baseline=True, output_dir=str(tmp_path / "run"))
    train.update(train_kw)
    cfg = {
        "data": {"root": str(corpus["root"])},
        "tokenize": {"max_seq_length": 64},
        "teacher": {"model_name_or_path": str(teacher)},
        "teacher_ft": {"output_dir": str(tmp_path / "no_teacher_ft")},
        "student": {"variant": "tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "intermediate_size": 64},
                    "chunk_size": 16},
        "train": train,
        "wandb": {"mode": "disabled"},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _resources(path):
    return {"pipeline": PipelineConfigResource(config_file=str(path)), "teacher_endpoint": TeacherEndpointResource(),
            "wandb": WandbSettingsResource()}


def _metadata(result):
    return result.asset_materializations_for_node("student_ckpt")[-1].metadata


def test_student_ckpt_in_process_reports_kd_and_ce_only_baseline(tmp_path, small_corpus, tiny_teacher_dir):
    res = dg.materialize([student.student_ckpt], resources=_resources(_config_file(tmp_path, small_corpus, tiny_teacher_dir)))
    assert res.success
    meta = _metadata(res)
    assert meta["steps"].value == 3
    assert meta["val_loss"].value > 0 and meta["ce_only_val_loss"].value > 0
    assert "data:image/png;base64," in meta["loss_curve"].value
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run_ce_only" / "final" / "model.safetensors").exists()


def test_student_ckpt_torchrun_through_pipes(tmp_path, small_corpus, tiny_teacher_dir):
    cfg = _config_file(tmp_path, small_corpus, tiny_teacher_dir, launcher="torchrun", nproc_per_node=2,
                       batch_size=2, ce_only_baseline=False)
    res = dg.materialize([student.student_ckpt], resources=_resources(cfg))
    assert res.success
    meta = _metadata(res)
    assert meta["steps"].value == 3
    assert "world_size=2" in (tmp_path / "run" / "train.log").read_text()
    assert meta["lineage"].value["teacher_mode"] == "direct"
