"""Issue 30's leftovers on reads whose size we do not control (points 4, 6, 11).

- ``distill train --resume-from`` a checkpoint whose ``model.safetensors`` was replaced by a symlink to
  ``/dev/zero``: ``checksums.json`` verification hashed it forever; now it is refused at once, naming the
  file, and nothing trains.
- An input that fails to read (EIO) names the file. ``/proc/self/mem`` is a real source of EIO: it is a
  regular file to ``stat``, and reading it at offset 0 (an unmapped address) fails with EIO.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

import pytest

from _rel import TRAIN_CHILD, cfg_dict, metrics, run_child, write_cfg  # noqa: E402
from distill_dag.training.checkpoint import LATEST, CheckpointError, load_trainer_state  # noqa: E402
from distill_dag.io import sha256_file  # noqa: E402
from distill_dag.safe_read import UnsafeFileError  # noqa: E402

EIO_FILE = "/proc/self/mem"


@contextlib.contextmanager
def _fails_after(seconds: int):
    """A hang (the endless hash this guards against) fails the test instead of stalling the suite."""
    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s: an unbounded read")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _gives_eio() -> bool:
    try:
        with open(EIO_FILE, "rb") as f:
            f.read(16)
    except OSError as err:
        return err.errno == errno.EIO
    return False


def test_resume_from_a_checkpoint_whose_weights_link_to_dev_zero_is_refused_at_once(tmp_path, small_corpus,
                                                                                   tiny_teacher_dir):
    d = cfg_dict(tmp_path / "a", small_corpus, tiny_teacher_dir, max_steps=2, save_interval=2)
    cfg = write_cfg(tmp_path / "a.yaml", d)
    r = run_child([*TRAIN_CHILD, "--config", str(cfg)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run_dir = tmp_path / "a" / "run"
    ckpt = run_dir / (run_dir / LATEST).read_text().strip()
    weights = ckpt / "model.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")

    t0 = time.monotonic()
    with _fails_after(10), pytest.raises(CheckpointError, match=rf"{weights}.*character device.*older checkpoint"):
        load_trainer_state(run_dir)
    assert time.monotonic() - t0 < 5  # it was an endless hash before

    steps_before = [m for m in metrics(run_dir) if m.get("kind") == "train"]
    resume = write_cfg(tmp_path / "b.yaml", {**d, "train": {**d["train"], "max_steps": 4}})
    t0 = time.monotonic()
    r = run_child([*TRAIN_CHILD, "--config", str(resume), "--resume-from", str(run_dir)], timeout=120)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert "model.safetensors" in r.stderr and "character device" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert took < 60, f"the refusal took {took:.0f} s"  # the child's imports dominate; the check itself is instant
    assert [m for m in metrics(run_dir) if m.get("kind") == "train"] == steps_before  # nothing trained


@pytest.mark.skipif(not _gives_eio(), reason=f"{EIO_FILE} gives no EIO here")
def test_an_input_that_fails_to_read_names_the_file(tmp_path):
    from distill_dag.data.jsonl import iter_jsonl
    from distill_dag.data.paths import discover_inputs

    link = tmp_path / "in" / "broken.jsonl"
    link.parent.mkdir()
    link.symlink_to(EIO_FILE)
    # the JSONL reader: read() errors carry no file name of their own
    with pytest.raises(OSError, match=rf"{link}: cannot read the input after line 0") as got:
        list(iter_jsonl(link))
    assert got.value.errno == errno.EIO and got.value.filename == str(link)
    # hashing (input discovery, checkpoints, caches) names it too
    with pytest.raises(UnsafeFileError, match=rf"{link}: cannot read the file \(Input/output error\)"):
        sha256_file(link)
    with pytest.raises(UnsafeFileError, match=rf"{link}.*Input/output error"):
        discover_inputs([link.parent])


def test_sha256_file_matches_hashlib_and_refuses_devices_fifos_at_once(tmp_path):
    import hashlib

    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(3 << 20) + b"tail")
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    for p, kind in ((fifo, "FIFO"), (zero, "character device")):
        t0 = time.monotonic()
        with _fails_after(10), pytest.raises(UnsafeFileError, match=rf"{p}: .*{kind}"):
            sha256_file(p)
        assert time.monotonic() - t0 < 1
    assert not Path(fifo).is_file()


def test_ownership_checks_never_block_on_a_fifo_named_like_our_index_files(tmp_path):
    from distill_dag.io import MARKER, ownership

    # a weights-only folder is recognised as a teacher finetune's output through metrics.json beside it;
    # a FIFO there blocked that read (open() waits for a writer), and so did a FIFO named like our marker
    weights = tmp_path / "run" / "final_model"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text("{}")
    os.mkfifo(tmp_path / "run" / "metrics.json")
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "x.txt").write_text("x")
    os.mkfifo(marked / MARKER)
    with _fails_after(10):
        assert ownership(weights) == "foreign"
        assert ownership(marked) == "foreign"
