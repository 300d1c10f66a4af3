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

from distill_dag.errors import TeacherError

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
    if bits > 32:
        raise ValueError(f"pack_ids: {bits} bits per id (at most 32)")
    # id i sits at bit i*bits: it is OR-ed into 64-bit word (i*bits) >> 6, and its bits past that word's
    # end into the next one; one column (the same for every row) at a time, on [k, N] / [words, N]
    v = np.ascontiguousarray(ids.T, dtype=np.uint64)
    out = np.zeros(((k * bits + 63) // 64 + 1, n), np.uint64)
    for i in range(k):
        w, s = (i * bits) >> 6, (i * bits) & 63
        out[w] |= v[i] << np.uint64(s)
        if s + bits > 64:
            out[w + 1] |= v[i] >> np.uint64(64 - s)
    return np.ascontiguousarray(out.T).astype("<u8", copy=False).view(np.uint8)[:, : (k * bits + 7) // 8]


def unpack_ids(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: read a 32-bit window at each id's bit offset (bits <= 25)."""
    n, nb = packed.shape
    buf = np.zeros((n, nb + 4), dtype=np.uint32)
    buf[:, :nb] = packed
    off = np.arange(k, dtype=np.int64) * bits
    byte, shift = off >> 3, (off & 7).astype(np.uint32)
    word = buf[:, byte] | (buf[:, byte + 1] << 8) | (buf[:, byte + 2] << 16) | (buf[:, byte + 3] << 24)
    return ((word >> shift) & np.uint32((1 << bits) - 1)).astype(np.int64)


def _diff0(x: np.ndarray) -> np.ndarray:
    """``np.diff(x, axis=-1, prepend=0.0)`` without the concatenation (the same floats)."""
    out = np.empty_like(x)
    out[:, :1] = x[:, :1]
    np.subtract(x[:, 1:], x[:, :-1], out=out[:, 1:])
    return out


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


def _bitlen24(x: np.ndarray) -> np.ndarray:
    """Bit length of ints in [1, 2**24) as int32: the float32 exponent (no frexp, 4-byte passes)."""
    return (x.astype(np.float32).view(np.int32) >> 23) - 126


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


def _fields_to_bytes(off: np.ndarray, val: np.ndarray, width: np.ndarray, nbytes: int) -> np.ndarray:
    """Disjoint bit fields (val < 2**width, width <= 32), at bit offsets off [N, F] of row n's stream,
    increasing along each row -> [N, nbytes] uint8, little-endian bit order. In 64-bit words: a word is
    the OR of the fields that start in it (one reduceat, the offsets being sorted) and of the spill of
    at most one field from the word before."""
    N = off.shape[0]
    nw = (nbytes + 7) // 8 + 1
    go = (off.astype(np.int64) + (np.arange(N, dtype=np.int64) * (nw * 64))[:, None]).reshape(-1)
    v = val.reshape(-1).astype(np.uint64)
    word, sh = go >> 6, (go & 63).astype(np.uint64)
    starts = np.flatnonzero(np.diff(word, prepend=-1))
    out = np.zeros(N * nw, np.uint64)
    out[word[starts]] = np.bitwise_or.reduceat(v << sh, starts)
    spill = np.flatnonzero(sh + width.reshape(-1).astype(np.uint64) > 64)
    if spill.size:
        out[word[spill] + 1] |= v[spill] >> (np.uint64(64) - sh[spill])
    return out.astype("<u8").view(np.uint8).reshape(N, nw * 8)[:, :nbytes]


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


_EG_ORDERS = np.arange(15)


def _id_codes(ids: np.ndarray, vocab_size: int, chunk: int = 0) -> tuple[np.ndarray, ...]:
    """ids [P, k] -> (x sorted [P, k], order, mode [P], id bits [P], unary zeros [P, k], mantissa widths, mantissas).

    The exp-Golomb code of gap g at order k0 has ``n = bitlen((g >> k0) + 1) - 1 = bitlen(g + 2^k0) - 1 - k0``
    unary zeros and costs ``2 n + k0 + 1`` bits: a position's cost at each order is one bit-length sum."""
    P, k = ids.shape
    order = np.argsort(ids, axis=-1, kind="stable")
    x = np.take_along_axis(ids.astype(np.int64), order, -1)
    g = np.diff(x, axis=-1, prepend=-1) - 1  # >= 0: exp-Golomb of the gaps, every order k0 in 0..14
    small = vocab_size + (1 << 14) < (1 << 24)  # g + 2^k0 exact in float32
    bitlen = _bitlen24 if small else _bitlen
    g_c = g.astype(np.int32) if small else g
    cost_eg = np.empty((P, len(_EG_ORDERS)), np.int64)
    chunk = chunk or max(1, 8192 // k)
    for a in range(0, P, chunk):
        y = g_c[a : a + chunk, None, :] + (1 << _EG_ORDERS).astype(g_c.dtype)[None, :, None]  # [c, 15, k]
        cost_eg[a : a + chunk] = 2 * bitlen(y).sum(-1, dtype=np.int64)
    cost_eg -= k * (_EG_ORDERS + 1)  # sum_i (2 n_i + k0 + 1) = 2 sum_i bitlen_i - k (k0 + 1)
    L = ef_low_bits(k, vocab_size)  # or Elias-Fano: k (L + 1) + x_max >> L bits
    cost_ef = k * (L + 1) + (x[:, -1] >> L)
    best = np.argmin(cost_eg, axis=1)
    rows = np.arange(P)
    use_ef = cost_ef <= cost_eg[rows, best]
    mode = np.where(use_ef, _EF_MODE, best)
    cost = np.where(use_ef, cost_ef, cost_eg[rows, best])
    k0 = np.where(use_ef, 0, best)[:, None]
    n_eg = bitlen(g_c + (1 << best).astype(g_c.dtype)[:, None]).astype(np.int64) - 1 - best[:, None]
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


_RECON: tuple[np.ndarray, np.ndarray] | None = None


def _recon_table() -> tuple[np.ndarray, np.ndarray]:
    """(table, offsets [32]): ``table[offsets[l] + c] == _reconstruct(c, Q_l)`` for every code the encoder
    makes at level l (c <= rint(Q_l): the companded value is <= 1), the same float64 operations
    element by element, so a lookup replaces the log of the rate control's every (entry, level)."""
    global _RECON
    if _RECON is None:
        parts, offs, at = [], [], 0
        for q in _Q_LEVELS:
            c = np.arange(int(np.rint(q)) + 1, dtype=np.float64)
            parts.append(_reconstruct(c, np.full(1, q)))
            offs.append(at)
            at += c.size
        _RECON = np.concatenate(parts), np.array(offs, np.int32)
    return _RECON


def _level_table(lp: np.ndarray, chunk: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """lp [P, k] -> (bits [P, 32], distortion [P, 32]) of each grid level: exp-Golomb-0 bits of the
    codes, and sum_i p_i e_i^2 - (sum p e)^2 / sum p (e: log-prob error; the mass is restored).

    Laid out [level, position, entry] (every broadcast along the outer axis, every sum over a
    contiguous row of k), the reconstruction looked up in :func:`_recon_table`."""
    P, k = lp.shape
    table, offs = _recon_table()
    nl = len(_Q_LEVELS)
    bits = np.empty((nl, P), np.int64)
    dist = np.empty((nl, P))
    Q = _Q_LEVELS[:, None, None]
    off = offs[:, None, None]
    chunk = chunk or max(1, 2048 // k)
    for a in range(0, P, chunk):
        l = lp[a : a + chunk]
        top = l.max(-1, keepdims=True)
        d = top - l  # [c, k]
        x = np.exp(-_GAMMA * d) * Q  # [32, c, k]
        np.rint(x, out=x)
        c = x.astype(np.int32)  # <= rint(Q)
        np.add(c, 1, out=c)  # bitlen(c + 1) = float32 exponent - 126
        bits[:, a : a + chunk] = 2 * (c.astype(np.float32).view(np.int32) >> 23).sum(-1, dtype=np.int64) - 253 * k
        np.add(c, off - 1, out=c)
        e = table[c]
        e -= d
        p = np.exp(l - top)
        sp = p.sum(-1)
        pe = p * e
        e *= pe
        dist[:, a : a + chunk] = e.sum(-1) - pe.sum(-1) ** 2 / sp
    return bits.T, np.maximum(dist.T, 0.0) * np.exp(lp.max(-1))[:, None]


def _allocate(bits: np.ndarray, dist: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Per-position levels minimising each row's summed distortion with its summed bits <= its budget
    (Lagrangian, bisection on lambda, every row at once): bits/dist [N, T, 32], budget [N] -> [N, T]."""
    N = bits.shape[0]

    def pick(lam: np.ndarray) -> np.ndarray:
        return np.argmin(dist + lam[:, None, None] * bits, axis=2)

    def cost(level: np.ndarray) -> np.ndarray:
        return np.take_along_axis(bits, level[..., None], 2)[..., 0].sum(1)

    def exp(x: np.ndarray) -> np.ndarray:  # math.exp per row: the lambdas of the scalar bisection, bit for bit
        return np.array([math.exp(v) for v in x.tolist()])

    out = pick(np.zeros(N))
    todo = cost(out) > budget
    if not todo.any():
        return out
    bits, dist, budget = bits[todo], dist[todo], budget[todo]
    n = int(todo.sum())
    lo, hi = np.full(n, -40.0), np.full(n, 10.0)  # log lambda
    full = cost(pick(exp(hi))) > budget
    for _ in range(40):
        mid = (lo + hi) / 2
        fits = cost(pick(exp(mid))) <= budget
        hi, lo = np.where(fits, mid, hi), np.where(fits, lo, mid)
    lv = pick(exp(hi))
    lv[full] = len(_Q_LEVELS) - 1
    out[todo] = lv
    return out


def compact_encode_rows(ids: np.ndarray, lp: np.ndarray, vocab_size: int, stream_bytes: int,
                        log_mass: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Rows: ids [N, T, k] (distinct per position, < vocab_size), lp [N, T, k] float64 (any order, clamped to
    _MAX_GAP below each top) -> (headers [N, T] u2: id mode | level << 4, streams [N, stream_bytes] u1).
    Vectorised over every position of every row: no Python loop over rows or positions. With the
    stored ``log_mass`` [N, T] (fp32) it also returns what :func:`compact_decode_rows` will decode's
    log-probs [N, T, k] (float64, rank order), from the codes in hand (no parsing of the stream)."""
    N, T, k = ids.shape
    x, order, mode, id_cost, id_un, id_w, id_m = _id_codes(ids.reshape(N * T, k), vocab_size)
    lp = np.take_along_axis(lp.reshape(N * T, k), order, -1)
    lbits, dist = _level_table(lp)
    room = stream_bytes * 8 - id_cost.reshape(N, T).sum(1)
    if np.any(room < T * k):
        raise LogitCacheError(f"compact stream of {stream_bytes} B cannot hold {T} x k={k} ids of vocab {vocab_size}")
    level = _allocate(lbits.reshape(N, T, -1), dist.reshape(N, T, -1), room).reshape(N * T)
    d = lp.max(-1, keepdims=True) - lp
    c = np.rint(np.exp(-_GAMMA * d) * _Q_LEVELS[level][:, None]).astype(np.int64)
    n_c = _bitlen(c + 1) - 1
    # stream: every position's 2k unary codes (ids, then log-probs), then every mantissa, in order
    unary = np.concatenate([id_un, n_c], axis=1).reshape(N, T * 2 * k)
    ones = np.cumsum(unary + 1, axis=1) - 1
    m_w = np.concatenate([id_w, n_c], axis=1).reshape(N, -1)
    m_v = np.concatenate([id_m, c + 1 - (1 << n_c)], axis=1).reshape(N, -1)
    m_off = ones[:, -1:] + 1 + np.cumsum(m_w, axis=1) - m_w
    if np.any(m_off[:, -1] + m_w[:, -1] > stream_bytes * 8):
        raise LogitCacheError("compact rate control overflowed a row's stream (a codec bug); please report it")
    stream = _fields_to_bytes(np.concatenate([ones, m_off], axis=1), np.concatenate([np.ones_like(ones), m_v], axis=1),
                              np.concatenate([np.ones_like(ones), m_w], axis=1), stream_bytes)
    hdr = (mode | (level << 4)).astype("<u2").reshape(N, T)
    if log_mass is None:
        return hdr, stream
    table, offs = _recon_table()
    d = table[c + offs[level][:, None]]  # == _reconstruct(c, Q[level]), as the decoder computes it
    lp = log_mass.astype(np.float64).reshape(N * T)[:, None] - _logsumexp(-d)[:, None] - d
    lp = np.take_along_axis(lp, np.argsort(d, axis=-1, kind="stable"), -1)
    return hdr, stream, lp.reshape(N, T, k)


def compact_encode_row(ids: np.ndarray, lp: np.ndarray, vocab_size: int, stream_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """One row: ids [T, k], lp [T, k] -> (headers [T] u2, stream [stream_bytes] u1); see :func:`compact_encode_rows`."""
    hdr, stream = compact_encode_rows(ids[None], lp[None], vocab_size, stream_bytes)
    return hdr[0], stream[0]


def compact_decode_rows(hdr: np.ndarray, stream: np.ndarray, k: int, vocab_size: int, log_mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`compact_encode_rows`: hdr [N, T], stream [N, S], log_mass [N, T] -> (ids [N, T, k]
    int64, lp [N, T, k] float64), rank order (ties of decoded log-probs: smaller id first)."""
    N, T = hdr.shape
    hdr = hdr.astype(np.int64).reshape(N * T)
    mode, level = hdr & 15, hdr >> 4
    use_ef = (mode == _EF_MODE)[:, None]
    k0 = np.where(use_ef[:, 0], 0, mode)[:, None]
    bits = np.unpackbits(stream, axis=1, bitorder="little")
    ones = _nth_ones(bits, 0, T * 2 * k)
    unary = (np.diff(ones, axis=1, prepend=-1) - 1).reshape(N * T, 2 * k)
    id_un, n_c = unary[:, :k], unary[:, k:]
    L = ef_low_bits(k, vocab_size)
    id_w = np.where(use_ef, L, id_un + k0)
    m_w = np.concatenate([id_w, n_c], axis=1).reshape(N, -1)
    m_off = ones[:, -1:] + 1 + np.cumsum(m_w, axis=1) - m_w
    buf = np.zeros((N, stream.shape[1] + 8), np.uint8)
    buf[:, : stream.shape[1]] = stream
    m = _get_fields(buf, m_off, m_w).reshape(N * T, 2 * k)
    id_m, c_m = m[:, :k], m[:, k:]
    x_ef = (np.cumsum(id_un, axis=1) << L) | id_m
    x_eg = np.cumsum((1 << id_w) + id_m - (1 << k0) + 1, axis=1) - 1
    x = np.where(use_ef, x_ef, x_eg)
    d = _reconstruct((1 << n_c) + c_m - 1, _Q_LEVELS[level][:, None])
    lp = log_mass.astype(np.float64).reshape(N * T)[:, None] - _logsumexp(-d)[:, None] - d
    order = np.argsort(d, axis=-1, kind="stable")
    out = np.take_along_axis(x, order, -1), np.take_along_axis(lp, order, -1)
    return out[0].reshape(N, T, k), out[1].reshape(N, T, k)


def compact_decode_row(hdr: np.ndarray, stream: np.ndarray, k: int, vocab_size: int, log_mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row of :func:`compact_decode_rows` -> (ids [T, k] int64, lp [T, k] float64)."""
    i, l = compact_decode_rows(hdr[None], stream[None], k, vocab_size, log_mass[None])
    return i[0], l[0]


_DECODE_ROWS = 1  # rows parsed at once (the bit arrays of one row stay in cache)
_ROWS_PER_CALL = 8  # rows coded at once (bounds the bit arrays: ~0.5 MB of stream bits per row at vocab 128k)


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
        self, indices: np.ndarray, logprobs: np.ndarray, input_ids: np.ndarray, n_valid: np.ndarray,
        *, with_logprobs: bool = False,
    ) -> Any:
        """indices/logprobs [N, T, k] (sorted desc, T=1, full-vocab normalised) -> records [N];
        ``with_logprobs``: (records, the log-probs ``decode(records)`` gives [N, T, k] float32), the
        second from the codes in hand (e.g. for the cache's stats, without decoding the records)."""
        N, T, k = indices.shape
        if (T, k) != (self.seq_len, self.k):
            raise LogitCacheError(f"top-k of shape [{N}, {T}, {k}] does not fit the cache's [*, {self.seq_len}, {self.k}]")
        if indices.min(initial=0) < 0 or indices.max(initial=0) >= self.vocab_size:
            raise LogitCacheError(f"teacher token id outside [0, {self.vocab_size}): teacher and cache vocab differ")
        lp = logprobs.reshape(N * T, k).astype(np.float64)
        ids = indices.reshape(N * T, k)
        if np.any(lp[:, 1:] > lp[:, :-1]):  # the contract says sorted; be robust to a provider that is not
            order = np.argsort(-lp, axis=-1, kind="stable")
            lp, ids = np.take_along_axis(lp, order, -1), np.take_along_axis(ids, order, -1)
        lp = np.maximum(lp, lp[:, :1] - _MAX_GAP)
        rec = np.zeros(N, dtype=self.record_dtype)
        rec["tokens_hash"] = tokens_hash(input_ids)
        rec["n_valid"] = n_valid
        # logsumexp with the max known: rows are sorted (a NaN anywhere gives NaN either way)
        rec["log_mass"] = np.minimum(lp[:, 0] + np.log(np.sum(np.exp(lp - lp[:, :1]), axis=-1)), 0.0).reshape(N, T)
        if self.logprobs == "compact":
            ids, lp = ids.reshape(N, T, k), lp.reshape(N, T, k)
            dec = np.empty((N, T, k), np.float32) if with_logprobs else None
            for a in range(0, N, _ROWS_PER_CALL):
                z = slice(a, a + _ROWS_PER_CALL)
                out = compact_encode_rows(ids[z], lp[z], self.vocab_size, T * self.slot_bits // 8,
                                          rec["log_mass"][z] if with_logprobs else None)
                rec["hdr"][z], rec["stream"][z] = out[0], out[1]
                if dec is not None:
                    dec[z] = out[2]
            return (rec, dec) if with_logprobs else rec
        rec["ids"] = pack_ids(ids, self.id_bits).reshape(N, T, self.id_bytes)
        d = lp[:, :1] - lp[:, 1:]  # [N*T, k-1] >= 0, nondecreasing
        if self.logprobs == "q8":
            steps = _diff0(d)
            s = (steps.max(axis=-1, initial=0.0) / _Q8_STEPS).astype(np.float32)
            s[s <= 0] = 1.0  # all gaps zero: any grid will do
            s64 = s.astype(np.float64)[:, None]
            codes = np.rint(d / s64)
            delta = _diff0(codes)
            rec["scale"] = s.reshape(N, T)
            exact = k == 1 or (delta.min() >= 0 and delta.max() <= 255)  # (always, by the grid's construction)
            if not exact:
                np.clip(delta, 0, 255, out=delta)
            rec["gaps"] = delta.astype(np.uint8).reshape(N, T, k - 1)
            if not with_logprobs:
                return rec
            if exact:  # the decoder's cumsum of the stored steps is ``codes`` itself (integers in fp64)
                dd = np.empty((N * T, k))
                dd[:, 0] = 0.0
                np.multiply(codes, s64, out=dd[:, 1:])
                return rec, self._gaps_to_logprobs(dd, rec, k)
            return rec, self._gap_logprobs(rec, k)
        rec["gaps"] = d.astype(rec.dtype["gaps"].base).reshape(N, T, k - 1)
        return (rec, self._gap_logprobs(rec, self.k)) if with_logprobs else rec

    def decode(self, rec: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """records [N] -> (indices [N, T, k] int64, logprobs [N, T, k] float32), k <= self.k."""
        k = self.k if k is None else k
        N, T = rec.shape[0], self.seq_len
        if self.logprobs == "compact":
            ids_o = np.empty((N, T, k), np.int64)
            lp_o = np.empty((N, T, k), np.float32)
            for a in range(0, N, _DECODE_ROWS):
                z = slice(a, a + _DECODE_ROWS)
                i, l = compact_decode_rows(rec["hdr"][z], rec["stream"][z], self.k, self.vocab_size, rec["log_mass"][z])
                ids_o[z], lp_o[z] = i[..., :k], l[..., :k]
            return ids_o, lp_o
        ids = unpack_ids(np.ascontiguousarray(rec["ids"]).reshape(N * T, self.id_bytes), self.k, self.id_bits)
        return ids[:, :k].reshape(N, T, k), self._gap_logprobs(rec, k)

    def _gap_logprobs(self, rec: np.ndarray, k: int) -> np.ndarray:
        """q8 / fp16 / fp32 records -> their log-probs [N, T, k] float32 (the decoder's)."""
        N, T = rec.shape[0], self.seq_len
        if self.logprobs == "q8":
            codes = np.cumsum(rec["gaps"].reshape(N * T, self.k - 1).astype(np.int64), axis=-1)
            d = codes * rec["scale"].reshape(N * T, 1).astype(np.float64)
        else:
            d = rec["gaps"].reshape(N * T, self.k - 1).astype(np.float64)
        d = np.concatenate([np.zeros((N * T, 1)), d], axis=-1)
        # the top log-prob from the stored mass: the decoded top-k holds exactly the teacher's mass
        lp0 = rec["log_mass"].reshape(N * T).astype(np.float64) - _logsumexp(-d)
        return (lp0[:, None] - d[:, :k]).astype(np.float32).reshape(N, T, k)

    def _gaps_to_logprobs(self, d: np.ndarray, rec: np.ndarray, k: int) -> np.ndarray:
        """The encoder's copy of :meth:`_gap_logprobs`'s last step, for gaps d [N*T, k] known to be >= 0 with
        d[:, 0] = 0 (so the max of -d is -0.0: logsumexp(-d) is log(sum(exp(-d))), bit for bit)."""
        N, T = rec.shape[0], self.seq_len
        lp0 = rec["log_mass"].reshape(N * T).astype(np.float64) - np.log(np.sum(np.exp(-d), axis=-1))
        return (lp0[:, None] - d[:, :k]).astype(np.float32).reshape(N, T, k)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CacheEncoding":
        return cls(int(d["k"]), int(d["vocab_size"]), int(d["seq_len"]), d["logprobs"], int(d.get("slot_bits", 0)))
