"""Issue 30 point 1 for checkpoints and the logit cache: a stage deletes only what it wrote itself.

- ``checkpoints/``: pruning old checkpoints and cleaning a killed save's leftovers touch only folders with
  our marker (or a pre-marker checkpoint its ``checksums.json`` accounts for) and the temp names our
  writers give; a user's ``step-*`` backup is neither deleted nor counted among the kept checkpoints.
- ``<cache_dir>/<shard key>``: publishing a cache shard never replaces a file of the user's of that name.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from support import write_data  # noqa: E402
from test_teachers_helpers import tiny_llama  # noqa: E402

from distill_dag.teacher.cache.codec import LogitCacheError  # noqa: E402
from distill_dag.teacher.cache.writer import write_cache_shard  # noqa: E402
from distill_dag.training.checkpoint import LATEST, load_trainer_state, save_checkpoint  # noqa: E402
from distill_dag.teacher.providers.direct import DirectTeacher  # noqa: E402
from distill_dag.io import MARKER


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _save(run, step, model):
    return save_checkpoint(run, step, model, {"step": torch.tensor(step)}, {"step": step}, keep=2)


def test_pruning_and_leftover_cleaning_delete_only_our_checkpoint_folders(tmp_path, model):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    # the user's: a backup named like a checkpoint, a folder under a temp-like name, and a set-aside copy
    backup = ck / "step-0000009"
    backup.mkdir(parents=True)
    (backup / "notes.txt").write_text("my notes\n")
    user_tmp = ck / ".step-0000001.abcdefgh.tmp"
    user_tmp.mkdir()
    (user_tmp / "data.csv").write_text("a,b\n")
    user_old = ck / ".step-0000002.old"
    user_old.mkdir()
    (user_old / "keep.me").write_text("x")
    user_latest_tmp = run / f".{LATEST}.abcdefgh.tmp"
    user_latest_tmp.mkdir()
    (user_latest_tmp / "f").write_text("y")

    for step in (1, 2):
        _save(run, step, model)
    # what a save killed mid-write leaves: a temp folder of checkpoint files (no marker yet), and a
    # set-aside copy of ours of a checkpoint that exists
    killed = ck / ".step-0000003.zzzzzzzz.tmp"
    shutil.copytree(ck / "step-0000001", killed)
    (killed / MARKER).unlink()
    ours_old = ck / ".step-0000001.old"
    shutil.copytree(ck / "step-0000001", ours_old)
    _save(run, 3, model)

    # keep=2 of ours: step 1 pruned; the backup step-0000009 (sorted last) was not counted, else 2 would go
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-0000002", "step-0000003", "step-0000009"]
    assert (backup / "notes.txt").read_text() == "my notes\n"
    assert (user_tmp / "data.csv").read_text() == "a,b\n"
    assert (user_old / "keep.me").read_text() == "x"
    assert (user_latest_tmp / "f").read_text() == "y"
    assert not killed.exists()
    assert not ours_old.exists()  # cleaned before the save, while step-0000001 still existed
    assert load_trainer_state(run)[0].name == "step-0000003"


def test_a_checkpoint_of_an_earlier_version_without_marker_is_still_pruned(tmp_path, model):
    run = tmp_path / "run"
    for step in (1, 2):
        _save(run, step, model)
    (run / "checkpoints" / "step-0000001" / MARKER).unlink()  # written before the marker existed
    _save(run, 3, model)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003"]


class _Counting:
    def __init__(self, inner):
        self.inner, self.k, self.vocab_size, self.calls = inner, inner.k, inner.vocab_size, 0

    def topk(self, batch):
        self.calls += 1
        return self.inner.topk(batch)

    def identity(self):
        return self.inner.identity()

    def close(self):
        pass


def test_a_cache_shard_never_replaces_a_user_file_of_its_name(tmp_path):
    data = write_data(tmp_path / "data", [6, 4])
    cache = tmp_path / "cache"
    cache.mkdir()
    mine = cache / "val-00001"
    mine.write_text("not a cache shard\n")
    teacher = _Counting(DirectTeacher(tiny_llama(), 8))
    with pytest.raises(LogitCacheError, match=rf"{mine} exists and is a file, not a cache shard.*nothing was changed"):
        write_cache_shard(teacher, data, "val-00001", cache, k=8, batch_rows=2)
    assert mine.read_text() == "not a cache shard\n"
    assert teacher.calls == 0  # refused before any teacher compute
    # a shard of ours is replaced as before (forced rebuild), and another key is written beside the file
    done = write_cache_shard(teacher, data, "train-00000", cache, k=8, batch_rows=2)
    again = write_cache_shard(teacher, data, "train-00000", cache, k=8, batch_rows=2, force=True)
    assert done.dir == again.dir and again.dir.is_symlink() and not again.reused
