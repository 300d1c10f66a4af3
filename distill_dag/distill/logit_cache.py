"""The teacher's top-k logit cache: shards that mirror ``tokenized_parquet`` row for row.

Layout of ``<cache_dir>``::

    manifest.json                 header (teacher identity, hashes, k, encoding) + finished shards
    train-00000.npy               one structured record per data row (numpy memmap, see below)
    train-00000.stats.parquet     per-position stats for DuckDB (teacher entropy, top-k mass)
    train-00000.meta.json         the finished shard's rows and sha256 (written last)
    .partial/                     shards in progress (a memmap + a bitmap of the rows filled)

Why a numpy memmap and not Parquet for the top-k itself: the trainer reads rows in shuffled order,
one (shard, row) at a time. A fixed-size record gives O(1) random access that touches only that
row's bytes; a Parquet reader decodes a whole page / row group per row (here megabytes) and cannot
map it. DuckDB gets what it is good at: the small ``*.stats.parquet`` view (``cache_stats``).

Encoding of one position (k entries; "entry" = one token id and its log-prob):

* ``ids``: the k token ids in rank order, bit-packed little-endian at ``ceil(log2 vocab)`` bits
  (11 bits at vocab 2048, 17 at 128256), byte-aligned per position.
* ``log_mass``: fp32 ``log sum_{i<k} p_i`` (the tail mass is ``1 - exp(log_mass)``).
* the shape of the log-probs, as gaps below the top: ``d_i = lp_0 - lp_i >= 0`` (``d_0 = 0`` is
  not stored), nondecreasing with rank. ``dtype`` picks how the k-1 gaps are stored:

  - ``q8`` (1 byte/entry): ``d_i`` is rounded to a per-position grid ``s = max_i(d_i - d_{i-1}) / 254``
    (fp32 ``scale``), and the code differences ``c_i - c_{i-1}`` (0..255, since d is monotone and
    no consecutive gap exceeds 254 s) are stored as uint8. Decoding is an exact integer cumsum, so
    the error of every log-prob is at most ``s / 2`` and never accumulates along the ranks.
  - ``fp16`` (2 bytes/entry): ``d_i`` in float16 (relative error 2^-11, small where p is large).
  - ``fp32`` (4 bytes/entry): ``d_i`` in float32, the exact reference.

  Decoding restores the top log-prob from the stored mass, so the decoded top-k holds exactly the
  teacher's top-k mass: ``lp_0 = log_mass - logsumexp_i(-d_i)``, ``lp_i = lp_0 - d_i``.
* ``tokens_hash`` / ``n_valid`` per row: a 64-bit hash of the row's input ids (the reader refuses a
  batch whose tokens differ: the data was re-tokenized under the cache) and the attention-mask length.

All log-probs are at temperature 1 over the full vocabulary ("T=1 log-probs"); the loss applies the
temperature to teacher and student alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch

from distill_dag.distill.teachers.base import TeacherError, TeacherTopK
from distill_dag.io import atomic_path, sha256_file, sha256_json, write_json_atomic

SCHEMA_VERSION = 1
TEMPERATURE_POLICY = "T=1 log-probs"
LogprobDtype = Literal["q8", "fp16", "fp32"]
_MAX_GAP = 100.0  # nats; anything further below the top is e^-100 of it and is clamped here
# a temp file older than this is a killed writer's leftover; a younger one may be a live worker's write
STALE_TMP_S = 3600.0
_Q8_STEPS = 254  # grid steps per largest consecutive gap; rounding adds at most one more (<= 255)


class LogitCacheError(TeacherError):
    """A cache that cannot be used as it is (stale, corrupt, incomplete); the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# the data side: which shards, how many rows, which tokenizer
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataShard:
    index: int  # position in the data manifest's shard list (the loader's ``shard``)
    name: str  # file name, e.g. "train-00000.parquet"
    path: Path
    rows: int
    sha256: str | None

    @property
    def stem(self) -> str:
        return self.name[: -len(".parquet")] if self.name.endswith(".parquet") else Path(self.name).stem


@dataclass(frozen=True)
class DataManifest:
    path: Path
    shards: list[DataShard]
    tokenizer_hash: str | None
    seq_len: int | None
    fingerprint: str  # content hash of (shards, rows, sha256, tokenizer hash, seq_len)


def _tokenized_dir(data_dir: str | Path) -> Path:
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
    """The cache's view of ``tokenized_parquet``'s manifest (a path to it, its folder, or the data
    root), read by the one manifest reader, :meth:`distill_dag.data.manifest.Manifest.load`."""
    from distill_dag.data.manifest import Manifest

    if isinstance(data, DataManifest):
        return data
    d = _tokenized_dir(data)
    try:
        m = Manifest.load(d)
    except (OSError, ValueError, TypeError) as err:
        raise LogitCacheError(f"{d / 'manifest.json'}: cannot read the data manifest ({err}); re-run `distill preprocess`") from None
    shards = [DataShard(i, Path(s.path).name, d / s.path, int(s.rows), s.sha256) for i, s in enumerate(m.shards)]
    if not shards:
        raise LogitCacheError(f"{d / 'manifest.json'}: key 'shards' lists no shard; re-run `distill preprocess`")
    fp = sha256_json(
        {
            "shards": [[s.name, s.rows, s.sha256] for s in shards],
            "tokenizer_hash": m.tokenizer_hash,
            "max_seq_length": m.max_seq_length,
        }
    )
    return DataManifest(d / "manifest.json", shards, m.tokenizer_hash, m.max_seq_length, fp)


def tokens_hash(input_ids: np.ndarray) -> np.ndarray:
    """[N, T] token ids -> [N] uint64: a row's identity, checked when the cache is read."""
    a = np.ascontiguousarray(input_ids, dtype="<i4")
    return np.array(
        [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") for r in a], dtype="<u8"
    )


# --------------------------------------------------------------------------------------------
# the encoding
# --------------------------------------------------------------------------------------------
def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """[N, k] ids < 2**bits -> [N, ceil(k*bits/8)] uint8, little-endian bit order."""
    n, k = ids.shape
    b = ((ids.astype(np.int64)[..., None] >> np.arange(bits)) & 1).astype(np.uint8)  # [N, k, bits]
    return np.packbits(b.reshape(n, k * bits), axis=-1, bitorder="little")


def unpack_ids(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: read a 32-bit window at each id's bit offset (bits <= 25)."""
    n, nb = packed.shape
    buf = np.zeros((n, nb + 4), dtype=np.uint32)
    buf[:, :nb] = packed
    off = np.arange(k, dtype=np.int64) * bits
    byte, shift = off >> 3, (off & 7).astype(np.uint32)
    word = buf[:, byte] | (buf[:, byte + 1] << 8) | (buf[:, byte + 2] << 16) | (buf[:, byte + 3] << 24)
    return ((word >> shift) & np.uint32((1 << bits) - 1)).astype(np.int64)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


@dataclass(frozen=True)
class CacheEncoding:
    k: int
    vocab_size: int
    seq_len: int
    logprobs: LogprobDtype = "q8"

    @property
    def id_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.vocab_size)))

    @property
    def id_bytes(self) -> int:
        return (self.k * self.id_bits + 7) // 8

    @property
    def record_dtype(self) -> np.dtype:
        T, g = self.seq_len, self.k - 1
        fields: list[tuple] = [("tokens_hash", "<u8"), ("n_valid", "<i4"), ("log_mass", "<f4", (T,))]
        if self.logprobs == "q8":
            fields += [("scale", "<f4", (T,))]
        fields += [("ids", "u1", (T, self.id_bytes))]
        fields += [("gaps", {"q8": "u1", "fp16": "<f2", "fp32": "<f4"}[self.logprobs], (T, g))]
        return np.dtype(fields)

    @property
    def bytes_per_entry(self) -> float:
        return self.record_dtype.itemsize / (self.seq_len * self.k)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "numpy-memmap structured records, one per data row",
            "ids": f"bit-packed little-endian, {self.id_bits} bits, rank order",
            "logprobs": self.logprobs,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "record_bytes": self.record_dtype.itemsize,
            "record_dtype": np.lib.format.dtype_to_descr(self.record_dtype),
        }

    def encode(
        self, indices: np.ndarray, logprobs: np.ndarray, input_ids: np.ndarray, n_valid: np.ndarray
    ) -> np.ndarray:
        """indices/logprobs [N, T, k] (sorted desc, T=1, full-vocab normalised) -> records [N]."""
        N, T, k = indices.shape
        if (T, k) != (self.seq_len, self.k):
            raise LogitCacheError(f"top-k of shape [{N}, {T}, {k}] does not fit the cache's [*, {self.seq_len}, {self.k}]")
        if indices.min(initial=0) < 0 or indices.max(initial=0) >= self.vocab_size:
            raise LogitCacheError(f"teacher token id outside [0, {self.vocab_size}): teacher and cache vocab differ")
        lp = logprobs.reshape(N * T, k).astype(np.float64)
        ids = indices.reshape(N * T, k)
        if np.any(np.diff(lp, axis=-1) > 0):  # the contract says sorted; be robust to a provider that is not
            order = np.argsort(-lp, axis=-1, kind="stable")
            lp, ids = np.take_along_axis(lp, order, -1), np.take_along_axis(ids, order, -1)
        lp = np.maximum(lp, lp[:, :1] - _MAX_GAP)
        rec = np.zeros(N, dtype=self.record_dtype)
        rec["tokens_hash"] = tokens_hash(input_ids)
        rec["n_valid"] = n_valid
        rec["log_mass"] = np.minimum(_logsumexp(lp), 0.0).reshape(N, T)
        rec["ids"] = pack_ids(ids, self.id_bits).reshape(N, T, self.id_bytes)
        d = lp[:, :1] - lp[:, 1:]  # [N*T, k-1] >= 0, nondecreasing
        if self.logprobs == "q8":
            steps = np.diff(d, axis=-1, prepend=0.0) if k > 1 else np.zeros((N * T, 0))
            s = (steps.max(axis=-1, initial=0.0) / _Q8_STEPS).astype(np.float32)
            s[s <= 0] = 1.0  # all gaps zero: any grid will do
            codes = np.rint(d / s.astype(np.float64)[:, None])
            delta = np.diff(codes, axis=-1, prepend=0.0)
            rec["scale"] = s.reshape(N, T)
            rec["gaps"] = np.clip(delta, 0, 255).astype(np.uint8).reshape(N, T, k - 1)
        else:
            rec["gaps"] = d.astype(rec.dtype["gaps"].base).reshape(N, T, k - 1)
        return rec

    def decode(self, rec: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """records [N] -> (indices [N, T, k] int64, logprobs [N, T, k] float32), k <= self.k."""
        k = self.k if k is None else k
        N, T = rec.shape[0], self.seq_len
        ids = unpack_ids(np.ascontiguousarray(rec["ids"]).reshape(N * T, self.id_bytes), self.k, self.id_bits)
        if self.logprobs == "q8":
            codes = np.cumsum(rec["gaps"].reshape(N * T, self.k - 1).astype(np.int64), axis=-1)
            d = codes * rec["scale"].reshape(N * T, 1).astype(np.float64)
        else:
            d = rec["gaps"].reshape(N * T, self.k - 1).astype(np.float64)
        d = np.concatenate([np.zeros((N * T, 1)), d], axis=-1)
        # the top log-prob from the stored mass: the decoded top-k holds exactly the teacher's mass
        lp0 = rec["log_mass"].reshape(N * T).astype(np.float64) - _logsumexp(-d)
        lp = (lp0[:, None] - d[:, :k]).astype(np.float32)
        return ids[:, :k].reshape(N, T, k), lp.reshape(N, T, k)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CacheEncoding":
        return cls(int(d["k"]), int(d["vocab_size"]), int(d["seq_len"]), d["logprobs"])


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _header(dm: DataManifest, enc: CacheEncoding, identity: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "teacher_topk_logit_cache",
        "teacher": identity,
        "teacher_hash": sha256_json(identity),
        "adapter_sha256": identity.get("adapter_sha256"),
        "tokenizer_hash": dm.tokenizer_hash,
        "data_manifest": str(dm.path),
        "data_manifest_hash": dm.fingerprint,
        "k": enc.k,
        "temperature": TEMPERATURE_POLICY,
        "dtype": enc.logprobs,
        "encoding": enc.to_json(),
    }


# keys whose change makes every cached shard wrong (data changes are judged shard by shard)
_IDENTITY_KEYS = ("schema_version", "teacher_hash", "tokenizer_hash", "k", "temperature", "encoding")


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [key for key in _IDENTITY_KEYS if old.get(key) != new.get(key)]


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise LogitCacheError(f"{p} is not valid JSON ({err}); delete it and re-run `distill cache-logits`") from None


def _finished_shards(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """Data shard name -> meta of each finished cache shard (the ``*.meta.json`` files are the truth)."""
    out = {}
    for p in sorted(cache_dir.glob("*.meta.json")):
        m = _read_json(p)
        if m:
            out[m["data_shard"]] = m
    return out


class CacheWriter:
    """Fills cache shards from (shard, row, top-k) triples, in any row order, from any number of batches.

    ``distill cache-logits`` (:func:`write_logit_cache`) and direct-mode training with
    ``train.cache_logits`` both write through this class, so the same rows with the same teacher
    output give byte-identical shards. A shard is finished when all its rows are filled: it is then
    moved into place atomically with its stats and checksum and never written again. Rows of a
    shard in progress live in ``.partial/<stem>.npy`` with a bitmap of the rows filled, saved by
    :meth:`flush` (after the data, so it never claims a row that is not on disk): a new writer
    continues from there.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        data_manifest: str | Path | DataManifest,
        *,
        k: int,
        vocab_size: int,
        teacher_identity: dict[str, Any],
        dtype: LogprobDtype = "q8",
        overwrite: bool = False,
    ) -> None:
        self.dir = Path(cache_dir)
        self.dm = read_data_manifest(data_manifest)
        seq_len = self.dm.seq_len or self._seq_len_from_data()
        self.enc = CacheEncoding(int(k), int(vocab_size), int(seq_len), dtype)
        if self.enc.id_bits > 25:
            raise LogitCacheError(f"vocab_size {vocab_size} needs more than 25 bits per id; not supported")
        # through JSON once so it compares equal to a header read back from manifest.json
        self.header = json.loads(json.dumps(_header(self.dm, self.enc, teacher_identity)))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._partial_dir = self.dir / ".partial"
        old = _read_json(self.dir / "manifest.json")
        if old is not None and _mismatch(old, self.header):
            if not overwrite:
                raise LogitCacheError(
                    f"{self.dir / 'manifest.json'} was written with a different "
                    f"{', '.join(_mismatch(old, self.header))} than requested; set logit_cache.dir to a new "
                    "folder, or pass --force (overwrite=True) to rebuild this cache from scratch"
                )
            self._wipe()
        self._done = _finished_shards(self.dir)
        # a finished shard of other data (re-tokenized since) is redone; one of the same data is kept
        for s in self.dm.shards:
            meta = self._done.get(s.name)
            if meta and (meta.get("data_sha256") != s.sha256 or meta.get("rows") != s.rows):
                self._done.pop(s.name)
        part_header = _read_json(self._partial_dir / "header.json")
        if part_header is not None and (_mismatch(part_header, self.header) or part_header.get("data_manifest_hash") != self.dm.fingerprint):
            shutil.rmtree(self._partial_dir)
        for tmp in self.dir.glob(".*.tmp"):  # left by a writer killed inside atomic_path...
            try:  # ...but a fresh one may be another worker's write in progress: leave it alone
                if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        self._open: dict[int, tuple[np.memmap, np.ndarray]] = {}
        self._write_manifest()

    def _seq_len_from_data(self) -> int:
        import pyarrow.parquet as pq

        t = pq.ParquetFile(self.dm.shards[0].path).read_row_group(0, columns=["input_ids"])
        return len(t.column(0)[0])

    def _wipe(self) -> None:
        for p in self.dir.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            elif p.name != "manifest.json":
                p.unlink()

    # ---- state ---------------------------------------------------------------------------
    def done(self, shard: int) -> bool:
        return self.dm.shards[shard].name in self._done

    def missing_rows(self, shard: int) -> np.ndarray:
        """Row numbers of ``shard`` not yet filled (empty when the shard is finished)."""
        if self.done(shard):
            return np.zeros(0, dtype=np.int64)
        _, filled = self._partial(shard)
        return np.flatnonzero(~filled)

    @property
    def complete(self) -> bool:
        return all(self.done(s.index) for s in self.dm.shards)

    # ---- writing -------------------------------------------------------------------------
    def _partial(self, shard: int) -> tuple[np.memmap, np.ndarray]:
        if shard not in self._open:
            s = self.dm.shards[shard]
            self._partial_dir.mkdir(exist_ok=True)
            if not (self._partial_dir / "header.json").exists():
                write_json_atomic(self._partial_dir / "header.json", self.header | {"data_manifest_hash": self.dm.fingerprint})
            data_p, bits_p = self._partial_dir / f"{s.stem}.npy", self._partial_dir / f"{s.stem}.filled.npy"
            filled = None
            if data_p.exists() and bits_p.exists():
                try:
                    mm = np.load(data_p, mmap_mode="r+")
                    filled = np.load(bits_p)
                    if mm.shape != (s.rows,) or mm.dtype != self.enc.record_dtype or filled.shape != (s.rows,):
                        filled = None
                except (ValueError, OSError):
                    filled = None
            if filled is None:
                mm = np.lib.format.open_memmap(data_p, mode="w+", dtype=self.enc.record_dtype, shape=(s.rows,))
                filled = np.zeros(s.rows, dtype=bool)
            self._open[shard] = (mm, filled)
        return self._open[shard]

    def add(self, batch: dict[str, torch.Tensor], topk: TeacherTopK) -> None:
        """Store rows ``batch["shard"][b], batch["row"][b]`` with ``topk`` [B, T, >=k] for ``input_ids`` [B, T]."""
        shard = batch["shard"].cpu().numpy().astype(np.int64)
        row = batch["row"].cpu().numpy().astype(np.int64)
        if topk.k < self.enc.k:
            raise LogitCacheError(f"teacher gave k={topk.k} but the cache stores k={self.enc.k}")
        ids = topk.indices[..., : self.enc.k].cpu().numpy()
        lps = topk.logprobs[..., : self.enc.k].float().cpu().numpy()
        input_ids = batch["input_ids"].cpu().numpy()
        am = batch.get("attention_mask")
        n_valid = am.cpu().numpy().sum(-1) if am is not None else np.full(len(row), input_ids.shape[1])
        keep = np.array([not self.done(int(s)) for s in shard], dtype=bool)
        if not keep.any():
            return  # a finished shard is never rewritten
        rec = self.enc.encode(ids[keep], lps[keep], input_ids[keep], n_valid[keep])
        for r, s, i in zip(rec, shard[keep], row[keep]):
            mm, filled = self._partial(int(s))
            mm[i] = r
            filled[i] = True
        for s in sorted(set(shard[keep].tolist())):
            if self._open[s][1].all():
                self._finish(s)

    def flush(self) -> None:
        """Persist the shards in progress (data first, then the bitmap that vouches for it)."""
        for s, (mm, filled) in self._open.items():
            mm.flush()
            with atomic_path(self._partial_dir / f"{self.dm.shards[s].stem}.filled.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, filled)

    def close(self) -> None:
        self.flush()
        self._open.clear()

    def _finish(self, shard: int) -> None:
        s = self.dm.shards[shard]
        mm, _ = self._open.pop(shard)
        mm.flush()
        src = Path(mm.filename)
        del mm
        final = self.dir / f"{s.stem}.npy"
        stats = self.dir / f"{s.stem}.stats.parquet"
        _write_stats(np.load(src, mmap_mode="r"), self.enc, stats)
        digest = sha256_file(src)
        with atomic_path(final) as tmp:  # fsync + rename: the shard appears whole or not at all
            os.replace(src, tmp)
        (self._partial_dir / f"{s.stem}.filled.npy").unlink(missing_ok=True)
        meta = {
            "data_shard": s.name,
            "index": s.index,
            "rows": s.rows,
            "data_sha256": s.sha256,
            "file": final.name,
            "sha256": digest,
            "bytes": final.stat().st_size,
            "stats": stats.name,
            "stats_sha256": sha256_file(stats),
        }
        write_json_atomic(self.dir / f"{s.stem}.meta.json", meta)  # the shard counts as done from here
        self._done[s.name] = meta
        self._write_manifest()

    def _write_manifest(self) -> None:
        # rebuilt from the per-shard meta files, so workers filling different shards never lose one
        done = _finished_shards(self.dir)
        names = {s.name for s in self.dm.shards}
        shards = [
            done[s.name]
            for s in self.dm.shards
            if s.name in done and done[s.name].get("data_sha256") == s.sha256 and done[s.name].get("rows") == s.rows
        ]
        for m in shards:  # a re-tokenized manifest may have moved a shard in the list
            m["index"] = next(s.index for s in self.dm.shards if s.name == m["data_shard"])
        write_json_atomic(
            self.dir / "manifest.json",
            self.header
            | {
                "shards": shards,
                "complete": len(shards) == len(names),
                "bytes_per_entry": round(self.enc.bytes_per_entry, 4),
            },
        )


def open_cache_writer(cfg: Any, teacher: Any, *, overwrite: bool = False) -> CacheWriter:
    """The writer direct-mode training uses when ``train.cache_logits`` is on (``PipelineConfig`` ``cfg``).

    Call ``writer.add(batch, teacher_topk)`` after each teacher forward (``batch`` with ``shard``,
    ``row``, ``input_ids``, ``attention_mask``), ``writer.flush()`` with each checkpoint and
    ``writer.close()`` at the end. The teacher must give ``k >= logit_cache.k`` (build it with
    ``k = max(train.teacher_topk, logit_cache.k)`` and slice ``[..., :teacher_topk]`` for the loss).
    """
    k = cfg.logit_cache.k
    if teacher.k < k:
        raise LogitCacheError(
            f"train.cache_logits needs the teacher's top-{k} (logit_cache.k) but it gives k={teacher.k}: build the "
            f"direct teacher with k = max(train.teacher_topk, logit_cache.k)"
        )
    return CacheWriter(
        cfg.path(cfg.logit_cache.dir), cfg.data_root / "tokenized", k=k, vocab_size=teacher.vocab_size,
        teacher_identity=teacher.identity(), dtype=cfg.logit_cache.dtype, overwrite=overwrite,
    )


def _write_stats(rec: np.ndarray, enc: CacheEncoding, path: Path, chunk_rows: int = 64) -> None:
    """Per valid position: teacher entropy lower bound, top-k mass and top-1 prob, as Parquet.

    ``entropy_lb = -sum_{i<k} p_i log p_i - r log r`` with ``r`` the tail mass taken as one bucket:
    the entropy of the full distribution is at least this (splitting the tail only adds entropy).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("row", "pos", "entropy_lb", "topk_mass", "top1_prob")}
    T = enc.seq_len
    for a in range(0, rec.shape[0], chunk_rows):
        r = np.asarray(rec[a : a + chunk_rows])
        _, lp = enc.decode(r)
        lp64 = lp.astype(np.float64)
        p = np.exp(lp64)
        mass = np.exp(r["log_mass"].astype(np.float64))
        tail = np.clip(1.0 - mass, 0.0, 1.0)
        ent = -(p * lp64).sum(-1) - np.where(tail > 0, tail * np.log(np.where(tail > 0, tail, 1.0)), 0.0)
        valid = np.arange(T)[None, :] < r["n_valid"][:, None]
        rows, pos = np.nonzero(valid)
        cols["row"].append((rows + a).astype(np.int32))
        cols["pos"].append(pos.astype(np.int32))
        cols["entropy_lb"].append(ent[valid].astype(np.float32))
        cols["topk_mass"].append(mass[valid].astype(np.float32))
        cols["top1_prob"].append(p[..., 0][valid].astype(np.float32))
    table = pa.table({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _iter_shard_batches(shard: DataShard, rows: np.ndarray, batch_rows: int) -> Iterable[dict[str, torch.Tensor]]:
    """Batches (loader format) of the given rows of one parquet shard, read one row group at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.path)
    want = set(rows.tolist())
    cols = ["input_ids", "attention_mask", "position_ids"]
    start = 0
    pending: list[tuple[int, dict[str, np.ndarray]]] = []

    def to_np(col: Any, n: int) -> np.ndarray:
        return col.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.int64)

    def emit(items: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, torch.Tensor]:
        b = {c: torch.from_numpy(np.stack([it[1][c] for it in items])) for c in cols}
        b["row"] = torch.tensor([it[0] for it in items], dtype=torch.long)
        b["shard"] = torch.full((len(items),), shard.index, dtype=torch.long)
        return b

    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if not any(r in want for r in range(start, start + n)):
            start += n
            continue
        t = pf.read_row_group(g, columns=cols)
        arrs = {c: to_np(t.column(c), n) for c in cols}
        for j in range(n):
            if start + j in want:
                pending.append((start + j, {c: arrs[c][j] for c in cols}))
                if len(pending) == batch_rows:
                    yield emit(pending)
                    pending = []
        start += n
    if pending:
        yield emit(pending)


def write_logit_cache(
    provider: Any,
    data_dir: str | Path | DataManifest,
    cache_dir: str | Path,
    k: int,
    batch_rows: int = 8,
    *,
    dtype: LogprobDtype = "q8",
    shards: Iterable[int] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``provider`` over every row of ``tokenized_parquet`` and cache its top-k; returns the manifest.

    Resumable shard by shard and idempotent: finished shards are skipped (never rewritten), a shard
    in progress continues from its saved rows, a crash loses at most the rows since the last flush.
    ``shards`` (indices in the data manifest) lets several workers split the work.
    """
    dm = read_data_manifest(data_dir)
    if provider.k < k:
        raise LogitCacheError(f"teacher provider gives k={provider.k} < logit_cache.k={k}")
    writer = CacheWriter(
        cache_dir, dm, k=k, vocab_size=provider.vocab_size, teacher_identity=provider.identity(),
        dtype=dtype, overwrite=overwrite,
    )
    todo = [s for s in dm.shards if shards is None or s.index in set(shards)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(writer.missing_rows(s.index)) for s in todo), unit="row", desc="cache-logits")
    try:
        for s in todo:
            missing = writer.missing_rows(s.index)
            for i, batch in enumerate(_iter_shard_batches(s, missing, batch_rows)):
                writer.add(batch, provider.topk(batch))
                if i % 16 == 15:
                    writer.flush()
                if bar is not None:
                    bar.update(len(batch["row"]))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return json.loads((Path(cache_dir) / "manifest.json").read_text())


def build_logit_cache(
    cfg: Any,
    *,
    model_path: str | Path | None = None,
    adapter_path: str | Path | None = None,
    via: str = "direct",
    shards: Iterable[int] | None = None,
    force: bool = False,
    progress: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """The ``logit_cache`` stage as the CLI and the asset run it: pick the teacher (the finetuned one
    from ``teacher_adapters`` unless ``model_path`` / ``adapter_path`` say otherwise; ``via`` direct
    or network), write the cache (resumable), return its manifest summary with the DuckDB stats.
    """
    from distill_dag.device import pick_device
    from distill_dag.distill.teacher_model import finetuned_teacher
    from distill_dag.distill.teachers.factory import make_teacher

    ft_model, ft_adapter = finetuned_teacher(cfg)
    model_path = model_path or ft_model
    adapter_path = adapter_path or ft_adapter
    k = cfg.logit_cache.k
    mode = "network" if via == "network" else "direct"
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"teacher_mode": mode, "teacher_topk": k})})
    teacher = make_teacher(cfg, pick_device(cfg.train.device), None, model_path=model_path, adapter_path=adapter_path)
    log(f"logit cache: teacher {teacher.identity()}, k={k}, dtype={cfg.logit_cache.dtype}")
    try:
        manifest = write_logit_cache(
            teacher, cfg.tokenized_dir, cfg.cache_dir, k, cfg.logit_cache.batch_rows,
            dtype=cfg.logit_cache.dtype, overwrite=force, progress=progress, shards=shards,
        )
    finally:
        teacher.close()
    summary = {
        "k": k,
        "dtype": cfg.logit_cache.dtype,
        "complete": bool(manifest.get("complete")),
        "shards_done": len(manifest.get("shards", [])),
        "bytes_per_entry": manifest.get("bytes_per_entry"),
        "teacher": manifest.get("teacher"),
    }
    if summary["complete"]:
        summary["stats"] = cache_stats(cfg.cache_dir)
    return summary


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
class LogitCacheReader:
    """Random access to cached rows by (shard, row): each read touches only those rows' records.

    Refuses, with the fix in the message: a cache of another tokenizer or data manifest, a cache
    whose k is below the requested k, and (on first use of a shard, when ``verify``) a shard whose
    size or sha256 differs from its manifest entry.
    """

    def __init__(
        self, cache_dir: str | Path, data_manifest: str | Path | DataManifest | None = None,
        k: int | None = None, *, verify: bool = True,
    ) -> None:
        self.dir = Path(cache_dir)
        mpath = self.dir / "manifest.json"
        header = _read_json(mpath)
        if header is None:
            raise LogitCacheError(
                f"no logit cache at {self.dir} (missing manifest.json); build it with `distill cache-logits --config ...` "
                "or set logit_cache.dir"
            )
        if header.get("schema_version") != SCHEMA_VERSION:
            raise LogitCacheError(f"{mpath}: schema_version {header.get('schema_version')} != {SCHEMA_VERSION}; rebuild the cache")
        self.header = header
        self.enc = CacheEncoding.from_json(header["encoding"])
        self.k = self.enc.k if k is None else int(k)
        if self.k > self.enc.k:
            raise LogitCacheError(
                f"{mpath}: the cache holds k={self.enc.k} entries per position but k={self.k} was requested; set "
                f"train.teacher_topk <= {self.enc.k}, or rebuild the cache with logit_cache.k >= {self.k}"
            )
        self.dm = read_data_manifest(data_manifest) if data_manifest is not None else None
        if self.dm is not None:
            if header.get("tokenizer_hash") != self.dm.tokenizer_hash:
                raise LogitCacheError(
                    f"{mpath}: built with tokenizer hash {header.get('tokenizer_hash')} but {self.dm.path} has "
                    f"{self.dm.tokenizer_hash}; the data was re-tokenized: rebuild the cache (`distill cache-logits --force`)"
                )
            if header.get("data_manifest_hash") != self.dm.fingerprint:
                raise LogitCacheError(
                    f"{mpath}: built for data manifest hash {header.get('data_manifest_hash')} but {self.dm.path} "
                    f"hashes to {self.dm.fingerprint}; the shards changed: re-run `distill cache-logits` (it redoes "
                    "only the changed shards)"
                )
        self.shards = {m["index"]: m for m in header.get("shards", [])}
        self.verify = verify
        self._mm: dict[int, np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return self.enc.vocab_size

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._mm:
            meta = self.shards.get(shard)
            if meta is None:
                raise LogitCacheError(
                    f"{self.dir / 'manifest.json'}: data shard #{shard} is not in the cache (not finished); "
                    "run `distill cache-logits --config ...` to complete it"
                )
            path = self.dir / meta["file"]
            if not path.exists():
                raise LogitCacheError(f"{path}: cache shard missing; re-run `distill cache-logits` to rebuild it")
            if path.stat().st_size != meta["bytes"] or (self.verify and sha256_file(path) != meta["sha256"]):
                raise LogitCacheError(
                    f"{path}: cache shard is corrupt (size or sha256 differs from {self.dir / 'manifest.json'}); "
                    f"delete {path} and {self.dir / (Path(meta['file']).stem + '.meta.json')} and re-run "
                    "`distill cache-logits` to rebuild it"
                )
            try:
                mm = np.load(path, mmap_mode="r")
            except ValueError as err:
                raise LogitCacheError(f"{path}: not a readable cache shard ({err}); delete it and re-run `distill cache-logits`") from None
            if mm.dtype != self.enc.record_dtype or mm.shape != (meta["rows"],):
                raise LogitCacheError(f"{path}: records do not match the manifest's encoding; rebuild the cache")
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
                raise LogitCacheError(f"{self.dir / self.shards[int(s)]['file']}: row out of range (has {mm.shape[0]} rows)")
            out[sel] = mm[rows]
        return out

    def read(
        self, shard: np.ndarray, row: np.ndarray, input_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (indices [B, T, k] int64, logprobs [B, T, k] float32); checks the rows' tokens when given."""
        rec = self.records(np.asarray(shard), np.asarray(row))
        if input_ids is not None:
            bad = np.flatnonzero(tokens_hash(input_ids[:, : self.enc.seq_len]) != rec["tokens_hash"])
            if len(bad):
                b = int(bad[0])
                raise LogitCacheError(
                    f"{self.dir}: cached row {int(row[b])} of data shard #{int(shard[b])} was computed for other "
                    "tokens than this batch holds; the data changed under the cache: re-run `distill cache-logits`"
                )
        return self.enc.decode(rec, self.k)

    def close(self) -> None:
        self._mm.clear()


def cache_stats(cache_dir: str | Path, bins: Iterable[float] = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)) -> dict[str, Any]:
    """DuckDB over ``*.stats.parquet``: teacher entropy (lower bound) and top-k mass coverage.

    ``coverage_histogram`` gives the fraction of positions whose top-k mass falls in each bin.
    """
    import duckdb

    d = Path(cache_dir)
    files = sorted(d.glob("*.stats.parquet"))
    if not files:
        raise LogitCacheError(f"no *.stats.parquet in {d}; build the cache first (`distill cache-logits`)")
    src = f"read_parquet({[str(f) for f in files]!r})"
    con = duckdb.connect()
    n, ent, mass, med, p05, top1 = con.execute(
        f"SELECT count(*), avg(entropy_lb), avg(topk_mass), median(topk_mass), quantile_cont(topk_mass, 0.05), "
        f"avg(top1_prob) FROM {src}"
    ).fetchone()
    edges = [0.0, *bins, 1.0000001]
    case = " ".join(f"WHEN topk_mass < {hi} THEN {i}" for i, hi in enumerate(edges[1:]))
    hist = dict(con.execute(f"SELECT CASE {case} ELSE {len(edges) - 2} END AS b, count(*) FROM {src} GROUP BY b").fetchall())
    header = _read_json(d / "manifest.json") or {}
    return {
        "k": header.get("k"),
        "positions": int(n),
        "mean_entropy_lb": float(ent),
        "mean_topk_mass": float(mass),
        "median_topk_mass": float(med),
        "p05_topk_mass": float(p05),
        "mean_top1_prob": float(top1),
        "coverage_histogram": [
            {"bin": f"[{edges[i]:g}, {min(edges[i + 1], 1.0):g}{']' if i == len(edges) - 2 else ')'}",
             "fraction": hist.get(i, 0) / max(n, 1)}
            for i in range(len(edges) - 1)
        ],
    }
