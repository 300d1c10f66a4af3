"""Every writer killed in the middle of a file: the reader never sees a half file, the rerun is clean.

Shard writers and cache shards already have kill tests (tests/data/test_pack.py,
tests/teacher/test_logit_cache.py); here: the checkpoint (trainer_state.pt half written), the
``checkpoint_latest`` pointer and the data ``manifest.json``. The child writes half of the file's
bytes, fsyncs them, drops a marker and waits to be SIGKILLed: the kill lands inside the file.
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _rel import cfg_dict, kill_group, metrics, run_child, start_child, wait_for, write_cfg  # noqa: E402
from support import stdlib_jsonl  # noqa: E402

from distill_dag.data.dataset import PackedDataset  # noqa: E402
from distill_dag.data.manifest import Manifest  # noqa: E402
from distill_dag.data.pack import is_val, tokenize_to_parquet  # noqa: E402
from distill_dag.training.checkpoint import LATEST, load_trainer_state  # noqa: E402
from distill_dag.io import sha256_file  # noqa: E402

# patches a writer so that its N-th write stops half way, fsynced, and waits for the kill
_HALF_WRITE = textwrap.dedent("""
    import io, os, pathlib, sys, time
    MARK, WHAT, NTH = os.environ["HALF_MARK"], os.environ["HALF_WHAT"], int(os.environ["HALF_NTH"])
    seen = [0]

    def stop_half_way(data, write_to):
        seen[0] += 1
        if seen[0] != NTH:
            return False
        with open(write_to, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        pathlib.Path(MARK).write_text(str(write_to))
        time.sleep(600)

    if WHAT == "torch.save":
        import torch
        real_save = torch.save

        def save(obj, f, *a, **k):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            if not stop_half_way(buf.getvalue(), f):
                pathlib.Path(f).write_bytes(buf.getvalue())
        torch.save = save
    else:  # a prefix of the temp file's name, e.g. ".checkpoint_latest." or ".manifest.json."
        real_wb = pathlib.Path.write_bytes

        def write_bytes(self, data):
            if self.name.startswith(WHAT) and stop_half_way(data, self):
                return
            return real_wb(self, data)
        pathlib.Path.write_bytes = write_bytes
""")

_TRAIN = _HALF_WRITE + textwrap.dedent("""
    from distill_dag.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
""")

_TOKENIZE = _HALF_WRITE + textwrap.dedent("""
    from distill_dag.data.pack import tokenize_to_parquet
    tokenize_to_parquet(sys.argv[1], sys.argv[2], sys.argv[3], 64, rows_per_shard=64, val_fraction=0.1)
""")


def _kill_inside_the_write(args, tmp_path, what, nth, **env):
    mark = tmp_path / "half.mark"
    child = start_child(args, HALF_MARK=str(mark), HALF_WHAT=what, HALF_NTH=str(nth), **env)
    try:
        wait_for(mark.exists, child, what=f"write #{nth} of {what}")
    finally:
        kill_group(child, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    half = Path(mark.read_text())
    assert half.exists() and half.stat().st_size > 0  # the half file really is on disk
    return half


@pytest.mark.parametrize("what,nth,kept", [
    ("torch.save", 2, 2),  # the 2nd checkpoint (step 4) dies inside trainer_state.pt
    (".checkpoint_latest.", 2, 2),  # step-4 is complete, the pointer to it dies half written
])
def test_checkpoint_killed_mid_file_leaves_the_previous_one_and_the_rerun_is_clean(
        tmp_path, small_corpus, tiny_teacher_dir, what, nth, kept):
    d = cfg_dict(tmp_path, small_corpus, tiny_teacher_dir, max_steps=6, save_interval=2)
    cfg = write_cfg(tmp_path / "cfg.yaml", d)
    run_dir = tmp_path / "run"
    half = _kill_inside_the_write([sys.executable, "-c", _TRAIN, "--config", str(cfg)], tmp_path, what, nth)
    assert half.name.startswith(".") or half.parent.name.startswith(".")  # only ever a temp name

    # the reader: checkpoint_latest is whole and names a whole, verified checkpoint
    assert (run_dir / LATEST).read_text() == f"checkpoints/step-{kept:07d}\n"
    path, state, _ = load_trainer_state(run_dir)
    assert path.name == f"step-{kept:07d}" and state["step"] == kept
    visible = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    for name in visible:  # every checkpoint under its real name is whole
        load_trainer_state(run_dir / "checkpoints" / name)

    # the rerun resumes from it, finishes, and leaves no temp file or directory behind
    r = run_child([sys.executable, "-m", "distill_dag.train", "--config", str(cfg), "--resume-from", str(run_dir)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [e["step"] for e in metrics(run_dir) if e.get("event") == "resumed"] == [kept]
    assert load_trainer_state(run_dir)[1]["step"] == 6
    leftovers = [p for p in run_dir.rglob(".*") if p.name.endswith(".tmp") or p.name.endswith(".old")]
    assert not leftovers, leftovers
    # (that the resumed weights equal an uninterrupted run's is test_kill_resume.py's proof)


def _rows(data_dir: Path) -> np.ndarray:
    ds = PackedDataset(data_dir, "train")
    return np.stack([ds[i]["input_ids"].numpy() for i in range(len(ds))])


def test_manifest_killed_mid_file_leaves_the_old_manifest_over_the_old_shards(tmp_path, small_corpus):
    tok = small_corpus["tokenizer"]
    raw = stdlib_jsonl(tmp_path / "raw" / "a.jsonl", 60_000)
    out = tmp_path / "tok"
    tokenize_to_parquet(raw.parent, out, tok, 64, rows_per_shard=64, val_fraction=0.1)
    old_manifest = (out / "manifest.json").read_bytes()
    m = Manifest.load(out)
    old_shards = {s.path: sha256_file(m.shard_path(s)) for s in m.shards}
    old_rows = _rows(out)

    # the input changes without changing its length (same row count in every shard), so only the
    # shards' contents tell old from new
    lines = raw.read_text().splitlines()
    first_train = next(i for i, x in enumerate(lines) if not is_val(f"a.jsonl:{i + 1}", 0.1)
                       and not is_val(json.loads(x).get("id", ""), 0.1))
    doc = json.loads(lines[first_train])
    doc["text"] = doc["text"].replace("e", "x")
    lines[first_train] = json.dumps(doc)
    raw.write_text("\n".join(lines) + "\n")
    half = _kill_inside_the_write([sys.executable, "-c", _TOKENIZE, str(raw.parent), str(out), str(tok)],
                                  tmp_path, ".manifest.json.", 1)
    assert half.parent == out and half.name.startswith(".manifest.json.")
    # the reader sees the whole old manifest over the untouched old shards: the killed run wrote its
    # shards into a generation folder no manifest names
    assert (out / "manifest.json").read_bytes() == old_manifest
    assert {s.path: sha256_file(m.shard_path(s)) for s in m.shards} == old_shards
    assert np.array_equal(_rows(out), old_rows)

    # the rerun finishes cleanly and equals a clean run
    tokenize_to_parquet(raw.parent, out, tok, 64, rows_per_shard=64, val_fraction=0.1)
    tokenize_to_parquet(raw.parent, tmp_path / "clean", tok, 64, rows_per_shard=64, val_fraction=0.1)
    assert (out / "manifest.json").read_bytes() == (tmp_path / "clean" / "manifest.json").read_bytes()
    assert not list(out.glob(".*.tmp"))
    assert sorted(p.name for p in out.glob("gen-*")) == sorted(p.name for p in (tmp_path / "clean").glob("gen-*"))
    assert np.array_equal(_rows(out), _rows(tmp_path / "clean"))


def test_atomic_dir_makes_every_file_durable_before_the_rename(tmp_path, monkeypatch):
    """A power cut must not leave a renamed checkpoint whose files were never flushed: every file of the
    temp directory is fsynced before the directory takes the final name (then the parent is fsynced)."""
    import os

    from distill_dag import io as dio

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(dio.os, "fsync", fsync)
    monkeypatch.setattr(dio.os, "replace", replace)
    target = tmp_path / "ckpt"
    with dio.atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "trainer_state.pt").write_bytes(b"s" * 10)
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target))
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    for rel in ("model.safetensors", "sub/trainer_state.pt"):
        assert str(tmp / rel) in synced_before, (rel, events)
    assert ("fsync", str(tmp_path)) in events[rename:]  # the rename itself made durable
