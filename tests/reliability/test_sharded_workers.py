"""Work split over workers that share nothing but the folder:
- the logit cache by shard: two concurrent `distill cache-logits --shards` processes on disjoint shard
  sets give, once a third run has looked, a complete cache byte-identical to a single worker's;
- tokenization by input: two concurrent `distill preprocess --worker i/2` fill the token cache, and the
  packing run then encodes nothing and writes the shards and manifest of a single-process run."""

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
PREPROCESS = [sys.executable, "-m", "distill_dag.cli", "preprocess"]


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


def _jsonl_inputs(root: Path, n: int) -> Path:
    """n JSONL inputs of unequal sizes (stdlib text), a bad line in one, one in a subfolder."""
    from support import stdlib_jsonl

    for i in range(n):
        path = root / ("sub" if i == 3 else "") / f"part-{i}.jsonl"
        stdlib_jsonl(path, 20_000 * (i + 1), doc_chars=3000 + 1000 * i)  # different cuts: different text
    with open(root / "part-1.jsonl", "a") as f:
        f.write('{"text": broken\n')
    return root


def _outputs(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(d.glob("*.parquet")) + [d / "manifest.json", d / "rejects.jsonl"]}


def test_two_tokenize_workers_fill_the_cache_and_packing_equals_one_process(tmp_path, small_corpus):
    raw = _jsonl_inputs(tmp_path / "raw", 5)
    args = ["--input", str(raw), "--recursive", "--tokenizer", str(small_corpus["tokenizer"]),
            "--max-seq-length", "64", "--rows-per-shard", "64", "--val-fraction", "0.1"]
    shared = tmp_path / "shared"
    workers = [start_child([*PREPROCESS, *args, "--output", str(shared), "--worker", f"{w}/2"]) for w in (0, 1)]
    for w in workers:  # at the same time, on one output folder
        w.wait(300)
        out = w.stdout.read().decode(errors="replace")
        assert w.returncode == 0, out[-3000:]
    assert not list(shared.glob("*.parquet")) and not (shared / "manifest.json").exists()  # workers pack nothing
    assert len(list((shared / ".cache").glob("*.json"))) == 5  # every input cached, by one worker or the other

    pack = run_child([*PREPROCESS, *args, "--output", str(shared), "--skip-existing"])
    assert pack.returncode == 0, pack.stderr[-3000:]
    assert "tokenized 0 input(s), reused 5 from the cache" in pack.stdout

    single = tmp_path / "single"
    one = run_child([*PREPROCESS, *args, "--output", str(single)])
    assert one.returncode == 0, one.stderr[-3000:]
    assert _outputs(shared) == _outputs(single) and len(_outputs(single)) > 4
    assert not list(shared.glob(".*.tmp")) and not list((shared / ".cache").glob(".*.tmp"))


def test_workers_split_inputs_by_size_and_every_input_once(tmp_path):
    from distill_dag.data.pack import InputFile, worker_inputs

    files = [InputFile(f"f{i}", tmp_path / f"f{i}", "", b) for i, b in enumerate([50, 10, 40, 30, 20, 5])]
    parts = [worker_inputs(files, w, 3) for w in range(3)]
    assert sorted(f.key for part in parts for f in part) == sorted(f.key for f in files)
    loads = [sum(f.bytes for f in part) for part in parts]
    assert sorted(loads) == [50, 50, 55]  # largest first, each to the least loaded: 50+5 / 40+10 / 30+20
    assert all(part == sorted(part, key=lambda f: f.key) for part in parts)  # input order kept
