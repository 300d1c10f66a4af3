"""Write one cache shard: the teacher's top-k for every row of one data shard, published atomically.

This is the unit of work of the ``logit_cache`` asset (one partition) and of ``distill cache-logits``
(a loop over shards). Which shards run, where and how many at once is the orchestrator's business
(Dagster partitions, backfills, the ``gpu`` pool); this module only makes one shard correct:

* rows are computed in data order and written into ``.build/<key>/`` under an exclusive lock
  (``.build/<key>.lock``): a second writer of the same shard is refused at once, and a writer killed
  half-way leaves a build folder that the next writer of that shard (holding the lock) clears;
* the finished folder is renamed to ``.gen/<key>-<version>`` and the ``<key>`` symlink is swapped to
  it in one ``rename``: readers see the previous shard or the new one, whole;
* a published shard with the same teacher, tokenizer, data shard and encoding is reused as it is
  (same bytes, same data version), unless ``force``.

``shard.json`` records the teacher twice: ``teacher`` / ``teacher_hash``, the provider's identity (for a
local teacher, the sha256 of its whole folder), and ``teacher_fingerprint``, the cheap hash of its config
and weights' headers, sizes and sampled blocks (:func:`distill_dag.teacher.model.teacher_fingerprint`)
that the trainer recomputes from the configured teacher in cached mode to refuse another teacher's cache
without reading gigabytes of weights.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from distill_dag.io import DIR_MODE, describe_path, sha256_file, sha256_json, write_json_atomic
from distill_dag.teacher.cache import layout
from distill_dag.teacher.cache.codec import CacheEncoding, LogitCacheError, LogprobDtype, SCHEMA_VERSION, TEMPERATURE_POLICY
from distill_dag.teacher.cache.stats import stats_columns, write_stats_columns
from distill_dag.teacher.model import identity_fingerprint


def overlaps_encoding(provider: Any) -> bool:
    """Whether to encode in a thread while the teacher computes the next batch: yes when the teacher
    leaves CPU cores idle (a GPU, a server across the network, torch on fewer threads than cores);
    no for a teacher on every CPU core: there a third busy thread only stalls torch's OpenMP workers at
    their barriers (measured on 2 cores, demo shape: 0.73 of the bare teacher's speed threaded, 0.83 inline)."""
    device = getattr(provider, "device", None)
    if device is None or torch.device(device).type != "cpu":
        return True
    return torch.get_num_threads() < (os.cpu_count() or 1)


@dataclass(frozen=True)
class CacheShard:
    """What one partition wrote (or found already written)."""

    key: str
    dir: Path  # the published folder, <cache_dir>/<key> (a symlink to its generation)
    header: dict[str, Any]
    reused: bool = False
    seconds: float = 0.0

    @property
    def data_version(self) -> str:
        return self.header["data_version"]

    @property
    def rows(self) -> int:
        return int(self.header["rows"])


def shard_header(dm: layout.DataManifest, shard: layout.DataShard, enc: CacheEncoding, teacher_identity: dict[str, Any],
                 teacher_fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity part of ``shard.json`` (what the records are computed from)."""
    import json

    return json.loads(json.dumps({  # through JSON once so it compares equal to a header read back
        "schema_version": SCHEMA_VERSION,
        "kind": "teacher_topk_logit_cache_shard",
        "teacher": teacher_identity,
        "teacher_hash": sha256_json(teacher_identity),
        "teacher_fingerprint": teacher_fingerprint,
        "tokenizer_hash": dm.tokenizer_hash,
        "data_shard": shard.name,
        "data_shard_sha256": shard.sha256,
        "rows": shard.rows,
        "k": enc.k,
        "temperature": TEMPERATURE_POLICY,
        "dtype": enc.logprobs,
        "encoding": enc.to_json(),
    }))


def _same_input(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    keys = (*layout.IDENTITY_KEYS, "data_shard_sha256", "rows")
    return old is not None and all(old.get(k) == new.get(k) for k in keys)


def iter_shard_batches(shard: layout.DataShard, batch_rows: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches (loader format: input_ids, attention_mask, position_ids [B, T], row, shard [B]) of
    every row of one parquet shard, in order, read one row group at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.path)
    cols = ["input_ids", "attention_mask", "position_ids"]
    start = 0
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=cols)
        n = t.num_rows
        arrs = {c: t.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.int64)
                for c in cols}
        for a in range(0, n, batch_rows):
            b = {c: torch.from_numpy(arrs[c][a : a + batch_rows]) for c in cols}
            rows = torch.arange(start + a, start + min(a + batch_rows, n), dtype=torch.long)
            b["row"] = rows
            b["shard"] = torch.full((len(rows),), shard.index, dtype=torch.long)
            yield b
        start += n


@contextmanager
def _shard_lock(cache_dir: Path, key: str) -> Iterator[Path]:
    """Exclusive right to build shard ``key``; yields its (emptied) build folder."""
    build_root = cache_dir / ".build"
    build_root.mkdir(parents=True, exist_ok=True)
    lock_path = build_root / f"{key}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LogitCacheError(
                f"{lock_path}: another run (pid {holder}) is writing logit_cache partition '{key}' right now; "
                "wait for it, or cancel that run"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        build = build_root / key
        if build.exists():  # a killed writer's leftover: nobody else can hold this lock
            shutil.rmtree(build)
        build.mkdir(mode=DIR_MODE)
        try:
            yield build
        finally:
            shutil.rmtree(build, ignore_errors=True)
    finally:
        os.close(fd)  # releases the lock


def _check_link_is_ours(link: Path, key: str) -> None:
    """``<cache_dir>/<key>`` may be replaced only when it is missing or our own symlink into ``.gen/``: the
    rename that publishes a shard would otherwise delete a user's file (or fail on a folder) of that name."""
    if not os.path.lexists(link):
        return
    if link.is_symlink() and os.readlink(link).startswith(os.path.join(".gen", f"{key}-")):
        return

    raise LogitCacheError(
        f"{link} exists and is {describe_path(link)}, not a cache shard written by distill-dag (those are symlinks "
        f"into {link.parent / '.gen'}); publishing partition '{key}' would replace it, so nothing was changed. "
        "Move it out of the cache folder, or set logit_cache.dir to a folder of its own")


def _publish(cache_dir: Path, key: str, build: Path, version: str) -> None:
    """Rename the finished build to its generation and swap the ``key`` symlink to it (one rename)."""
    gen_root = cache_dir / ".gen"
    gen_root.mkdir(exist_ok=True)
    gen = gen_root / f"{key}-{version[:16]}"
    if gen.exists():  # the same content was published before (e.g. forced rebuild, same teacher)
        shutil.rmtree(build)
    else:
        for f in build.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(build, gen)
    link = layout.shard_dir(cache_dir, key)
    _check_link_is_ours(link, key)  # again: something may have appeared there while the shard was built
    tmp = cache_dir / f".{key}.link.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.join(".gen", gen.name), tmp)
    os.replace(tmp, link)
    fd = os.open(cache_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in gen_root.glob(f"{key}-*"):  # earlier generations of this shard (readers keep open maps)
        if old != gen:
            shutil.rmtree(old, ignore_errors=True)


def write_cache_shard(
    provider: Any,
    data: str | Path | layout.DataManifest,
    key: str,
    cache_dir: str | Path,
    *,
    k: int,
    dtype: LogprobDtype = "q8",
    batch_rows: int = 8,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CacheShard:
    """Cache ``provider``'s top-k for every row of data shard ``key``; publish it atomically.

    ``progress(rows_done, rows_total)`` is called after each batch. Returns the shard's header
    (with ``data_version``, the sha256 of what was written: the same rows and teacher give the same
    bytes, hence the same version).
    """
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir)
    dm = layout.read_data_manifest(data)
    shard = dm.shard(key)
    if provider.k < k:
        raise LogitCacheError(f"teacher provider gives k={provider.k} < logit_cache.k={k}")
    enc = CacheEncoding(int(k), int(provider.vocab_size), int(dm.seq_len), dtype)
    if enc.id_bits > 25:
        raise LogitCacheError(f"vocab_size {provider.vocab_size} needs more than 25 bits per id; not supported")
    ident = provider.identity()
    want = shard_header(dm, shard, enc, ident, identity_fingerprint(ident))
    cache_dir.mkdir(parents=True, exist_ok=True)
    _check_link_is_ours(layout.shard_dir(cache_dir, key), key)  # before any teacher compute
    old = layout.read_shard_header(cache_dir, key)
    if not force and _same_input(old, want):
        if old.get("teacher_fingerprint") is None and want["teacher_fingerprint"] is not None:
            # a shard written before fingerprints, by this very teacher (same teacher_hash: its whole weights'
            # sha256): record the fingerprint instead of recomputing the records (readers see the old or new file)
            old = old | {"teacher_fingerprint": want["teacher_fingerprint"]}
            write_json_atomic(layout.shard_dir(cache_dir, key).resolve() / layout.SHARD_HEADER, old)
        return CacheShard(key, layout.shard_dir(cache_dir, key), old, reused=True)
    with _shard_lock(cache_dir, key) as build:
        records = build / layout.RECORDS
        mm = np.lib.format.open_memmap(records, mode="w+", dtype=enc.record_dtype, shape=(shard.rows,))
        done = 0
        stats: list[dict[str, np.ndarray]] = []

        def put(batch: dict[str, torch.Tensor], idx: np.ndarray, lp: np.ndarray) -> int:
            rows = batch["row"].numpy()
            rec, dec = enc.encode(idx, lp, batch["input_ids"].numpy(), batch["attention_mask"].numpy().sum(-1),
                                  with_logprobs=True)
            mm[rows[0] : rows[-1] + 1] = rec
            # the stats of what the reader will decode, from the codes in hand (no second pass over the records)
            stats.append(stats_columns(dec, rec["log_mass"], rec["n_valid"], int(rows[0])))
            return len(rows)

        # the teacher's next forward overlaps the encoding of the batch before (one encoder thread:
        # torch and numpy release the GIL), unless the teacher keeps every core busy itself
        # (overlaps_encoding); at most one batch waits, so memory stays at two batches
        from concurrent.futures import ThreadPoolExecutor

        overlap = overlaps_encoding(provider)

        def advance(rows: int) -> None:  # a batch is in the records: count it, report progress
            nonlocal done
            done += rows
            if progress is not None:
                progress(done, shard.rows)

        with ThreadPoolExecutor(1, thread_name_prefix=f"cache-encode-{key}") as pool:
            pending = None
            for batch in iter_shard_batches(shard, batch_rows):
                topk = provider.topk(batch)
                if topk.k < enc.k:
                    raise LogitCacheError(f"teacher gave k={topk.k} but the cache stores k={enc.k}")
                idx = topk.indices[..., : enc.k].cpu().numpy()
                lp = topk.logprobs[..., : enc.k].float().cpu().numpy()
                if pending is not None:
                    advance(pending.result())
                    pending = None
                if overlap:
                    pending = pool.submit(put, batch, idx, lp)
                else:
                    advance(put(batch, idx, lp))
            if pending is not None:
                advance(pending.result())
        if done != shard.rows:
            raise LogitCacheError(f"{shard.path}: read {done} rows but its manifest says {shard.rows}; re-run `distill preprocess`")
        mm.flush()
        del mm
        write_stats_columns(stats, build / layout.STATS)
        digest = sha256_file(records)
        header = want | {
            "records": layout.RECORDS,
            "records_sha256": digest,
            "bytes": records.stat().st_size,
            "bytes_per_entry": round(enc.bytes_per_entry, 4),
            "stats": layout.STATS,
            "stats_sha256": sha256_file(build / layout.STATS),
            "data_version": sha256_json({"records_sha256": digest, "encoding": enc.to_json()}),
        }
        write_json_atomic(build / layout.SHARD_HEADER, header)
        _publish(cache_dir, key, build, header["data_version"])
    return CacheShard(key, layout.shard_dir(cache_dir, key), header, seconds=time.perf_counter() - t0)


def write_logit_cache(
    provider: Any,
    data: str | Path | layout.DataManifest,
    cache_dir: str | Path,
    k: int,
    batch_rows: int = 8,
    *,
    dtype: LogprobDtype = "q8",
    shards: Iterable[str] | None = None,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[CacheShard]:
    """:func:`write_cache_shard` for each data shard (``shards``: keys; default all), one after another."""
    dm = layout.read_data_manifest(data)
    keys = list(shards) if shards is not None else [s.key for s in dm.shards]
    out = []
    for key in keys:
        cb = (lambda d, t, key=key: progress(key, d, t)) if progress is not None else None
        out.append(write_cache_shard(provider, dm, key, cache_dir, k=k, dtype=dtype, batch_rows=batch_rows,
                                     force=force, progress=cb))
    return out
