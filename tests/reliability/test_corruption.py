"""Corrupt, truncated or hostile files are refused with a message naming the file; disk full while
checkpointing keeps the previous checkpoint; nothing in distill_dag unpickles arbitrary objects."""

from __future__ import annotations

import ast
import errno
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from _rel import make_cfg, metrics  # noqa: E402
from support import all_batches, write_data  # noqa: E402
from test_teachers_helpers import tiny_llama  # noqa: E402

from distill_dag.data.dataset import PackedDataset  # noqa: E402
from distill_dag.data.manifest import Manifest  # noqa: E402
from distill_dag.data.shards import CorruptShardError  # noqa: E402
from distill_dag.training import distributed as distributed_mod  # noqa: E402
from distill_dag.student import trainer as trainer_mod  # noqa: E402
from distill_dag.training.checkpoint import LATEST, CheckpointError, load_trainer_state  # noqa: E402
from distill_dag.teacher.cache import layout  # noqa: E402
from distill_dag.teacher.cache.codec import LogitCacheError  # noqa: E402
from distill_dag.teacher.cache.writer import write_logit_cache  # noqa: E402
from distill_dag.teacher.providers.cached import CachedTeacher  # noqa: E402
from distill_dag.teacher.providers.direct import DirectTeacher  # noqa: E402
from distill_dag.student.trainer import train  # noqa: E402
from distill_dag.io import sha256_file  # noqa: E402

PACKAGE = Path(trainer_mod.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_corpus, tiny_teacher_dir) -> Path:
    """A finished 2-step run with its checkpoint (step-0000002) and checkpoint_latest."""
    tmp = tmp_path_factory.mktemp("ckpt")
    res = train(make_cfg(tmp, small_corpus, tiny_teacher_dir, max_steps=2, save_interval=2))
    return res.run_dir


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / "step-0000002"


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage,match", [
    (lambda c: _truncate(c / "trainer_state.pt"), r"step-0000002/trainer_state\.pt is corrupt"),
    (lambda c: _truncate(c / "model.safetensors"), r"step-0000002/model\.safetensors is corrupt"),
    (lambda c: (c / "config.json").unlink(), r"step-0000002/config\.json is missing"),
    (lambda c: (c / "checksums.json").unlink(), r"step-0000002/checksums\.json is missing.*older one"),
    (lambda c: _truncate(c / "checksums.json"), r"step-0000002/checksums\.json is corrupt"),
    (lambda c: shutil.rmtree(c), r"checkpoint not found: .*step-0000002"),
], ids=["truncated_state", "truncated_weights", "missing_config", "missing_checksums", "truncated_checksums",
        "latest_points_nowhere"])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, trained_run, damage, match):
    run = _copy_run(trained_run, tmp_path / "run")
    damage(_ckpt(run))
    with pytest.raises(CheckpointError, match=match):
        load_trainer_state(run)


def test_resume_from_a_damaged_checkpoint_stops_before_the_first_step(tmp_path, trained_run, small_corpus,
                                                                       tiny_teacher_dir, monkeypatch):
    run = _copy_run(trained_run, tmp_path / "run")
    _truncate(_ckpt(run) / "trainer_state.pt")
    calls = []
    monkeypatch.setattr(distributed_mod, "distill_loss", lambda *a, **k: calls.append(1))
    cfg = make_cfg(tmp_path / "again", small_corpus, tiny_teacher_dir, max_steps=4, resume_from=str(run))
    with pytest.raises(CheckpointError, match="trainer_state.pt is corrupt"):
        train(cfg)
    assert not calls and not (tmp_path / "again" / "run" / "checkpoints").exists()


class _Payload:
    """Unpickling this runs code: it writes a file. A safe loader must never do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_hostile_pickle_in_trainer_state_is_never_executed(tmp_path, trained_run):
    run = _copy_run(trained_run, tmp_path / "run")
    c = _ckpt(run)
    marker = tmp_path / "executed"
    state = torch.load(c / "trainer_state.pt", weights_only=True)
    state["extra"] = _Payload(marker)
    torch.save(state, c / "trainer_state.pt")  # a full pickle, as an attacker would write it
    sums = json.loads((c / "checksums.json").read_text())
    sums["trainer_state.pt"] = sha256_file(c / "trainer_state.pt")  # ...with matching checksums
    (c / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt cannot be read"):
        load_trainer_state(run)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: plain unpickling does run it
    assert marker.read_text() == "pwned"


# ---- disk full while checkpointing ---------------------------------------------------------------
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["trainer_state", "checkpoint_latest"])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_says_so(
        tmp_path, small_corpus, tiny_teacher_dir, monkeypatch, where):
    from distill_dag.training import checkpoint as ckpt_mod

    saves = {"n": 0}
    if where == "trainer_state":
        real = torch.save

        def save(obj, f, *a, **k):
            saves["n"] += 1
            return _enospc() if saves["n"] == 2 else real(obj, f, *a, **k)
        monkeypatch.setattr(torch, "save", save)
    else:
        real_w = ckpt_mod.write_bytes_atomic

        def write(path, data):
            saves["n"] += 1
            return _enospc() if saves["n"] == 2 else real_w(path, data)
        monkeypatch.setattr(ckpt_mod, "write_bytes_atomic", write)
    cfg = make_cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=6, save_interval=2)
    with pytest.raises(CheckpointError) as info:
        train(cfg)
    msg = str(info.value)
    run = tmp_path / "run"
    assert "No space left on device" in msg and "step-0000004" in msg, msg
    assert f"{run / 'checkpoints' / 'step-0000002'}" in msg and "intact" in msg, msg
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    # the old checkpoint survives, whole, and checkpoint_latest still points at it
    assert (run / LATEST).read_text() == "checkpoints/step-0000002\n"
    path, state, _ = load_trainer_state(run)
    assert path.name == "step-0000002" and state["step"] == 2
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")]
    assert max(r["step"] for r in metrics(run) if r.get("kind") == "train") == 4  # it stopped at the failed save


# ---- data shards and cache files -----------------------------------------------------------------
def _flip(p: Path, at: float = 0.5) -> None:
    data = bytearray(p.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    p.write_bytes(bytes(data))


def test_truncated_or_flipped_data_shard_is_refused_by_the_reader_naming_it(tmp_path, small_corpus):
    d = shutil.copytree(small_corpus["tokenized"], tmp_path / "tok")
    m = Manifest.load(d)
    shard = m.shard_path(m.split_shards("train")[1][1])  # in the live generation folder
    assert shard.name == "train-00001.parquet"
    original = shard.read_bytes()
    _truncate(shard)
    with pytest.raises(CorruptShardError, match=r"train-00001\.parquet: \d+ bytes, the manifest says .*preprocess"):
        PackedDataset(d, "train")
    shard.write_bytes(original)
    _flip(shard)  # same size: only the content hash tells
    ds = PackedDataset(d, "train")
    with pytest.raises(CorruptShardError, match=r"train-00001\.parquet: sha256 differs"):
        for i in range(len(ds)):
            ds[i]


def test_training_on_a_corrupt_shard_stops_before_the_first_step(tmp_path, small_corpus, tiny_teacher_dir):
    d = shutil.copytree(small_corpus["tokenized"], tmp_path / "tok")
    m = Manifest.load(d)
    for _, s in m.split_shards("train"):  # whichever row group the first batch reads
        _flip(m.shard_path(s))
    cfg = make_cfg(tmp_path, small_corpus, tiny_teacher_dir, max_steps=2)
    cfg.data.tokenized_dir = str(d)
    with pytest.raises(CorruptShardError, match=r"train-0000\d\.parquet: sha256 differs"):
        train(cfg)
    assert not [r for r in metrics(tmp_path / "run") if r.get("kind") == "train"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    data = write_data(tmp / "data", [6, 5])
    teacher = DirectTeacher(tiny_llama(), 8)
    write_logit_cache(teacher, data, tmp / "c", 8, 4)
    return data, tmp / "c", teacher


def test_truncated_cache_shard_header_is_refused_naming_it(tmp_path, cache):
    data, src, teacher = cache
    c = shutil.copytree(src, tmp_path / "c", symlinks=True)
    header = layout.shard_dir(c, "train-00000") / layout.SHARD_HEADER
    _truncate(header)
    with pytest.raises(LogitCacheError, match=r"train-00000/shard\.json is not valid JSON.*cache-logits --shards train-00000"):
        CachedTeacher(c, data, 8)


def test_cache_shard_of_the_wrong_shape_is_refused_naming_it(tmp_path, cache):
    import numpy as np

    data, src, _ = cache
    c = shutil.copytree(src, tmp_path / "c", symlinks=True)
    shard = layout.shard_dir(c, "val-00001") / layout.RECORDS
    np.save(shard, np.zeros(3, dtype=np.float32))  # a valid .npy, just not a cache shard
    hp = layout.shard_dir(c, "val-00001") / layout.SHARD_HEADER
    h = json.loads(hp.read_text())  # even with a header that vouches for its bytes
    h["bytes"], h["records_sha256"] = shard.stat().st_size, sha256_file(shard)
    hp.write_text(json.dumps(h))
    with pytest.raises(LogitCacheError, match=r"val-00001/records\.npy: records do not match"):
        CachedTeacher(c, data, 8).topk(all_batches(data, 5)[-1])


# ---- nothing unpickles: a static check of the package ----------------------------------------------
def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, pickle/dill/joblib
    loads, numpy loads with allow_pickle=True, yaml.load/unsafe_load/full_load."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n and n.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "joblib",
                                                                 "cloudpickle", "shelve", "marshal")]
            found += [f"{filename}:{node.lineno}: imports {n}" for n in bad]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        last = name.rsplit(".", 1)[-1]
        if last == "load" and name.split(".")[0] == "torch":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{filename}:{node.lineno}: {name} without weights_only=True")
        if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
            found.append(f"{filename}:{node.lineno}: {name} with allow_pickle")
        if name.split(".")[0] == "yaml" and last in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
            found.append(f"{filename}:{node.lineno}: {name} (use yaml.safe_load)")
        if last in ("read_pickle", "loads") and name.split(".")[0] in ("pd", "pandas", "pickle", "dill"):
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_the_static_check_catches_each_unsafe_load():
    bad = ("import pickle\nimport torch, numpy as np, yaml\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
           "np.load(f, allow_pickle=True)\nyaml.load(s)\nfrom joblib import load\n")
    assert len(unsafe_loads(bad)) == 6
    good = "import torch, yaml\ntorch.load(f, map_location='cpu', weights_only=True)\nyaml.safe_load(s)\n"
    assert unsafe_loads(good) == []


def test_nothing_in_distill_dag_unpickles_arbitrary_objects():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30 and (PACKAGE / "training" / "checkpoint.py") in files
    found = [f for p in files for f in unsafe_loads(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert not found, "\n".join(found)
