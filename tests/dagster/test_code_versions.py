"""Code versions follow the code: each asset's version hashes every package module its core entry point
imports (transitively), so an edited kernel marks the models stale and leaves the data alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import distill_dag
from distill_dag.defs.assets.common import ENTRY_POINTS, asset_code_version, module_closure

PACKAGE = Path(distill_dag.__file__).parent


@pytest.fixture()
def copy(tmp_path) -> Path:
    dst = tmp_path / "distill_dag"  # the folder name is the package name the import walk follows
    shutil.copytree(PACKAGE, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_assets_carry_the_computed_versions():
    """What the UI shows is the computed version, not a hand-kept list."""
    from distill_dag.definitions import defs

    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    for name in specs:
        assert specs[name].code_version == asset_code_version(name), name


@pytest.mark.parametrize("kernel", ["kernels/kd_loss/chunked.py", "kernels/retention/chunk.py"])
def test_editing_a_kernel_changes_the_student_version_and_not_the_data(copy, kernel):
    before = {a: asset_code_version(a, root=copy) for a in ENTRY_POINTS}
    assert before == {a: asset_code_version(a) for a in ENTRY_POINTS}  # the copy hashes like the original
    src = copy / kernel
    src.write_text(src.read_text() + "\n# a kernel edit\n")
    after = {a: asset_code_version(a, root=copy) for a in ENTRY_POINTS}
    for model in ("student_ckpt", "student_ce_baseline", "student_aligned", "eval_report"):
        assert after[model] != before[model], model
    for data in ("raw_jsonl", "tokenizer", "tokenized_parquet"):
        assert after[data] == before[data], data


def test_the_walk_follows_lazy_and_relative_imports(copy):
    """Reference: the modules the trainer needs, found by hand in the source (imports inside functions, and
    ``from .chunked import`` in kernels/kd_loss/__init__.py)."""
    mods = module_closure(ENTRY_POINTS["student_ckpt"], root=copy)
    for m in ("distill_dag.kernels.kd_loss.chunked", "distill_dag.kernels.retention.chunk", "distill_dag.data.dataset",
              "distill_dag.training.distributed", "distill_dag.training.stability", "distill_dag.student.align",
              "distill_dag.teacher.providers.cached", "distill_dag.teacher.cache.reader"):
        assert m in mods, m
    assert "distill_dag.training.telemetry" not in mods  # the explicit exclusion: logging cannot change the weights
    assert not any(m.startswith("distill_dag.defs.assets.") for m in module_closure(ENTRY_POINTS["tokenized_parquet"]))


def test_a_new_module_imported_by_the_trainer_joins_the_version(copy):
    (copy / "loss" / "extra_term.py").write_text("SCALE = 2.0\n")
    before = asset_code_version("student_ckpt", root=copy)
    losses = copy / "loss" / "kd.py"
    losses.write_text(losses.read_text() + "\n\ndef _extra():\n    from distill_dag.loss.extra_term import SCALE\n"
                      "    return SCALE\n")
    mid = asset_code_version("student_ckpt", root=copy)
    (copy / "loss" / "extra_term.py").write_text("SCALE = 3.0\n")
    assert len({before, mid, asset_code_version("student_ckpt", root=copy)}) == 3
