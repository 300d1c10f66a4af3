"""Two raw errors made clear: a full disk while checkpointing (torch.save reports ENOSPC as a
RuntimeError, "basic_ios::clear") and `distill eval` on a truncated model.safetensors."""

from __future__ import annotations

import os

import pytest
import torch

from distill_dag.config import config_from_dict
from distill_dag.training import checkpoint as ck
from distill_dag.model.variants import build_student

TINY = {"variant": "tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                         "intermediate_size": 64}, "chunk_size": 16}


def _model():
    torch.manual_seed(0)
    return build_student(config_from_dict({"student": TINY}).student, 64)


def test_disk_full_while_checkpointing_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    model = _model()
    first = ck.save_checkpoint(tmp_path, 1, model, {"step": 1}, {})
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):  # what torch.save raises when the device has no space left
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(ck.CheckpointError, match=r"step-0000002 failed: basic_ios.*previous checkpoint .*step-0000001 "
                                                 r"is intact.*--resume-from"):
        ck.save_checkpoint(tmp_path, 2, model, {"step": 2}, {})
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert (tmp_path / ck.LATEST).read_text().strip() == f"checkpoints/{first.name}"
    ck.verify_checkpoint(first)  # the previous one still verifies
    assert not (tmp_path / "checkpoints" / "step-0000002").exists()


def test_eval_on_a_truncated_safetensors_names_the_file(tmp_path):
    from distill_dag.eval.report import _load_causal_lm

    folder = ck.save_checkpoint(tmp_path, 1, _model(), {"step": 1}, {})
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ck.CheckpointError, match=rf"{weights}.* is corrupt"):
        _load_causal_lm(folder, torch.device("cpu"))
    (folder / "checksums.json").unlink()  # a folder without our checksums: the loader's own error, with the path
    with pytest.raises(RuntimeError, match=rf"{folder}.*(safetensors|load)"):
        _load_causal_lm(folder, torch.device("cpu"))
