"""Work split over workers that share nothing but the folder:
- the logit cache by shard: two concurrent `distill cache-logits --shards` processes on disjoint shard
  sets give a cache byte-identical to a single worker's (the per-shard unit needs no coordination);
- tokenization by input: two concurrent `distill preprocess --worker i/2` fill the token cache, and the
  packing run then encodes nothing and writes the shards and manifest of a single-process run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from _rel import cfg_dict, run_child, start_child, write_cfg  # noqa: E402

from distill_dag.io import sha256_file  # noqa: E402

CACHE = [sys.executable, "-m", "distill_dag.cli", "cache-logits"]
PREPROCESS = [sys.executable, "-m", "distill_dag.cli", "preprocess"]


def _cache_cfg(tmp_path, corpus, teacher_dir, cache_dir):
    d = cfg_dict(tmp_path, corpus, teacher_dir)
    d["logit_cache"] = {"dir": str(cache_dir), "k": 8, "batch_rows": 32}
    return write_cfg(tmp_path / f"{cache_dir.name}.yaml", d)


def _shard_files(cache_dir: Path) -> dict[str, str]:
    return {p.parent.name.rsplit("-", 1)[0]: sha256_file(p) for p in sorted(cache_dir.glob(".gen/*/records.npy"))}


def test_two_cli_workers_on_disjoint_shards_equal_one_worker(tmp_path, small_corpus, tiny_teacher_dir):
    """`distill cache-logits --shards` is a thin loop over the per-shard unit: no coordination between workers."""
    n = len(json.loads((small_corpus["tokenized"] / "manifest.json").read_text())["shards"])
    assert n >= 4
    shared = tmp_path / "shared"
    cfg = _cache_cfg(tmp_path, small_corpus, tiny_teacher_dir, shared)
    halves = [",".join(str(i) for i in range(n) if i % 2 == w) for w in (0, 1)]
    workers = [start_child([*CACHE, "--config", str(cfg), "--shards", h]) for h in halves]  # at the same time
    for w in workers:
        w.wait(600)
        out = w.stdout.read().decode(errors="replace")
        assert w.returncode == 0, out[-3000:]
    single = tmp_path / "single"
    one = run_child([*CACHE, "--config", str(_cache_cfg(tmp_path, small_corpus, tiny_teacher_dir, single))])
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"{n}/{n} data shards cached" in one.stdout
    assert _shard_files(shared) == _shard_files(single) and len(_shard_files(single)) == n
    assert not list(shared.glob(".build/*/"))  # no build folder left behind


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
    from distill_dag.data.shards import shard_files

    files = {p.relative_to(d).as_posix(): sha256_file(p) for p in shard_files(d)}
    return files | {name: sha256_file(d / name) for name in ("manifest.json", "rejects.jsonl")}


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
