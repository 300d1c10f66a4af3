"""FROZEN copy of distill_dag/teacher/cache/codec.py before its vectorised encoder (commit 2db86a4): the
reference the tests hold the fast encoder and decoder to, byte for byte. Do not edit.

Original docstring: the logit cache's record codec: one fixed-size record per data row (O(1) random access).

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

``compact`` (the smallest: 99 B/token at k=50, 222 at k=128, vocab 128256; bench/logit_cache.py) is a
different record, still one fixed-size record per row (O(1) random access), whose bytes are shared by
the row's positions through variable-length codes under the row's bit budget:

* ``ids`` as a *set* sorted by id (the loss needs the set, not the rank order: see ``losses.py``; the
  decoder restores rank order by sorting the decoded log-probs, ties by id), coded per position by
  whichever is shorter: exp-Golomb codes of the id gaps with the best order ``k0`` in 0..14 (a BPE
  vocabulary is in merge order, which follows frequency, so a real teacher's top-k crowds the small
  ids and its gaps are short), or Elias-Fano with ``L = floor(log2(V / k))`` (any id set fits in
  ``k (L + 1) + V >> L`` bits: ~13.3 bits/id at k=50, V=128256, against 17 for fixed-width ids);
* the log-probs in that id order as ``c_i = round(Q (p_i / p_top) ** 0.7)`` (a companded grid, fine
  near the top, coarse where ``p_i`` is tiny and cannot move the KL), exp-Golomb order 0 (tiny
  entries cost 1-3 bits). ``Q`` (``2^17 .. 2^2`` in half octaves, or 0: all equal, k bits) is chosen
  per position by rate control: the levels that minimise the row's summed distortion
  ``sum p e^2 - (sum p e)^2 / sum p`` within the bits the ids left (a Lagrangian bisection). A row
  never overflows: its budget holds Elias-Fano's worst case plus one bit per entry;
* ``log_mass`` in fp32 as for the others (the decoded top-k holds exactly the teacher's top-k mass),
  ``hdr`` [T] u2 (id mode: 0..14 exp-Golomb order, 15 Elias-Fano; level << 4);
* ``stream``: every position's 2k unary prefixes (ids, then log-probs), then all mantissas
  (little-endian bits), so one scan finds every code boundary (vectorised decode).

The budget is ``CacheEncoding.slot_bits`` stream bits per position (default :func:`default_slot_bits`:
Elias-Fano's worst case + 1.5 bits per entry at vocab 128256). :func:`encode_topk_bytes` / :func:`decode_topk_bytes`
are the same codec over a byte string (for the network teacher's wire format).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from distill_dag.loss.topk import TeacherError

SCHEMA_VERSION = 3  # 3: the compact encoding (q8/fp16/fp32 records unchanged)
TEMPERATURE_POLICY = "T=1 log-probs"
LogprobDtype = Literal["compact", "q8", "fp16", "fp32"]
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


# --------------------------------------------------------------------------------------------
# the compact slot codec (see the module docstring)
# --------------------------------------------------------------------------------------------
_EF_MODE = 15
_GAMMA = 0.7  # companding exponent of the log-prob grid: c = round(Q * (p / p_top) ** gamma)
_Q_LEVELS = np.array([2.0 ** (17 - l / 2) for l in range(31)] + [0.0])  # level l -> Q; 31: all equal


def _bitlen(x: np.ndarray) -> np.ndarray:
    """Bit length of non-negative ints (0 -> 0), exact below 2**53."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)


def ef_low_bits(k: int, vocab_size: int) -> int:
    return max(0, int(math.floor(math.log2(max(vocab_size / k, 1.0)))))


def ef_bits(k: int, vocab_size: int) -> int:
    """Elias-Fano size of any k distinct ids below vocab_size (the compact codec's worst case)."""
    L = ef_low_bits(k, vocab_size)
    return k * (L + 1) + ((vocab_size - 1) >> L)


def default_slot_bits(k: int, vocab_size: int) -> int:
    """Stream bits per position of a compact row: Elias-Fano's worst case + ``a`` bits per entry, with
    ``a = max(1.5, 8 - 0.4 log2 V)`` (1.5 at vocab 128256; more where ids are cheap, e.g. 5.4 at 96)."""
    a = max(1.5, 8 - 0.4 * math.log2(max(vocab_size, 2)))
    return 8 * math.ceil((ef_bits(k, vocab_size) + math.ceil(a * k)) / 8)


def _put_fields(bits: np.ndarray, off: np.ndarray, val: np.ndarray, width: np.ndarray) -> None:
    """Write val [P, F] (width bits each, LSB first) at bit offsets off [P, F] of bits [P, S]."""
    P, S = bits.shape
    w = width.reshape(-1)
    tot = int(w.sum())
    if tot == 0:
        return
    start = np.cumsum(w) - w
    field = np.repeat(np.arange(w.size), w)
    b = np.arange(tot) - start[field]
    row = field // off.shape[1]
    dest = row * S + off.reshape(-1)[field] + b
    bits.reshape(-1)[dest] = ((val.reshape(-1)[field] >> b) & 1).astype(np.uint8)


def _get_fields(buf: np.ndarray, off: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Read fields (<= 56 bits) at bit offsets off [P, F] from bytes buf [P, nb + 8]."""
    P = buf.shape[0]
    byte = off >> 3
    r = np.arange(P)[:, None]
    word = np.zeros(off.shape, dtype=np.uint64)
    for i in range(8):
        word |= buf[r, byte + i].astype(np.uint64) << np.uint64(8 * i)
    word >>= (off & 7).astype(np.uint64)
    mask = (np.uint64(1) << width.astype(np.uint64)) - np.uint64(1)
    return (word & mask).astype(np.int64)


def _nth_ones(bits: np.ndarray, start: int, n: int) -> np.ndarray:
    """[P, S] bits -> [P, n] positions of the first n one-bits at or after ``start`` (each row has them)."""
    sub = bits[:, start:]
    cs = np.cumsum(sub, axis=1, dtype=np.int32)
    r, c = np.nonzero(sub.astype(bool) & (cs <= n))
    if r.size != bits.shape[0] * n:
        raise LogitCacheError("compact cache slot is corrupt (too few code boundaries); rebuild the cache shard")
    return c.reshape(bits.shape[0], n) + start


def _id_codes(ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, ...]:
    """ids [P, k] -> (x sorted [P, k], order, mode [P], id bits [P], unary zeros [P, k], mantissa widths, mantissas)."""
    P, k = ids.shape
    order = np.argsort(ids, axis=-1, kind="stable")
    x = np.take_along_axis(ids.astype(np.int64), order, -1)
    g = np.diff(x, axis=-1, prepend=-1) - 1  # >= 0: exp-Golomb of the gaps, every order k0 in 0..14
    k0s = np.arange(15)
    n_eg = _bitlen((g[:, None, :] >> k0s[None, :, None]) + 1) - 1  # [P, 15, k]: unary zeros
    cost_eg = (2 * n_eg + k0s[None, :, None] + 1).sum(-1)  # [P, 15]
    L = ef_low_bits(k, vocab_size)  # or Elias-Fano: k (L + 1) + x_max >> L bits
    cost_ef = k * (L + 1) + (x[:, -1] >> L)
    best = np.argmin(cost_eg, axis=1)
    use_ef = cost_ef <= cost_eg[np.arange(P), best]
    mode = np.where(use_ef, _EF_MODE, best)
    cost = np.where(use_ef, cost_ef, cost_eg[np.arange(P), best])
    k0 = np.where(use_ef, 0, best)[:, None]
    n_eg = np.take_along_axis(n_eg, best[:, None, None], 1)[:, 0]
    unary = np.where(use_ef[:, None], np.diff(x >> L, axis=-1, prepend=0), n_eg)
    width = np.where(use_ef[:, None], L, n_eg + k0)
    mant = np.where(use_ef[:, None], x & ((1 << L) - 1), (g + (1 << k0)) - (1 << (n_eg + k0)))
    return x, order, mode, cost, unary, width, mant


def _reconstruct(c: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """codes c [..., k] on grid Q [..., 1] -> gaps below the top d >= 0 (c = 0: u = 0.25 / Q)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(c > 0, c, 0.25) / np.where(Q > 0, Q, 1.0)
        d = np.minimum(-np.log(np.minimum(u, 1.0)) / _GAMMA, _MAX_GAP)
    return np.where(Q > 0, d, 0.0)


def _level_table(lp: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """lp [P, k] -> (bits [P, 32], distortion [P, 32]) of each grid level: exp-Golomb-0 bits of the
    codes, and sum_i p_i e_i^2 - (sum p e)^2 / sum p (e: log-prob error; the mass is restored)."""
    P, k = lp.shape
    bits = np.empty((P, len(_Q_LEVELS)), np.int64)
    dist = np.empty((P, len(_Q_LEVELS)))
    Q = _Q_LEVELS[None, :, None]
    for a in range(0, P, chunk):
        l = lp[a : a + chunk]
        d = (l.max(-1, keepdims=True) - l)[:, None, :]
        c = np.rint(np.exp(-_GAMMA * d) * Q)
        bits[a : a + chunk] = (2 * (_bitlen(c + 1) - 1) + 1).sum(-1)
        e = _reconstruct(c, Q) - d
        p = np.exp(l - l.max(-1, keepdims=True))[:, None, :]
        sp = p.sum(-1)
        dist[a : a + chunk] = (p * e * e).sum(-1) - (p * e).sum(-1) ** 2 / sp
    return bits, np.maximum(dist, 0.0) * np.exp(lp.max(-1))[:, None]


def _allocate(bits: np.ndarray, dist: np.ndarray, budget: int) -> np.ndarray:
    """Per-position levels minimising sum distortion with sum bits <= budget (Lagrangian, bisection on lambda)."""
    def pick(lam: float) -> np.ndarray:
        return np.argmin(dist + lam * bits, axis=1)

    P = bits.shape[0]
    rows = np.arange(P)
    if bits[rows, pick(0.0)].sum() <= budget:
        return pick(0.0)
    lo, hi = -40.0, 10.0  # log lambda
    if bits[rows, pick(math.exp(hi))].sum() > budget:
        return np.full(P, len(_Q_LEVELS) - 1)
    for _ in range(40):
        mid = (lo + hi) / 2
        if bits[rows, pick(math.exp(mid))].sum() <= budget:
            hi = mid
        else:
            lo = mid
    return pick(math.exp(hi))


def compact_encode_row(ids: np.ndarray, lp: np.ndarray, vocab_size: int, stream_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """One row: ids [T, k] (distinct, < vocab_size), lp [T, k] float64 (any order, clamped to _MAX_GAP
    below each top) -> (headers [T] u2: id mode | level << 4, stream [stream_bytes] u1)."""
    T, k = ids.shape
    x, order, mode, id_cost, id_un, id_w, id_m = _id_codes(ids, vocab_size)
    lp = np.take_along_axis(lp, order, -1)
    lbits, dist = _level_table(lp)
    room = stream_bytes * 8 - int(id_cost.sum())
    if room < T * k:
        raise LogitCacheError(f"compact stream of {stream_bytes} B cannot hold {T} x k={k} ids of vocab {vocab_size}")
    level = _allocate(lbits, dist, room)
    d = lp.max(-1, keepdims=True) - lp
    c = np.rint(np.exp(-_GAMMA * d) * _Q_LEVELS[level][:, None]).astype(np.int64)
    n_c = _bitlen(c + 1) - 1
    # stream: every position's 2k unary codes (ids, then log-probs), then every mantissa, in order
    unary = np.concatenate([id_un, n_c], axis=1).reshape(-1)
    ones = np.cumsum(unary + 1) - 1
    nbits = stream_bytes * 8
    bits = np.zeros((1, nbits), np.uint8)
    bits[0, ones] = 1
    m_w = np.concatenate([id_w, n_c], axis=1).reshape(1, -1)
    m_v = np.concatenate([id_m, c + 1 - (1 << n_c)], axis=1).reshape(1, -1)
    m_off = ones[-1] + 1 + np.cumsum(m_w, axis=1) - m_w
    assert m_off[0, -1] + m_w[0, -1] <= nbits
    _put_fields(bits, m_off, m_v, m_w)
    return (mode | (level << 4)).astype("<u2"), np.packbits(bits[0], bitorder="little")


def compact_decode_row(hdr: np.ndarray, stream: np.ndarray, k: int, vocab_size: int, log_mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`compact_encode_row` -> (ids [T, k] int64, lp [T, k] float64), rank order
    (ties of decoded log-probs: smaller id first)."""
    T = hdr.shape[0]
    hdr = hdr.astype(np.int64)
    mode, level = hdr & 15, hdr >> 4
    use_ef = (mode == _EF_MODE)[:, None]
    k0 = np.where(use_ef[:, 0], 0, mode)[:, None]
    bits = np.unpackbits(stream, bitorder="little")[None]
    ones = _nth_ones(bits, 0, T * 2 * k)[0]
    unary = (np.diff(ones, prepend=-1) - 1).reshape(T, 2 * k)
    id_un, n_c = unary[:, :k], unary[:, k:]
    L = ef_low_bits(k, vocab_size)
    id_w = np.where(use_ef, L, id_un + k0)
    m_w = np.concatenate([id_w, n_c], axis=1).reshape(1, -1)
    m_off = ones[-1] + 1 + np.cumsum(m_w, axis=1) - m_w
    buf = np.zeros((1, stream.shape[0] + 8), np.uint8)
    buf[0, : stream.shape[0]] = stream
    m = _get_fields(buf, m_off, m_w).reshape(T, 2 * k)
    id_m, c_m = m[:, :k], m[:, k:]
    x_ef = (np.cumsum(id_un, axis=1) << L) | id_m
    x_eg = np.cumsum((1 << id_w) + id_m - (1 << k0) + 1, axis=1) - 1
    x = np.where(use_ef, x_ef, x_eg)
    d = _reconstruct((1 << n_c) + c_m - 1, _Q_LEVELS[level][:, None])
    lp = log_mass.astype(np.float64)[:, None] - _logsumexp(-d)[:, None] - d
    order = np.argsort(d, axis=-1, kind="stable")
    return np.take_along_axis(x, order, -1), np.take_along_axis(lp, order, -1)


def encode_topk_bytes(indices: np.ndarray, logprobs: np.ndarray, vocab_size: int, slot_bits: int | None = None) -> bytes:
    """The compact codec over bytes (e.g. a network teacher's response body).

    indices/logprobs [B, T, k] (or [T, k]; T=1, full-vocab log-probs, any order) -> a self-describing
    byte string: a 24-byte header (magic ``TKC1``, k, vocab_size, slot_bits, B, T), then per row the
    fp32 log-masses [T], the headers [T] u2 and the stream, exactly a cache record's fields."""
    idx = np.asarray(indices)
    if idx.ndim == 2:
        idx, logprobs = idx[None], np.asarray(logprobs)[None]
    if idx.ndim != 3:
        raise ValueError("encode_topk_bytes takes [T, k] or [B, T, k]")
    B, T, k = idx.shape
    enc = CacheEncoding(k, vocab_size, T, "compact", 0 if slot_bits is None else int(slot_bits))
    rec = enc.encode(idx, np.asarray(logprobs, dtype=np.float32), np.zeros((B, T), np.int32), np.full(B, T))
    head = np.array([0x3143_4B54, k, vocab_size, enc.slot_bits, B, T], dtype="<u4").tobytes()
    return head + b"".join(rec[f].tobytes() for f in ("log_mass", "hdr", "stream"))


def decode_topk_bytes(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_topk_bytes` -> (indices [B, T, k] int64, logprobs [B, T, k] float32), rank order."""
    if len(buf) < 24:
        raise ValueError("not a compact top-k buffer (too short)")
    magic, k, V, sb, B, T = (int(v) for v in np.frombuffer(buf, dtype="<u4", count=6))
    if magic != 0x3143_4B54:
        raise ValueError("not a compact top-k buffer (bad magic)")
    enc = CacheEncoding(k, V, T, "compact", sb)
    rec = np.zeros(B, enc.record_dtype)
    sizes = [(f, rec.dtype[f].itemsize) for f in ("log_mass", "hdr", "stream")]
    if len(buf) != 24 + B * sum(n for _, n in sizes):
        raise ValueError("compact top-k buffer of the wrong length")
    off = 24
    for f, n in sizes:
        rec[f] = np.frombuffer(buf, dtype=rec.dtype[f].base, count=B * n // rec.dtype[f].base.itemsize,
                               offset=off).reshape(rec[f].shape)
        off += B * n
    return enc.decode(rec)


@dataclass(frozen=True)
class CacheEncoding:
    k: int
    vocab_size: int
    seq_len: int
    logprobs: LogprobDtype = "q8"
    slot_bits: int = 0  # compact only: a row's stream bits per position (0: default_slot_bits(k, vocab_size))

    def __post_init__(self) -> None:
        if self.logprobs == "compact":
            if self.slot_bits == 0:
                object.__setattr__(self, "slot_bits", default_slot_bits(self.k, self.vocab_size))
            need = ef_bits(self.k, self.vocab_size) + self.k
            if self.slot_bits % 8 or self.slot_bits < need:
                raise LogitCacheError(f"compact slot_bits={self.slot_bits}: must be a multiple of 8 and >= {need} "
                                      f"(Elias-Fano's worst case at k={self.k}, vocab {self.vocab_size})")

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
        if self.logprobs == "compact":
            return np.dtype(fields + [("hdr", "<u2", (T,)), ("stream", "u1", (T * self.slot_bits // 8,))])
        if self.logprobs == "q8":
            fields += [("scale", "<f4", (T,))]
        fields += [("ids", "u1", (T, self.id_bytes))]
        fields += [("gaps", {"q8": "u1", "fp16": "<f2", "fp32": "<f4"}[self.logprobs], (T, g))]
        return np.dtype(fields)

    @property
    def bytes_per_entry(self) -> float:
        return self.record_dtype.itemsize / (self.seq_len * self.k)

    @property
    def bytes_per_token(self) -> float:
        return self.record_dtype.itemsize / self.seq_len

    def to_json(self) -> dict[str, Any]:
        if self.logprobs == "compact":
            return {
                "format": "numpy-memmap structured records, one per data row",
                "ids": "sorted set: exp-Golomb gaps or Elias-Fano, per position",
                "logprobs": "compact",
                "gamma": _GAMMA,
                "k": self.k,
                "vocab_size": self.vocab_size,
                "seq_len": self.seq_len,
                "slot_bits": self.slot_bits,
                "record_bytes": self.record_dtype.itemsize,
                "record_dtype": np.lib.format.dtype_to_descr(self.record_dtype),
            }
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
        if self.logprobs == "compact":
            ids, lp = ids.reshape(N, T, k), lp.reshape(N, T, k)
            for n in range(N):
                rec["hdr"][n], rec["stream"][n] = compact_encode_row(ids[n], lp[n], self.vocab_size, T * self.slot_bits // 8)
            return rec
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
        if self.logprobs == "compact":
            ids_o = np.empty((N, T, k), np.int64)
            lp_o = np.empty((N, T, k), np.float32)
            for n in range(N):
                i, l = compact_decode_row(rec["hdr"][n], rec["stream"][n], self.k, self.vocab_size, rec["log_mass"][n])
                ids_o[n], lp_o[n] = i[:, :k], l[:, :k]
            return ids_o, lp_o
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
        return cls(int(d["k"]), int(d["vocab_size"]), int(d["seq_len"]), d["logprobs"], int(d.get("slot_bits", 0)))
