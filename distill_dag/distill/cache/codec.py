"""The logit cache's record codec: one fixed-size record per data row (O(1) random access).

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

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from distill_dag.distill.teachers.base import TeacherError

SCHEMA_VERSION = 2
TEMPERATURE_POLICY = "T=1 log-probs"
LogprobDtype = Literal["q8", "fp16", "fp32"]
_MAX_GAP = 100.0  # nats; anything further below the top is e^-100 of it and is clamped here
_Q8_STEPS = 254  # grid steps per largest consecutive gap; rounding adds at most one more (<= 255)


class LogitCacheError(TeacherError):
    """A cache that cannot be used as it is (stale, corrupt, incomplete); the message says how to fix it."""


def tokens_hash(input_ids: np.ndarray) -> np.ndarray:
    """[N, T] token ids -> [N] uint64: a row's identity, checked when the cache is read."""
    a = np.ascontiguousarray(input_ids, dtype="<i4")
    return np.array(
        [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") for r in a], dtype="<u8"
    )


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
