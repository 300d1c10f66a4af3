"""The logit cache split by shard over workers that share nothing but the folder: two concurrent
`distill cache-logits --shards` processes on disjoint shard sets give, once a third run has looked,
a complete cache byte-identical to a single worker's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "distill"))
from _rel import cfg_dict, run_child, start_child, write_cfg  # noqa: E402

from distill_dag.io import sha256_file  # noqa: E402

CACHE = [sys.executable, "-m", "distill_dag.cli", "cache-logits"]


def _cache_cfg(tmp_path, corpus, teacher_dir, cache_dir):
    d = cfg_dict(tmp_path, corpus, teacher_dir)
    d["logit_cache"] = {"dir": str(cache_dir), "k": 8, "batch_rows": 32}
    return write_cfg(tmp_path / f"{cache_dir.name}.yaml", d)


def _shard_files(cache_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(cache_dir.glob("*.npy"))}


def test_two_workers_on_disjoint_shards_equal_one_worker(tmp_path, small_corpus, tiny_teacher_dir):
    n = len(json.loads((small_corpus["tokenized"] / "manifest.json").read_text())["shards"])
    assert n >= 4
    shared = tmp_path / "shared"
    cfg = _cache_cfg(tmp_path, small_corpus, tiny_teacher_dir, shared)
    halves = [",".join(str(i) for i in range(n) if i % 2 == w) for w in (0, 1)]
    workers = [start_child([*CACHE, "--config", str(cfg), "--shards", h]) for h in halves]  # at the same time
    outs = []
    for w in workers:
        w.wait(600)
        outs.append(w.stdout.read().decode(errors="replace"))
        assert w.returncode == 0, outs[-1][-3000:]
    metas = sorted(json.loads(p.read_text())["index"] for p in shared.glob("*.meta.json"))
    assert metas == list(range(n))  # every shard done exactly by the worker that owned it
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shared.glob("*.npy")}

    third = run_child([*CACHE, "--config", str(cfg)])
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"{n} shard(s) done, complete=True" in third.stdout
    assert stamps == {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shared.glob("*.npy")}  # nothing redone

    single = tmp_path / "single"
    one = run_child([*CACHE, "--config", str(_cache_cfg(tmp_path, small_corpus, tiny_teacher_dir, single))])
    assert one.returncode == 0, one.stderr[-3000:]
    assert _shard_files(shared) == _shard_files(single) and len(_shard_files(single)) == n
    ms, m1 = (json.loads((d / "manifest.json").read_text()) for d in (shared, single))
    assert ms["complete"] and [s["sha256"] for s in ms["shards"]] == [s["sha256"] for s in m1["shards"]]
    assert not list(shared.glob(".*.tmp")) and not list(shared.glob(".partial/*.npy"))


def test_a_worker_starting_never_deletes_a_live_workers_temp_file(tmp_path, monkeypatch):
    """Worker B opens the shared cache while worker A is inside an atomic write: A's temp file must survive."""
    from support import all_batches, write_data
    from test_teachers_helpers import tiny_llama

    from distill_dag.distill.logit_cache import CacheWriter
    from distill_dag.distill.teachers.direct import DirectTeacher

    data = write_data(tmp_path / "d", [4, 4])
    teacher = DirectTeacher(tiny_llama(), 8)
    kw = dict(k=8, vocab_size=teacher.vocab_size, teacher_identity=teacher.identity())
    cache = tmp_path / "c"
    a = CacheWriter(cache, data, **kw)
    real = pq.write_table
    started = []

    def write_then_b_starts(table, where, *args, **kwargs):
        real(table, where, *args, **kwargs)  # A's stats file is written to its temp name...
        started.append(CacheWriter(cache, data, **kw))  # ...and B starts before A renames it into place
    monkeypatch.setattr(pq, "write_table", write_then_b_starts)
    batch = [b for b in all_batches(data, 4) if int(b["shard"][0]) == 0][0]
    a.add(batch, teacher.topk(batch))  # fills shard 0: A finishes it (stats, shard, meta, manifest)
    monkeypatch.setattr(pq, "write_table", real)
    assert started and a.done(0)
    assert json.loads((cache / "train-00000.meta.json").read_text())["stats"] == "train-00000.stats.parquet"
    assert pq.read_table(cache / "train-00000.stats.parquet").num_rows == 4 * 16

    # what a killed writer left (old) is cleaned up by the next writer; a fresh temp file is not
    import os
    import time

    from distill_dag.distill.logit_cache import STALE_TMP_S

    old, fresh = cache / ".manifest.json.killed.tmp", cache / ".val-00001.npy.live.tmp"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (time.time() - STALE_TMP_S - 60,) * 2)
    CacheWriter(cache, data, **kw)
    assert not old.exists() and fresh.exists()
