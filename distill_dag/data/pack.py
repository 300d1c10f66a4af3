"""Tokenize JSONL documents and pack them into fixed-length rows of parquet shards.

Packing (one stream per split, in input order, then line order):

- each document becomes ``ids + [EOS]``; a prompt/response row is ``encode(prompt) +
  encode(response)`` (special tokens such as BOS only at the document start); a chat row
  (``messages`` / ``conversations``, and prompt/response when the tokenizer has a chat template of
  its own) is rendered by :class:`~distill_dag.data.chat.ChatRenderer` with that template (the plain
  one as the fallback); the manifest's ``chat_template`` says which;
- ``position_ids`` count 0, 1, ... from each document start and keep counting when a document
  runs over into the next row (so a row starts at 0 only when a document starts there);
- ``labels[i]`` is ``input_ids[i]`` or -100 (NOT shifted; each loss shifts once): -100 at every
  document start (nothing in the document predicts its first token; the row before belongs to
  another document) and, with ``mask_prompt``, on every prompt token; in a chat document every
  token outside its assistant turns (all of them, not only the last) is -100; the EOS is a label;
- the stream is cut every ``max_seq_length`` tokens, and the tail carries over into the next row
  (across input files too); only the last row of a split is padded (pad id, attention 0,
  labels -100, positions continuing);
- a document is in the val split when ``blake2b(document id) / 2**64 < val_fraction`` (the id is
  the row's ``id`` field, else ``<input key>:<line>``), so a document never straddles splits.

Each input's tokens are cached under ``<output>/.cache/`` keyed by the input's sha256 and the
tokenizer hash: ``skip_existing`` re-tokenizes only inputs whose content changed, then repacks
from the caches (cheap); an unchanged input set leaves the shards untouched. Inputs are keyed by
their path relative to the input root, so same-named files in different folders never collide.
An input is hashed at discovery (for the cache and the build key) and again, in the same pass,
as it is read: content that changed in between is refused (:class:`InputChangedError`), so the
manifest's sha256 is always that of the bytes the shards were built from.

Publishing is all-or-nothing. A build writes its shards into a new generation folder,
``<output>/gen-<build key>/``, that no manifest names yet; only the atomic replace of
``<output>/manifest.json`` (shard paths relative to it, e.g. ``gen-1a2b3c4d5e6f/train-00000.parquet``)
makes them visible, and the previous generation is deleted after that. A rebuild that fails (bad
rows over ``max_reject_rate``, disk full, an input changing) or is killed at any point leaves the
previous dataset readable and byte-identical; its partial generation is removed then or by the
next run. Rerunning produces exactly the shards and manifest of a clean run (everything is
deterministic, the generation name too). One run writes an output at a time (``<output>/.lock``);
workers filling the token cache share it, and never read the output tree as input.

Three stages overlap (on 2 cores 1.08-1.2x the bare tokenizer's ``encode_batch`` and ~0.8 of its
``encode_batch_fast``, wall-clock, bench/tokenization.py; the work besides encoding is ~0.11 of the
encoder's CPU time, so ~0.9 is the ceiling on cores the encoder keeps busy):
the main thread reads + parses JSONL batches (across input files) and packs encoded ones;
``_ENCODE_INFLIGHT`` batches are encoded at once in worker threads (``encode_batch_fast``
releases the GIL and spreads each batch over every core; two batches in flight keep the cores
busy while one batch's last long document finishes); one background thread writes the shards
and token caches (parquet encoding, fsync, rename, sha256; pyarrow and hashlib release the GIL).
Everything is consumed in input order, so the bytes written do not depend on the timing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from distill_dag.config import PipelineConfig
from distill_dag.data.chat import ChatRenderer, chat_text, is_chat_row, messages_of
from distill_dag.data.jsonl import DEFAULT_MAX_LINE_BYTES, ReadStats, Reject, check_reject_rate, iter_jsonl
from distill_dag.data.manifest import MANIFEST, SCHEMA_VERSION, Manifest
from distill_dag.data.paths import InputFile, discover_inputs
from distill_dag.data.shards import GENERATION_PREFIX, BackgroundWriter, ShardWriter, np_to_arrow, str_to_arrow
from distill_dag.data.tokenizer import load_tokenizer, tokenizer_name
from distill_dag.data.tokenizer import tokenizer_hash as hash_tokenizer_dir
from distill_dag.io import (MARKER, DiskFullError, atomic_path, claim_dir, dir_lock, is_disk_full, remove_temp_files,
                            sha256_json, write_bytes_atomic, write_json_atomic)

CACHE_VERSION = 2  # 2: chat rows, with their trained spans
CACHE_DIR = ".cache"
REJECTS = "rejects.jsonl"
_BATCH_BYTES = 4 << 20  # text per encode call: long enough that a call is not mostly its tail
_ENCODE_INFLIGHT = 2  # batches encoded at once (each call is itself parallel over documents)
# per-document metadata of the token cache; the tokens themselves are raw int32 in <stem>.tokens.bin
_CACHE_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("len", pa.int64()),
                           ("prompt_len", pa.int32()), ("spans", pa.list_(pa.int32()))])


# ---- inputs ------------------------------------------------------------------------------------
class InputChangedError(RuntimeError):
    """An input's content changed between its discovery and its read: nothing was published."""


class TooFewRowsError(RuntimeError):
    """A build would publish fewer rows than ``tokenize.min_rows``: nothing was published, and the
    previous dataset (if any) is still the one the manifest names."""


def worker_inputs(files: list[InputFile], worker: int, num_workers: int) -> list[InputFile]:
    """The inputs worker ``worker`` of ``num_workers`` tokenizes: largest first, each to the least
    loaded worker (by bytes). Every worker computes the same split from the same inputs, so they need
    no coordination; the result keeps input order."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} of {num_workers}: give 0 <= worker < num_workers (e.g. --worker 0/2)")
    load = [0] * num_workers
    mine = set()
    for f in sorted(files, key=lambda f: (-f.bytes, f.key)):
        w = min(range(num_workers), key=lambda i: (load[i], i))
        load[w] += f.bytes
        if w == worker:
            mine.add(f.key)
    return [f for f in files if f.key in mine]


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Deterministic held-out choice by document id (same answer in every process and run)."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


# ---- documents ---------------------------------------------------------------------------------
@dataclass
class DocBatch:
    """Tokenized documents: ``ids`` all documents' tokens concatenated (no EOS), ``lens`` [n],
    ``prompt_lens`` [n] (0 for text rows), ``doc_ids`` and ``sources`` (n strings each); ``spans``
    per document the trained token ranges of a chat document (flat ``[start, end, ...]``), None for
    the others (the whole list None when the batch holds no chat document)."""

    ids: np.ndarray
    lens: np.ndarray
    prompt_lens: np.ndarray
    doc_ids: list[str]
    sources: list[str]
    spans: list[list[int] | None] | None = None

    @property
    def n(self) -> int:
        return len(self.lens)


def _flatten(lists: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=total)


def encode_longest_first(backend: Any, texts: list[str], add_special_tokens: bool) -> list[Any]:
    """``backend.encode_batch_fast(texts)``, results in input order, the texts handed over longest
    first: the tokenizer's threads then end a call together instead of one finishing a long
    document while the other spins idle (~5% less CPU and wall on the stdlib corpus)."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    enc = backend.encode_batch_fast([texts[i] for i in order], add_special_tokens=add_special_tokens)
    out: list[Any] = [None] * len(texts)
    for e, i in zip(enc, order):
        out[i] = e
    return out


def encode_rows(backend: Any, rows: list[dict[str, Any]], doc_ids: list[str], sources: list[str],
                chat: ChatRenderer | None = None) -> DocBatch:
    """Encode text / prompt+response rows with a ``tokenizers.Tokenizer`` (special tokens only at the start),
    and chat rows with ``chat`` (the tokenizer's template; see :mod:`distill_dag.data.chat`)."""
    msgs = [messages_of(r, chat.own) if chat is not None else None for r in rows]
    if chat is None and any(is_chat_row(r) for r in rows):
        raise ValueError("encode_rows: chat rows (messages / conversations) need a ChatRenderer")
    plain = [i for i, m in enumerate(msgs) if m is None]
    lists: list[Any] = [None] * len(rows)
    prompt_lens = np.zeros(len(rows), dtype=np.int32)
    spans: list[list[int] | None] | None = None
    if plain:
        firsts = [rows[i]["text"] if "text" in rows[i] else rows[i]["prompt"] for i in plain]
        enc1 = encode_longest_first(backend, firsts, add_special_tokens=True)
        for i, e in zip(plain, enc1):
            lists[i] = e.ids
        resp_rows = [i for i in plain if "text" not in rows[i]]
        if resp_rows:
            enc2 = encode_longest_first(backend, [rows[i]["response"] for i in resp_rows], add_special_tokens=False)
            for i, e in zip(resp_rows, enc2):
                prompt_lens[i] = len(lists[i])
                lists[i] = lists[i] + e.ids
    if len(plain) < len(rows):
        assert chat is not None
        spans = [None] * len(rows)
        for i, m in enumerate(msgs):
            if m is not None:
                lists[i], spans[i] = chat.render(m)
                prompt_lens[i] = spans[i][0] if spans[i] else len(lists[i])  # up to the first answer
    lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    return DocBatch(_flatten(lists, int(lens.sum())), lens, prompt_lens, doc_ids, sources, spans)


def _row_batches(inp: InputFile, stats: ReadStats, rejects: list[Reject], batch_docs: int,
                 max_line_bytes: int, default_source: str, digest: Any) -> Iterator[tuple[list[dict], list[str], list[str]]]:
    rows: list[dict] = []
    ids: list[str] = []
    srcs: list[str] = []
    size = 0
    for line_no, row in iter_jsonl(inp.path, stats, max_line_bytes=max_line_bytes, digest=digest):
        if isinstance(row, Reject):
            row.file = str(inp.path)
            rejects.append(row)
            continue
        rows.append(row)
        rid = row.get("id")
        ids.append(str(rid) if rid is not None else f"{inp.key}:{line_no}")
        src = row.get("source")
        srcs.append(src if isinstance(src, str) and src else default_source)
        # the fields encode_rows reads: a text row may carry other fields of any type (a "prompt": true)
        size += (len(row["text"]) if "text" in row else len(row["prompt"]) + len(row["response"])
                 if "prompt" in row else len(chat_text(row)))
        if len(rows) >= batch_docs or size >= _BATCH_BYTES:
            yield rows, ids, srcs
            rows, ids, srcs, size = [], [], [], 0
    if rows:
        yield rows, ids, srcs


def _default_source(key: str) -> str:
    parts = key.split("/")
    return parts[0] if len(parts) > 1 else Path(key).stem


# ---- packing -----------------------------------------------------------------------------------
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


# ---- cache of one input's tokens ---------------------------------------------------------------
_CACHE_SUFFIXES = (".rejects.jsonl", ".tokens.bin", ".docs.parquet", ".json")


def _cache_paths(out: Path, inp: InputFile) -> tuple[Path, Path, Path]:
    """(docs parquet, meta json, rejects jsonl); the tokens are ``docs parquet`` with .tokens.bin."""
    d = out / CACHE_DIR
    return d / f"{inp.cache_stem}.docs.parquet", d / f"{inp.cache_stem}.json", d / f"{inp.cache_stem}.rejects.jsonl"


def _tokens_path(docs_path: Path) -> Path:
    return docs_path.with_name(docs_path.name.replace(".docs.parquet", ".tokens.bin"))


def _cache_valid(out: Path, inp: InputFile, tok_hash: str) -> dict[str, Any] | None:
    pq_path, meta_path, _ = _cache_paths(out, inp)
    if not (pq_path.exists() and meta_path.exists() and _tokens_path(pq_path).exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    ok = (meta.get("version") == CACHE_VERSION and meta.get("sha256") == inp.sha256
          and meta.get("tokenizer_hash") == tok_hash and meta.get("key") == inp.key)
    return meta if ok else None


def _read_cache(path: Path) -> Iterator[DocBatch]:
    pf = pq.ParquetFile(path)
    tokens = np.memmap(_tokens_path(path), dtype=np.int32, mode="r") if _tokens_path(path).stat().st_size else None
    at = 0
    for i in range(pf.num_row_groups):
        t = pf.read_row_group(i)
        lens = t.column("len").to_numpy().astype(np.int64)
        n = int(lens.sum())
        assert tokens is not None
        spans = t.column("spans").to_pylist()
        yield DocBatch(np.array(tokens[at:at + n]), lens, t.column("prompt_len").to_numpy().astype(np.int32),
                       t.column("doc_id").to_pylist(), t.column("source").to_pylist(),
                       spans if any(sp is not None for sp in spans) else None)
        at += n


def _batch_table(b: DocBatch) -> pa.Table:
    return pa.Table.from_arrays([str_to_arrow(b.doc_ids), str_to_arrow(b.sources),
                                 np_to_arrow(b.lens, pa.int64()), np_to_arrow(b.prompt_lens, pa.int32()),
                                 pa.array(b.spans if b.spans is not None else [None] * b.n, pa.list_(pa.int32()))],
                                schema=_CACHE_SCHEMA)


class _CacheWriter:
    """Writes one input's token cache: ``<stem>.tokens.bin`` (raw int32) + ``<stem>.docs.parquet``.

    Every method runs in the background writer's thread, in order: ``open``, ``write`` per batch,
    ``close`` (renames both into place). ``abort`` (after the writer was cancelled) drops the temps.
    """

    def __init__(self, docs_path: Path):
        self.docs_path = docs_path
        self._stack: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._tokens: Any = None

    def open(self) -> None:
        self._stack = contextlib.ExitStack()
        tmp_tokens = self._stack.enter_context(atomic_path(_tokens_path(self.docs_path)))
        tmp = self._stack.enter_context(atomic_path(self.docs_path))
        self._tokens = self._stack.enter_context(open(tmp_tokens, "wb"))
        self._writer = pq.ParquetWriter(tmp, _CACHE_SCHEMA, compression="snappy")

    def write(self, b: DocBatch) -> None:
        assert self._writer is not None
        self._writer.write_table(_batch_table(b))
        self._tokens.write(b.ids.data)

    def close(self) -> None:
        assert self._writer is not None and self._stack is not None
        self._writer.close()
        self._stack.close()  # token file closed, then both fsynced and renamed into place
        self._writer = self._stack = None

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        if self._stack is not None:
            with contextlib.suppress(Exception):
                self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._writer = self._stack = None


@dataclass
class _Fresh:
    """An input being tokenized: its read counts and rejects (filled by the reader as it runs
    ahead) and what was packed from it (filled as its batches are consumed)."""

    inp: InputFile
    cache: _CacheWriter
    stats: ReadStats = field(default_factory=ReadStats)
    rejects: list[Reject] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)  # of the bytes read, as they are read
    val_docs: int = 0
    tokens: int = 0
    opened: bool = False

    def batches(self, batch_docs: int, max_line_bytes: int) -> Iterator[tuple[list[dict], list[str], list[str]]]:
        return _row_batches(self.inp, self.stats, self.rejects, batch_docs, max_line_bytes,
                            _default_source(self.inp.key), self.digest)

    def check_unchanged(self) -> None:
        """After the whole input was read: refuse it when what was read is not what was discovered."""
        read = self.digest.hexdigest()
        if read != self.inp.sha256:
            raise InputChangedError(
                f"{self.inp.path} changed while this run read it (sha256 {self.inp.sha256[:12]}… when the run "
                f"started, {read[:12]}… of the bytes read): shards built from it would not match the manifest. "
                "Nothing was published; re-run once the file is no longer being written"
            )


# ---- the pipeline ------------------------------------------------------------------------------
@dataclass
class _Run:
    out: Path
    width: int
    val_fraction: float
    packers: dict[str, Packer] = field(default_factory=dict)
    writers: dict[str, ShardWriter] = field(default_factory=dict)
    chat_docs: int = 0

    def feed(self, b: DocBatch) -> tuple[int, int]:
        """Route a batch's documents to the train / val packers; returns (val docs, tokens incl. EOS)."""
        if b.n == 0:
            return 0, 0
        if b.spans is not None:
            self.chat_docs += sum(sp is not None for sp in b.spans)
        val = np.fromiter((is_val(d, self.val_fraction) for d in b.doc_ids), dtype=bool, count=b.n)
        offs = np.zeros(b.n + 1, np.int64)
        np.cumsum(b.lens, out=offs[1:])
        for split, sel in (("train", ~val), ("val", val)):
            if not sel.any():
                continue
            idx = np.flatnonzero(sel)
            if len(idx) == b.n:
                ids = b.ids
            else:
                # copy the runs of consecutive chosen documents (few: val documents are rare), not a
                # per-token mask
                cut = np.flatnonzero(np.diff(idx) != 1) + 1
                first, last = idx[np.r_[0, cut]], idx[np.r_[cut - 1, len(idx) - 1]]
                ids = np.concatenate([b.ids[offs[a]:offs[z + 1]] for a, z in zip(first.tolist(), last.tolist())])
            self.packers[split].add(ids, b.lens[sel], b.prompt_lens[sel], [b.sources[i] for i in idx],
                                    None if b.spans is None else [b.spans[i] for i in idx])
        return int(val.sum()), int(b.lens.sum()) + b.n


def tokenize_stage(cfg: PipelineConfig, *, inputs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                   output_dir: str | os.PathLike | None = None, tokenizer_dir: str | os.PathLike | None = None,
                   recursive: bool = True, worker: tuple[int, int] | None = None, progress: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The tokenize stage as ``distill preprocess`` and the ``tokenized_parquet`` asset run it: one set of
    defaults, all from ``cfg`` (``tokenize.*``: max_seq_length, val_fraction, rows_per_shard,
    skip_existing, force, mask_prompt, batch_docs; ``data.max_reject_rate``, ``data.max_line_bytes``).

    ``inputs`` / ``output_dir`` / ``tokenizer_dir`` default to the config's ``raw_dir``,
    ``tokenized_dir`` and ``tokenizer_dir``; inputs are read recursively (``raw/<source>/part-*.jsonl``).
    ``log`` receives the warnings and a short report. Returns :func:`tokenize_to_parquet`'s summary.
    """
    t = cfg.tokenize
    out = Path(output_dir) if output_dir is not None else cfg.tokenized_dir
    summary = tokenize_to_parquet(
        inputs if inputs is not None else cfg.raw_dir, out,
        tokenizer_dir if tokenizer_dir is not None else cfg.tokenizer_dir, t.max_seq_length,
        recursive=recursive, val_fraction=t.val_fraction, rows_per_shard=t.rows_per_shard,
        skip_existing=t.skip_existing, force=t.force, mask_prompt=t.mask_prompt, batch_docs=t.batch_docs,
        max_line_bytes=cfg.data.max_line_bytes, max_reject_rate=cfg.data.max_reject_rate, progress=progress,
        worker=worker, log=log, min_rows=t.min_rows,
    )
    for line in report(summary, out):
        log(line)
    return summary


def report(summary: dict[str, Any], output_dir: str | os.PathLike) -> list[str]:
    """What a run did, in a few lines (the CLI prints them, the asset logs them)."""
    if "worker" in summary:
        i, n = summary["worker"]
        return [f"worker {i}/{n}: tokenized {len(summary['tokenized'])} input(s) into the token cache, "
                f"{len(summary['reused'])} already cached; pack with: distill preprocess (same arguments, no --worker)"]
    if summary["up_to_date"]:
        lines = [f"{output_dir} is up to date ({len(summary['reused'])} inputs unchanged); nothing re-tokenized"]
    else:
        lines = [f"tokenized {len(summary['tokenized'])} input(s), reused {len(summary['reused'])} from the cache"]
    for split in ("train", "val"):
        s = summary["totals"][split]
        lines.append(f"  {split}: {s['shards']} shards, {s['rows']:,} rows, {s['tokens']:,} tokens, "
                     f"{s['docs']:,} documents")
    if summary["rejects"]:
        lines.append(f"  {summary['rejects']} bad rows skipped; each with file, line and reason in "
                     f"{summary['rejects_file']}")
    skipped = summary.get("skipped_inputs") or []
    if skipped:
        lines.append(f"  {len(skipped)} input(s) not read:")
        lines += [f"    {s['path']}: {s['reason']}" for s in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"    ... and {len(skipped) - 20} more (all in the manifest's skipped_inputs)")
    lines.append(f"  manifest: {Path(output_dir) / MANIFEST}")
    return lines


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def tokenize_to_parquet(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    max_seq_length: int,
    *,
    recursive: bool = True,
    val_fraction: float = 0.02,
    rows_per_shard: int = 8192,
    skip_existing: bool = True,
    force: bool = False,
    mask_prompt: bool = True,
    batch_docs: int = 1024,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_reject_rate: float | None = None,
    tokenizer_hash: str | None = None,
    progress: bool = False,
    worker: tuple[int, int] | None = None,
    log: Callable[[str], None] = _warn,
    min_rows: int = 1,
) -> dict[str, Any]:
    """Tokenize + pack JSONL ``inputs`` (a directory, a file, or a list) into ``output_dir``.

    ``worker=(i, n)``: only tokenize this worker's share of the inputs (:func:`worker_inputs`) into
    the token cache, and pack nothing. n workers (processes, machines on a shared filesystem, Dagster
    runs) fill the cache without coordinating; a final call without ``worker`` then only packs.

    Writes ``gen-<id>/train-NNNNN.parquet`` / ``gen-<id>/val-NNNNN.parquet`` shards, then publishes
    them with ``manifest.json`` (module docstring), and ``rejects.jsonl`` (every skipped line of this
    run: file, line, reason). ``skip_existing`` reuses the token cache of unchanged inputs (and
    returns at once when nothing changed); ``force`` (or ``skip_existing=False``) re-tokenizes
    everything. Bad rows are reported, not fatal, unless their share exceeds ``max_reject_rate``
    (:class:`~distill_dag.data.jsonl.RejectRateError`, nothing published). Raises
    :class:`InputChangedError`, :class:`~distill_dag.io.DiskFullError` (naming the path; nothing
    published, no partial shards left) and :class:`~distill_dag.io.DirectoryLockedError` (another run
    writes ``output_dir``). ``log`` receives warnings (default: :func:`warnings.warn`).

    ``output_dir`` must be new, empty, or a dataset folder of ours (:func:`~distill_dag.io.claim_dir`;
    else :class:`~distill_dag.io.ForeignOutputError`, nothing touched). A build that would publish fewer
    than ``min_rows`` rows (train + val; at least 1) raises :class:`TooFewRowsError` and publishes nothing:
    inputs that are all empty never replace a dataset. Inputs that look like JSONL but are not read
    (dangling links, FIFOs, compressed files) are logged and listed in ``skipped_inputs``.

    Returns a summary: the manifest as a dict plus ``tokenized`` / ``reused`` input keys,
    ``up_to_date``, ``rejects``, ``rejects_file``, ``generation``, ``warnings`` and ``skipped_inputs``.
    """
    if min_rows < 1:
        raise ValueError(f"min_rows={min_rows}: a dataset of 0 rows is never published; give tokenize.min_rows >= 1")
    out = Path(output_dir)
    tok = load_tokenizer(tokenizer_dir)
    tok_hash = tokenizer_hash or hash_tokenizer_dir(tokenizer_dir, tok)
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} needs eos and pad tokens (resolve it with resolve_tokenizer)")
    found = discover_inputs(inputs, recursive, exclude=out)
    notes = [w for w in [found.warning(out)] if w]
    if found.skipped:
        shown = "; ".join(str(x) for x in found.skipped[:5])
        more = f"; ... ({len(found.skipped)} in all)" if len(found.skipped) > 5 else ""
        notes.append(f"{len(found.skipped)} input(s) not read: {shown}{more}")
    for note in notes:
        log(note)
    files = found.files
    skipped = [x.to_dict() for x in found.skipped]
    if not files:
        why = f"; not read: {'; '.join(str(x) for x in found.skipped[:5])}" if found.skipped else ""
        raise FileNotFoundError(f"no .jsonl files in {inputs} (recursive={recursive}){why}")
    reuse = skip_existing and not force
    claim_dir(out, "distill preprocess", legacy=_legacy_dataset)
    with dir_lock(out, shared=worker is not None, what="preprocess run"):
        (out / CACHE_DIR).mkdir(exist_ok=True)
        try:
            if worker is not None:
                summary = _fill_cache(out, worker_inputs(files, *worker), tok, tok_hash, worker, reuse=reuse,
                                      batch_docs=batch_docs, max_line_bytes=max_line_bytes)
            else:
                summary = _build(out, inputs, files, tok, tokenizer_dir, tok_hash, max_seq_length, reuse=reuse,
                                 val_fraction=val_fraction, rows_per_shard=rows_per_shard, mask_prompt=mask_prompt,
                                 batch_docs=batch_docs, max_line_bytes=max_line_bytes,
                                 max_reject_rate=max_reject_rate, progress=progress, min_rows=min_rows,
                                 skipped=skipped)
        except OSError as err:
            if not is_disk_full(err) or isinstance(err, DiskFullError):
                raise
            where = err.filename or getattr(err, "writing", None) or out
            raise DiskFullError(errno.ENOSPC, (
                f"no space left on the device of {out} while preprocessing, writing {where} ({err}). Nothing was "
                f"published: {out / MANIFEST} still names the previous dataset, if any, and the partial shards were "
                "removed. Free space there (or choose another --output) and re-run"), str(where)) from err
    return {**summary, "warnings": notes, "skipped_inputs": skipped}


def _live_generations(out: Path) -> set[str] | None:
    """The generation folders the current manifest names (read as plain JSON, so even a manifest this
    code cannot load keeps its shards); None when there is no readable manifest."""
    try:
        d = json.loads((out / MANIFEST).read_text())
        paths = [s["path"] for s in d["shards"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return {p.split("/")[0] for p in paths if isinstance(p, str) and "/" in p}


# the names _new_generation gives: a folder called gen-something that this code did not name is left alone
_GENERATION = re.compile(re.escape(GENERATION_PREFIX) + r"[0-9a-f]{12}(-[0-9]+)?")
_OLD_SHARD = re.compile(r"(train|val)-\d{5}\.parquet")
# what a dataset folder of ours holds (earlier versions wrote no marker: _legacy_dataset)
_DATASET_ENTRIES = re.compile(r"manifest\.json|rejects\.jsonl|\.cache|\.lock|(train|val)-\d{5}\.parquet|"
                              + _GENERATION.pattern + r"|\..+\.tmp")


def _legacy_dataset(out: Path) -> bool:
    """A dataset folder written before output folders were marked: every entry is one this module writes
    (manifest, rejects, token cache, lock, shards, generations, temp files), with a manifest or a cache."""
    names = [p.name for p in out.iterdir()]
    return (any(n in (MANIFEST, CACHE_DIR) for n in names)
            and all(_DATASET_ENTRIES.fullmatch(n) or n == MARKER for n in names))


def _remove_generations(out: Path, keep: set[str]) -> None:
    for g in out.glob(f"{GENERATION_PREFIX}*"):
        if g.is_dir() and not g.is_symlink() and _GENERATION.fullmatch(g.name) and g.name not in keep:
            shutil.rmtree(g, ignore_errors=True)


def _new_generation(out: Path, build_key: str, live: set[str]) -> Path:
    """``gen-<build key>``: the same name in every clean run of the same inputs and settings; a forced
    rebuild over a live generation of that name takes ``gen-<build key>-1`` (then back)."""
    base = f"{GENERATION_PREFIX}{build_key[:12]}"
    name = next(n for n in (base if i == 0 else f"{base}-{i}" for i in itertools.count()) if n not in live)
    return out / name


def _build(out: Path, inputs: Any, files: list[InputFile], tok: Any, tokenizer_dir: str | os.PathLike, tok_hash: str,
           max_seq_length: int, *, reuse: bool, val_fraction: float, rows_per_shard: int, mask_prompt: bool,
           batch_docs: int, max_line_bytes: int, max_reject_rate: float | None, progress: bool, min_rows: int = 1,
           skipped: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Pack ``files`` into a new generation of ``out`` and publish it (the caller holds the lock)."""
    remove_temp_files(out)
    remove_temp_files(out / CACHE_DIR)
    settings = {"schema_version": SCHEMA_VERSION, "cache_version": CACHE_VERSION, "tokenizer_hash": tok_hash,
                "max_seq_length": max_seq_length, "val_fraction": val_fraction, "mask_prompt": mask_prompt,
                "rows_per_shard": rows_per_shard, "inputs": {f.key: f.sha256 for f in files}}
    build_key = sha256_json(settings)
    live = _live_generations(out) or set()

    if reuse and (out / MANIFEST).exists():
        try:
            old = Manifest.load(out)
        except (ValueError, FileNotFoundError):
            old = None
        if old is not None and old.build_key == build_key and all(
            (out / s.path).exists() and (out / s.path).stat().st_size == s.bytes for s in old.shards
        ):
            _remove_unlisted(out, old, files)  # what a run killed after its publish left
            return {**old.to_dict(), "tokenized": [], "reused": [f.key for f in files], "up_to_date": True,
                    "rejects": old.totals.get("rejects", 0), "rejects_file": str(out / REJECTS),
                    "generation": next(iter(sorted(live)), "")}

    _remove_generations(out, keep=live)  # partial generations of killed runs
    gen = _new_generation(out, build_key, live)
    gen.mkdir()
    try:
        manifest, state = _pack(out, gen, inputs, files, tok, tokenizer_dir, tok_hash, max_seq_length, build_key,
                                reuse=reuse, val_fraction=val_fraction, rows_per_shard=rows_per_shard,
                                mask_prompt=mask_prompt, batch_docs=batch_docs, max_line_bytes=max_line_bytes,
                                max_reject_rate=max_reject_rate, progress=progress, min_rows=min_rows,
                                skipped=skipped or [])
    except BaseException:
        if gen.name not in (_live_generations(out) or set()):  # not published: drop every partial shard
            shutil.rmtree(gen, ignore_errors=True)
        raise
    _remove_unlisted(out, manifest, files)
    return {**manifest.to_dict(), **state, "up_to_date": False, "rejects_file": str(out / REJECTS),
            "generation": gen.name}


def _pack(out: Path, gen: Path, inputs: Any, files: list[InputFile], tok: Any, tokenizer_dir: str | os.PathLike,
          tok_hash: str, max_seq_length: int, build_key: str, *, reuse: bool, val_fraction: float,
          rows_per_shard: int, mask_prompt: bool, batch_docs: int, max_line_bytes: int,
          max_reject_rate: float | None, progress: bool, min_rows: int = 1,
          skipped: list[dict[str, str]] | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Write the shards into ``gen``, check the reject rate, and publish the manifest (the last step)."""
    backend = tok.backend_tokenizer
    backend.encode_special_tokens = True  # text that spells "<|endoftext|>" must not become a real EOS
    chat = ChatRenderer(tok, backend)
    run = _Run(out, max_seq_length, val_fraction)

    bar = tqdm(total=sum(f.bytes for f in files), unit="B", unit_scale=True, desc="preprocess") if progress else None
    total_stats = ReadStats()
    all_rejects: list[dict[str, Any]] = []
    inputs_meta: dict[str, dict[str, Any]] = {}
    tokenized, reused = [], []

    def finished(inp: InputFile, stats: ReadStats, val_docs: int, tokens: int) -> None:
        total_stats.add(stats)
        inputs_meta[inp.key] = {"sha256": inp.sha256, "bytes": inp.bytes, "docs": stats.rows,
                                "val_docs": val_docs, "tokens": tokens, "rejects": stats.rejects}
        if bar is not None:
            bar.update(inp.bytes)
            bar.set_postfix(rejects=total_stats.rejects)

    def work() -> Iterator[tuple[str, Any, Any]]:
        """("cached", input, meta) / ("batch", _Fresh, rows) ... ("end", _Fresh, None), in input order."""
        for inp in files:
            meta = _cache_valid(out, inp, tok_hash) if reuse else None
            if meta is not None:
                yield "cached", inp, meta
                continue
            fresh = _Fresh(inp, _CacheWriter(_cache_paths(out, inp)[0]))
            for batch in fresh.batches(batch_docs, max_line_bytes):
                yield "batch", fresh, batch
            yield "end", fresh, None

    def consume(kind: str, item: Any, payload: Any) -> None:
        if kind == "cached":
            inp, meta = item, payload
            pq_path, _, rej_path = _cache_paths(out, inp)
            val_docs = tokens = 0
            for b in _read_cache(pq_path):
                v, t = run.feed(b)
                val_docs, tokens = val_docs + v, tokens + t
            reused.append(inp.key)
            stats = ReadStats(rows=meta["docs"], rejects=meta["rejects"], bytes=inp.bytes)
            stats.reasons.update(meta.get("reasons", {}))
            if rej_path.exists():
                all_rejects.extend(json.loads(x) for x in rej_path.read_text().split("\n") if x)
            finished(inp, stats, val_docs, tokens)
            return
        fresh: _Fresh = item
        if not fresh.opened:
            fresh.opened = True
            open_caches.append(fresh.cache)
            io.submit(fresh.cache.open)
        if kind == "batch":
            b: DocBatch = payload.result()
            v, t = run.feed(b)
            fresh.val_docs, fresh.tokens = fresh.val_docs + v, fresh.tokens + t
            io.submit(fresh.cache.write, b)
            return
        # "end": the cache is renamed into place before its meta says it is valid (same thread, in order)
        all_rejects.extend(_finish_cache(io, out, fresh, tok_hash))
        tokenized.append(fresh.inp.key)
        finished(fresh.inp, fresh.stats, fresh.val_docs, fresh.tokens)

    open_caches: list[_CacheWriter] = []
    io = BackgroundWriter()
    try:
        for split in ("train", "val"):
            w = ShardWriter(gen, split, max_seq_length, rows_per_shard, background=io, manifest_dir=out)
            run.writers[split] = w
            run.packers[split] = Packer(max_seq_length, tok.eos_token_id, tok.pad_token_id, mask_prompt, w.add)
        with ThreadPoolExecutor(max_workers=_ENCODE_INFLIGHT, thread_name_prefix="encode") as pool:
            # parse ahead: up to _ENCODE_INFLIGHT batches encode while this thread packs the oldest
            pending: deque[tuple[str, Any, Any]] = deque()
            encoding = 0
            for kind, item, payload in work():
                if kind == "batch":
                    payload = pool.submit(encode_rows, backend, *payload, chat=chat)
                    encoding += 1
                pending.append((kind, item, payload))
                while encoding > _ENCODE_INFLIGHT or (pending and pending[0][0] != "batch"):
                    entry = pending.popleft()
                    encoding -= entry[0] == "batch"
                    consume(*entry)
            while pending:
                consume(*pending.popleft())
        for p in run.packers.values():
            p.finish()
        run.writers["train"].close()
        run.writers["val"].close()
        io.drain()
        shards = run.writers["train"].shards + run.writers["val"].shards
    except BaseException as err:
        writing = next((w.writing for w in run.writers.values() if w.writing is not None), None)
        if isinstance(err, OSError) and writing is not None:
            err.writing = writing  # the shard being written, for the disk-full message
        io.cancel()
        for w in run.writers.values():
            w.abort()
        for c in open_caches:
            c.abort()
        raise
    finally:
        io.close()
        if bar is not None:
            bar.close()

    write_bytes_atomic(out / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rejects).encode())
    check_reject_rate(total_stats, max_reject_rate, f"preprocess {inputs}", out / REJECTS)
    _check_floor(out, files, inputs_meta, sum(s.rows for s in shards), min_rows, total_stats)

    totals = {"rejects": total_stats.rejects, "docs": total_stats.rows, "chat_docs": run.chat_docs}
    for split in ("train", "val"):
        ss = [s for s in shards if s.split == split]
        totals[split] = {"shards": len(ss), "rows": sum(s.rows for s in ss), "tokens": sum(s.tokens for s in ss),
                         "docs": run.packers[split].docs}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, tokenizer_name=tokenizer_name(tokenizer_dir), tokenizer_hash=tok_hash,
        eos_id=int(tok.eos_token_id), pad_id=int(tok.pad_token_id),
        bos_id=None if tok.bos_token_id is None else int(tok.bos_token_id), vocab_size=len(tok),
        max_seq_length=max_seq_length, val_fraction=val_fraction, mask_prompt=mask_prompt,
        rows_per_shard=rows_per_shard, shards=shards, inputs=inputs_meta, totals=totals, build_key=build_key,
        skipped_inputs=list(skipped or []),
        chat_template=chat.mode if run.chat_docs else None,
    )
    manifest.save(out)  # the publish: one atomic rename makes the new generation the dataset
    manifest.dir = out
    return manifest, {"tokenized": tokenized, "reused": reused, "rejects": total_stats.rejects}


def _check_floor(out: Path, files: list[InputFile], inputs_meta: dict[str, dict[str, Any]], rows: int, min_rows: int,
                 stats: ReadStats) -> None:
    """Refuse to publish fewer than ``min_rows`` rows (:class:`TooFewRowsError`), naming the inputs and,
    for a rebuild, the dataset that stays published."""
    if rows >= min_rows:
        return
    shown = ", ".join(f"{f.path} ({f.bytes} bytes, {inputs_meta.get(f.key, {}).get('docs', 0)} usable rows)"
                      for f in files[:5]) + (f", ... ({len(files)} inputs)" if len(files) > 5 else "")
    try:
        prev = json.loads((out / MANIFEST).read_text())
        prev_rows = sum(int(s["rows"]) for s in prev["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        prev_rows = None
    kept = (f"The previous dataset ({prev_rows:,} rows, {out / MANIFEST}) is still the one published"
            if prev_rows else "Nothing was published")
    raise TooFewRowsError(
        f"preprocess into {out}: the inputs give {rows:,} rows ({stats.rows:,} usable documents, {stats.rejects:,} "
        f"bad lines), fewer than tokenize.min_rows={min_rows}: {shown}. {kept}. Check the inputs (empty or "
        "truncated files?), or lower tokenize.min_rows if so small a dataset is intended")


def _fill_cache(out: Path, files: list[InputFile], tok: Any, tok_hash: str, worker: tuple[int, int], *,
                reuse: bool, batch_docs: int, max_line_bytes: int) -> dict[str, Any]:
    """A worker's share: each input's tokens into its token cache (atomic files; the cache's meta is
    written last, so a killed worker leaves no cache that looks valid), nothing packed."""
    remove_temp_files(out / CACHE_DIR, {f.cache_stem for f in files})
    backend = tok.backend_tokenizer
    backend.encode_special_tokens = True
    chat = ChatRenderer(tok, backend)
    tokenized, reused = [], []
    io = BackgroundWriter()
    fresh: _Fresh | None = None
    try:
        for inp in files:
            if reuse and _cache_valid(out, inp, tok_hash) is not None:
                reused.append(inp.key)
                continue
            fresh = _Fresh(inp, _CacheWriter(_cache_paths(out, inp)[0]))
            io.submit(fresh.cache.open)
            for rows in fresh.batches(batch_docs, max_line_bytes):
                io.submit(fresh.cache.write, encode_rows(backend, *rows, chat=chat))
            _finish_cache(io, out, fresh, tok_hash)
            tokenized.append(inp.key)
        io.drain()
    except BaseException:
        io.cancel()
        if fresh is not None:
            fresh.cache.abort()
        raise
    finally:
        io.close()
    return {"worker": list(worker), "tokenized": tokenized, "reused": reused, "up_to_date": not tokenized}


def _finish_cache(io: BackgroundWriter, out: Path, fresh: _Fresh, tok_hash: str) -> list[dict[str, Any]]:
    """Queue the end of an input's cache: its files renamed into place, then its rejects, then the meta
    that marks it valid (same writer thread, in order). Returns the rejects as dicts. Refuses an input
    whose bytes read differ from the ones discovered (:class:`InputChangedError`): no cache of it."""
    fresh.check_unchanged()
    inp, stats = fresh.inp, fresh.stats
    _, meta_path, rej_path = _cache_paths(out, inp)
    rej_dicts = [r.to_dict() for r in fresh.rejects]
    io.submit(fresh.cache.close)
    io.submit(write_bytes_atomic, rej_path,
              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rej_dicts).encode())
    io.submit(write_json_atomic, meta_path, {"version": CACHE_VERSION, "key": inp.key, "sha256": inp.sha256,
                                             "tokenizer_hash": tok_hash, "docs": stats.rows,
                                             "rejects": stats.rejects, "reasons": dict(stats.reasons)})
    return rej_dicts


def _remove_unlisted(out: Path, manifest: Manifest, files: list[InputFile]) -> None:
    """After a publish: delete the generations and top-level shards the manifest does not list (the
    previous dataset, partial ones of killed runs) and the caches of inputs that are gone."""
    keep = {s.path for s in manifest.shards}
    _remove_generations(out, keep={p.split("/")[0] for p in keep if "/" in p})
    for p in list(out.glob("train-*.parquet")) + list(out.glob("val-*.parquet")):  # the pre-generation layout
        if p.name not in keep and _OLD_SHARD.fullmatch(p.name) and not p.is_symlink():
            p.unlink(missing_ok=True)
    stems = {f.cache_stem for f in files}
    cache = out / CACHE_DIR
    for p in cache.iterdir():
        stem = next((p.name[: -len(x)] for x in _CACHE_SUFFIXES if p.name.endswith(x)), None)
        if stem is not None and stem not in stems:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
