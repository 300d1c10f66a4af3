"""The students through Dagster: KD and CE-only as two assets (in process), and the KD student launched
by torchrun through Dagster Pipes."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from distill_dag.defs.assets import student
from distill_dag.defs.resources import PipelineConfigResource, TeacherEndpointResource, WandbSettingsResource


def _config_file(tmp_path, corpus, teacher, **train_kw):
    train = dict(teacher_mode="direct", teacher_topk=16, max_steps=3, batch_size=4, grad_accum=1, warmup_steps=1,
                 log_interval=1, eval_interval=3, eval_batches=2, save_interval=0, device="cpu",
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
            "wandb": WandbSettingsResource(), "pipes_subprocess_client": dg.PipesSubprocessClient()}


def _metadata(result, key="student_ckpt"):
    return result.asset_materializations_for_node(key)[-1].metadata


def test_kd_and_ce_only_students_are_two_assets_compared_by_a_check(tmp_path, small_corpus, tiny_teacher_dir):
    res = dg.materialize([student.student_ce_baseline, student.student_ckpt, student.kd_beats_ce_only],
                         resources=_resources(_config_file(tmp_path, small_corpus, tiny_teacher_dir)))
    assert res.success
    kd, ce = _metadata(res), _metadata(res, "student_ce_baseline")
    assert kd["steps"].value == ce["steps"].value == 3 and kd["tokens"].value == ce["tokens"].value
    assert kd["val_loss"].value > 0 and ce["val_loss"].value > 0
    assert kd["lineage"].value["teacher_mode"] == "direct" and ce["lineage"].value["teacher_mode"] is None
    assert kd["path"].value == str(tmp_path / "run" / "final") and ce["path"].value == str(tmp_path / "run_ce_only" / "final")
    checks = {(c.asset_key.to_user_string(), c.check_name): c for c in res.get_asset_check_evaluations()}
    assert checks[("student_ckpt", "loads_and_generates")].passed
    assert checks[("student_ce_baseline", "loads_and_generates")].passed
    cmp = checks[("student_ckpt", "kd_beats_ce_only")]
    assert cmp.severity == dg.AssetCheckSeverity.WARN
    assert "held-out CE: KD" in cmp.description
    assert "data:image/png;base64," in cmp.metadata["comparison"].value


def test_student_ckpt_torchrun_through_pipes(tmp_path, small_corpus, tiny_teacher_dir):
    cfg = _config_file(tmp_path, small_corpus, tiny_teacher_dir, launcher="torchrun", nproc_per_node=2,
                       batch_size=2, ce_only_baseline=False)
    res = dg.materialize([student.student_ckpt], resources=_resources(cfg))
    assert res.success
    meta = _metadata(res)
    assert meta["steps"].value == 3
    assert "world_size=2" in (tmp_path / "run" / "train.log").read_text()
    assert meta["lineage"].value["teacher_mode"] == "direct"
