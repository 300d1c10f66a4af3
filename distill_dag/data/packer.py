"""Packing: a stream of documents into fixed-length rows of one split, and the split a document is in.

- each document becomes ``ids + [EOS]``;
- ``position_ids`` count 0, 1, ... from each document start and keep counting when a document
  runs over into the next row (so a row starts at 0 only when a document starts there);
- ``labels[i]`` is ``input_ids[i]`` or -100 (NOT shifted; each loss shifts once): -100 at every
  document start (nothing in the document predicts its first token; the row before belongs to
  another document) and, with ``mask_prompt``, on every prompt token; in a chat document every
  token outside its assistant turns (all of them, not only the last) is -100; the EOS is a label;
- the stream is cut every ``max_seq_length`` tokens, and the tail carries over into the next row
  (across input files too); only the last row of a split is padded (pad id, attention 0,
  labels -100, positions continuing);
- a document is in the val split when ``blake2b(document id) / 2**64 < val_fraction`` (:func:`is_val`),
  so a document never straddles splits.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

def is_val(doc_id: str, val_fraction: float) -> bool:
    """Deterministic held-out choice by document id (same answer in every process and run)."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


class Packer:
    """Packs a stream of documents into rows of ``width`` tokens for one split.

    ``emit(ids, attention_mask, labels, position_ids, sources)`` receives full rows ``[n, width]``
    (fresh arrays, except the attention mask: a read-only view of one shared array of ones; the
    receiver may keep them all).
    """

    def __init__(self, width: int, eos_id: int, pad_id: int, mask_prompt: bool,
                 emit: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]], None]):
        self.width, self.eos_id, self.pad_id, self.mask_prompt, self.emit = width, eos_id, pad_id, mask_prompt, emit
        # the carried-over tail (< width tokens) and the documents in it: start offsets (the first may
        # be < 0: a document that began in an emitted row) and source codes
        self._tok = np.empty(0, np.int32)
        self._lab = np.empty(0, np.int32)
        self._pos = np.empty(0, np.int32)
        self._doc_start = np.empty(0, np.int64)
        self._doc_src = np.empty(0, np.int32)
        self._src_names: list[str] = []
        self._src_code: dict[str, int] = {}
        self._ones = np.ones((0, width), np.int8)  # full rows' attention mask, shared (read-only) views
        self.docs = 0
        self.tokens = 0

    def add(self, ids: np.ndarray, lens: np.ndarray, prompt_lens: np.ndarray, sources: list[str],
            spans: list[list[int] | None] | None = None) -> None:
        """Append documents (``ids`` their tokens concatenated, ``lens`` [n], ``prompt_lens`` [n]; ``spans``
        the trained ranges of chat documents, which replace their prompt length)."""
        if len(lens) == 0:
            return
        k = len(self._tok)
        L = lens.astype(np.int64) + 1  # + EOS
        ends = np.cumsum(L) + k  # offsets in the buffer that starts with the carried tail
        starts = ends - L
        size = int(ends[-1])
        # one pass per array, the carried tail written in front (no concatenation afterwards)
        tok = np.empty(size, np.int32)
        tok[:k] = self._tok
        keep = np.ones(size - k, bool)
        keep[ends - 1 - k] = False
        tok[k:][keep] = ids
        tok[ends - 1] = self.eos_id
        pos = np.ones(size, np.int32)  # 0 at each document start, +1 per token: a cumulative sum
        pos[:k] = self._pos
        pos[starts[0]] = 0
        pos[starts[1:]] = 1 - L[:-1]  # back from the previous document's last position (L - 1) to 0
        np.cumsum(pos[k:], out=pos[k:])
        lab = tok.copy()
        lab[:k] = self._lab
        lab[starts] = -100
        if self.mask_prompt and spans is not None and any(sp is not None for sp in spans):
            # a chat document: -100 everywhere but its assistant turns (its EOS stays a label)
            chat = np.zeros(len(lens), bool)
            chat[[j for j, sp in enumerate(spans) if sp is not None]] = True
            masked = np.repeat(chat, L)
            masked[ends - 1 - k] = False
            for j, sp in enumerate(spans):
                for a, b in zip(sp[::2], sp[1::2]) if sp else ():
                    masked[starts[j] - k + a:starts[j] - k + b] = False
            plain = np.where(chat, 0, prompt_lens)
            masked |= pos[k:] < np.repeat(plain, L)
            lab[k:][masked] = -100
        elif self.mask_prompt and prompt_lens.any():
            lab[k:][pos[k:] < np.repeat(prompt_lens, L)] = -100
        codes = np.fromiter((self._code(s) for s in sources), dtype=np.int32, count=len(sources))
        doc_start = np.concatenate([self._doc_start, starts])
        doc_src = np.concatenate([self._doc_src, codes])
        self.docs += len(lens)
        self.tokens += size - k
        self._emit_full(tok, lab, pos, doc_start, doc_src)

    def _code(self, s: str) -> int:
        c = self._src_code.get(s)
        if c is None:
            c = self._src_code[s] = len(self._src_names)
            self._src_names.append(s)
        return c

    def _emit_full(self, tok: np.ndarray, lab: np.ndarray, pos: np.ndarray, doc_start: np.ndarray,
                   doc_src: np.ndarray) -> None:
        w = self.width
        n = len(tok) // w
        cut = n * w
        if n:
            # a row's source: the document holding its first token (the last one starting at or before it)
            first = np.searchsorted(doc_start, np.arange(0, cut, w), side="right") - 1
            rows_src = [self._src_names[c] for c in doc_src[first].tolist()]
            if len(self._ones) < n:
                self._ones = np.ones((n, w), np.int8)
                self._ones.flags.writeable = False
            self.emit(tok[:cut].reshape(n, w), self._ones[:n], lab[:cut].reshape(n, w),
                      pos[:cut].reshape(n, w), rows_src)
        # the documents reaching into the tail: from the last one that starts at or before the cut
        d = int(np.searchsorted(doc_start, cut, side="right")) - 1
        self._doc_start, self._doc_src = doc_start[d:] - cut, doc_src[d:].copy()
        self._tok, self._lab, self._pos = tok[cut:].copy(), lab[cut:].copy(), pos[cut:].copy()

    def finish(self) -> None:
        """Pad and emit the last partial row."""
        k = len(self._tok)
        if k == 0:
            return
        w = self.width
        pad = w - k
        tok = np.concatenate([self._tok, np.full(pad, self.pad_id, np.int32)])
        att = np.concatenate([np.ones(k, np.int8), np.zeros(pad, np.int8)])
        lab = np.concatenate([self._lab, np.full(pad, -100, np.int32)])
        pos = np.concatenate([self._pos, self._pos[-1] + 1 + np.arange(pad, dtype=np.int32)])
        self.emit(tok[None], att[None], lab[None], pos[None], [self._src_names[int(self._doc_src[0])]])
        self._tok = self._lab = self._pos = np.empty(0, np.int32)
        self._doc_start, self._doc_src = np.empty(0, np.int64), np.empty(0, np.int32)

