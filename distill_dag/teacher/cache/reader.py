"""Random access to cached rows by (shard, row): each read touches only those rows' records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distill_dag.teacher.cache import layout
from distill_dag.teacher.cache.codec import SCHEMA_VERSION, CacheEncoding, LogitCacheError, tokens_hash
from distill_dag.io import sha256_file


class LogitCacheReader:
    """The cache shards of one data manifest, opened lazily.

    Refuses, with the fix in the message: shards of another tokenizer, teacher, k or encoding than
    their siblings; a shard computed for other data than the manifest's shard of that name; a cache
    whose k is below the requested k; and (on first use of a shard, when ``verify``) a shard whose
    size or sha256 differs from its ``shard.json``. Missing shards are allowed until a run asks for
    them (:meth:`require`), so a partly built cache can serve the shards it has.
    """

    def __init__(self, cache_dir: str | Path, data_manifest: str | Path | layout.DataManifest, k: int | None = None,
                 *, verify: bool = True) -> None:
        self.dir = Path(cache_dir)
        self.dm = layout.read_data_manifest(data_manifest)
        self.shards: dict[int, dict[str, Any]] = {}  # data shard index -> its cache shard's header
        self.stale: list[str] = []  # keys whose cache shard was computed for other data
        ref: dict[str, Any] | None = None
        for s in self.dm.shards:
            h = layout.read_shard_header(self.dir, s.key)
            if h is None:
                continue
            where = layout.shard_dir(self.dir, s.key) / layout.SHARD_HEADER
            if h.get("schema_version") != SCHEMA_VERSION:
                raise LogitCacheError(
                    f"{where}: schema_version {h.get('schema_version')} != {SCHEMA_VERSION}; rebuild it: "
                    + layout.how_to_build([s.key]) + " with force"
                )
            if h.get("tokenizer_hash") != self.dm.tokenizer_hash:
                raise LogitCacheError(
                    f"{where}: built with tokenizer hash {h.get('tokenizer_hash')} but {self.dm.path} has "
                    f"{self.dm.tokenizer_hash}; the data was re-tokenized: rebuild the cache ("
                    + layout.how_to_build([s.key]) + ")"
                )
            if ref is None:
                ref = h
            elif layout.identity(h) != layout.identity(ref):
                diff = [key for key in layout.IDENTITY_KEYS if h.get(key) != ref.get(key)]
                raise LogitCacheError(
                    f"{where}: differs from {layout.shard_dir(self.dir, ref['data_shard'].rsplit('.', 1)[0])}/"
                    f"{layout.SHARD_HEADER} in {', '.join(diff)}: the cache mixes shards of two teachers or "
                    "encodings; rebuild the stale ones with the current teacher (a backfill of logit_cache)"
                )
            if h.get("data_shard_sha256") != s.sha256 or h.get("rows") != s.rows:
                self.stale.append(s.key)
                continue
            self.shards[s.index] = h
        if ref is None:
            raise LogitCacheError(
                f"no logit cache shards in {self.dir} for the {len(self.dm.shards)} data shards of {self.dm.path}; "
                + layout.how_to_build([s.key for s in self.dm.shards])
            )
        # shards written before fingerprints were recorded have none: any sibling's (same teacher_hash) stands
        fingerprint = next((h.get("teacher_fingerprint") for h in self.shards.values() if h.get("teacher_fingerprint")),
                           ref.get("teacher_fingerprint"))
        self.header = layout.identity(ref) | {"teacher": ref.get("teacher"), "teacher_fingerprint": fingerprint}
        self.enc = CacheEncoding.from_json(ref["encoding"])
        self.k = self.enc.k if k is None else int(k)
        if self.k > self.enc.k:
            raise LogitCacheError(
                f"{self.dir}: the cache holds k={self.enc.k} entries per position but k={self.k} was requested; set "
                f"train.teacher_topk <= {self.enc.k}, or rebuild the cache with logit_cache.k >= {self.k}"
            )
        self.verify = verify
        self._mm: dict[int, np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return self.enc.vocab_size

    def require(self, shards: list[int]) -> None:
        """Refuse, before any compute, a cache that lacks (or has stale) shards a run will read."""
        missing = [self.dm.shards[s].key for s in shards if s not in self.shards]
        if missing:
            stale = [m for m in missing if m in self.stale]
            raise LogitCacheError(
                f"{self.dir}: logit_cache partition(s) {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} "
                f"{'are stale (computed for other data)' if stale == missing else 'are missing or stale'}; "
                + layout.how_to_build(missing)
            )

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._mm:
            self.require([shard])
            h = self.shards[shard]
            key = self.dm.shards[shard].key
            path = layout.shard_dir(self.dir, key) / h["records"]
            if not path.exists():
                raise LogitCacheError(f"{path}: cache shard records missing; " + layout.how_to_build([key]) + " with force")
            if path.stat().st_size != h["bytes"] or (self.verify and sha256_file(path) != h["records_sha256"]):
                raise LogitCacheError(
                    f"{path}: cache shard is corrupt (size or sha256 differs from its {layout.SHARD_HEADER}); "
                    "rebuild it: " + layout.how_to_build([key]) + " with force (--force)"
                )
            try:
                mm = np.load(path, mmap_mode="r")
            except ValueError as err:
                raise LogitCacheError(f"{path}: not a readable cache shard ({err}); " + layout.how_to_build([key])) from None
            if mm.dtype != self.enc.record_dtype or mm.shape != (h["rows"],):
                raise LogitCacheError(f"{path}: records do not match the shard's encoding; " + layout.how_to_build([key]))
            self._mm[shard] = mm
        return self._mm[shard]

    def records(self, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        """[B] shard indices, [B] rows -> [B] records (copies of just those rows)."""
        out = np.empty(len(row), dtype=self.enc.record_dtype)
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            mm = self._shard(int(s))
            rows = row[sel]
            if rows.min(initial=0) < 0 or rows.max(initial=0) >= mm.shape[0]:
                raise LogitCacheError(f"{self.dir / self.dm.shards[int(s)].key}: row out of range (has {mm.shape[0]} rows)")
            out[sel] = mm[rows]
        return out

    def read(self, shard: np.ndarray, row: np.ndarray, input_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (indices [B, T, k] int64, logprobs [B, T, k] float32); checks the rows' tokens when given."""
        rec = self.records(np.asarray(shard), np.asarray(row))
        if input_ids is not None:
            bad = np.flatnonzero(tokens_hash(input_ids[:, : self.enc.seq_len]) != rec["tokens_hash"])
            if len(bad):
                b = int(bad[0])
                key = self.dm.shards[int(shard[b])].key
                raise LogitCacheError(
                    f"{self.dir / key}: cached row {int(row[b])} was computed for other tokens than this batch "
                    "holds; the data changed under the cache: " + layout.how_to_build([key])
                )
        return self.enc.decode(rec, self.k)

    def close(self) -> None:
        self._mm.clear()


def check_shard(cache_dir: str | Path, data: str | Path | layout.DataManifest, key: str) -> tuple[bool, str]:
    """Does cache shard ``key`` mirror its data shard row for row? (row count, and each record's
    tokens hash against the data shard's input ids, read back from the parquet file.)"""
    import pyarrow.parquet as pq

    dm = layout.read_data_manifest(data)
    shard = dm.shard(key)
    h = layout.read_shard_header(cache_dir, key)
    if h is None:
        return False, f"{layout.shard_dir(cache_dir, key)} does not exist"
    recs = np.load(layout.shard_dir(cache_dir, key) / h["records"], mmap_mode="r")
    if recs.shape[0] != shard.rows or h.get("data_shard_sha256") != shard.sha256:
        return False, (f"cache shard has {recs.shape[0]} rows for data sha256 {str(h.get('data_shard_sha256'))[:12]}; "
                       f"the data shard has {shard.rows} rows, sha256 {shard.sha256[:12]}")
    seq_len = CacheEncoding.from_json(h["encoding"]).seq_len
    bad, start = 0, 0
    for batch in pq.ParquetFile(shard.path).iter_batches(columns=["input_ids"], batch_size=1024):
        n = batch.num_rows
        ids = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(n, -1)[:, :seq_len]
        bad += int(np.count_nonzero(tokens_hash(ids) != recs["tokens_hash"][start : start + n]))
        start += n
    if bad:
        return False, f"{bad} of {shard.rows} rows were computed for other tokens than the data shard holds"
    return True, f"{shard.rows} rows, each record's tokens hash equals its data row's"
