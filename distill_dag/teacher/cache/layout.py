"""Where the logit cache lives on disk, and the data shards it mirrors.

One cache shard per data shard of ``tokenized_parquet`` (one Dagster partition of ``logit_cache``,
keyed by the data shard's stem, e.g. ``train-00000``)::

    <cache_dir>/train-00000 -> .gen/train-00000-<version>   the published shard (a symlink, swapped atomically)
    <cache_dir>/.gen/train-00000-<version>/
        records.npy          one structured record per data row (numpy memmap, see ``codec``)
        stats.parquet        per-position stats for DuckDB (teacher entropy, top-k mass)
        shard.json           what the records are: teacher, tokenizer, data shard sha256, k, encoding, sha256
    <cache_dir>/.build/train-00000/   a shard being written (under .build/train-00000.lock)

A shard folder is complete before it gets its name, and the symlink swap is the one atomic step
that publishes it: a reader sees the previous shard or the new one, never a mixture. Which shards
exist is Dagster's partition status (or, without Dagster, the symlinks present); there is no cache
manifest to rebuild.

Why a numpy memmap and not Parquet for the top-k itself: the trainer reads rows in shuffled order,
one (shard, row) at a time. A fixed-size record gives O(1) random access that touches only that
row's bytes; a Parquet reader decodes a whole page / row group per row and cannot map it. DuckDB
gets what it is good at: the small per-shard ``stats.parquet``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_dag.data.manifest import Manifest
from distill_dag.teacher.cache.codec import LogitCacheError
from distill_dag.safe_read import MAX_JSON_BYTES, read_text_bounded

SHARD_HEADER = "shard.json"
RECORDS = "records.npy"
STATS = "stats.parquet"
# keys of shard.json that make two cache shards parts of one cache (same teacher, tokenizer, k, codec)
IDENTITY_KEYS = ("schema_version", "teacher_hash", "tokenizer_hash", "k", "temperature", "encoding")


@dataclass(frozen=True)
class DataShard:
    index: int  # position in the data manifest's shard list (the loader's ``shard``)
    name: str  # file name, e.g. "train-00000.parquet"
    path: Path
    rows: int
    sha256: str

    @property
    def key(self) -> str:
        """The partition key of ``logit_cache`` for this shard (the file's stem)."""
        return self.name[: -len(".parquet")] if self.name.endswith(".parquet") else Path(self.name).stem


@dataclass(frozen=True)
class DataManifest:
    path: Path
    shards: list[DataShard]
    tokenizer_hash: str
    seq_len: int
    data_version: str  # Manifest.data_version: the one identity of the tokenized dataset

    def shard(self, key: str) -> DataShard:
        for s in self.shards:
            if s.key == key:
                return s
        raise LogitCacheError(
            f"{self.path}: no data shard '{key}' (it has {', '.join(s.key for s in self.shards[:8])}"
            f"{', ...' if len(self.shards) > 8 else ''}); the data was re-tokenized since the partition was "
            "registered: re-materialize tokenized_parquet"
        )


def tokenized_dir(data_dir: str | Path) -> Path:
    d = Path(data_dir)
    if d.is_file():
        return d.parent
    if (d / "manifest.json").exists():
        return d
    if (d / "tokenized" / "manifest.json").exists():
        return d / "tokenized"
    raise LogitCacheError(
        f"no tokenized_parquet manifest at {d}/manifest.json or {d}/tokenized/manifest.json; "
        "materialize tokenized_parquet first (`distill preprocess`)"
    )


def read_data_manifest(data: str | Path | DataManifest) -> DataManifest:
    """The cache's view of ``tokenized_parquet``'s manifest (a path to it, its folder or the data root)."""
    if isinstance(data, DataManifest):
        return data
    d = tokenized_dir(data)
    try:
        m = Manifest.load(d)
    except (OSError, ValueError, TypeError) as err:
        raise LogitCacheError(f"{d / 'manifest.json'}: cannot read the data manifest ({err}); re-run `distill preprocess`") from None
    shards = [DataShard(i, Path(s.path).name, d / s.path, int(s.rows), s.sha256) for i, s in enumerate(m.shards)]
    if not shards:
        raise LogitCacheError(f"{d / 'manifest.json'}: key 'shards' lists no shard; re-run `distill preprocess`")
    return DataManifest(d / "manifest.json", shards, m.tokenizer_hash, m.max_seq_length, m.data_version)


def shard_dir(cache_dir: str | Path, key: str) -> Path:
    """The published folder of cache shard ``key`` (a symlink to its generation)."""
    return Path(cache_dir) / key


def read_shard_header(cache_dir: str | Path, key: str) -> dict[str, Any] | None:
    """``shard.json`` of the published cache shard ``key``; None when it was never written."""
    p = shard_dir(cache_dir, key) / SHARD_HEADER
    if not p.exists():  # never written (or a dangling link): no header
        return None
    try:
        return json.loads(read_text_bounded(p, MAX_JSON_BYTES, "cache shard.json"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LogitCacheError(
            f"{p} is not valid JSON ({err}); re-materialize logit_cache partition '{key}' "
            f"(`distill cache-logits --shards {key} --force`)"
        ) from None


def identity(header: dict[str, Any]) -> dict[str, Any]:
    return {k: header.get(k) for k in IDENTITY_KEYS}


def how_to_build(keys: list[str]) -> str:
    """The fix for missing or stale cache shards, with both ways to run them."""
    shown = ",".join(keys[:6]) + (",..." if len(keys) > 6 else "")
    return (
        f"materialize the logit_cache partition(s) {shown} (Dagster: a backfill of logit_cache, or "
        f"`dagster asset materialize --select logit_cache --partition {keys[0]} -m distill_dag.definitions`), "
        f"or run `distill cache-logits --shards {shown}`"
    )
