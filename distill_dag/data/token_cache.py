"""The per-input token cache: each input's tokens under ``<output>/.cache/``, keyed by the input's sha256
and the tokenizer hash.

``skip_existing`` re-tokenizes only inputs whose content changed, then repacks from the caches (cheap).
Inputs are keyed by their path relative to the input root, so same-named files in different folders never
collide. An input is hashed at discovery (for the cache and the build key) and again, in the same pass, as
it is read (:class:`FreshInput`): content that changed in between is refused (:class:`InputChangedError`),
so the manifest's sha256 is always that of the bytes the shards were built from.

One input's cache: ``<stem>.tokens.bin`` (raw int32), ``<stem>.docs.parquet`` (per document: id, source,
length, prompt length, trained spans), ``<stem>.rejects.jsonl`` and ``<stem>.json`` (the meta, written
last: a cache without it is not valid).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_dag.data.encode import DocBatch, default_source, row_batches
from distill_dag.data.jsonl import ReadStats, Reject
from distill_dag.data.paths import InputFile
from distill_dag.data.shards import BackgroundWriter, np_to_arrow, str_to_arrow
from distill_dag.io import atomic_path, write_bytes_atomic, write_json_atomic

CACHE_VERSION = 2  # 2: chat rows, with their trained spans
CACHE_DIR = ".cache"
# per-document metadata of the token cache; the tokens themselves are raw int32 in <stem>.tokens.bin
_CACHE_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("len", pa.int64()),
                           ("prompt_len", pa.int32()), ("spans", pa.list_(pa.int32()))])

CACHE_SUFFIXES = (".rejects.jsonl", ".tokens.bin", ".docs.parquet", ".json")


class InputChangedError(RuntimeError):
    """An input's content changed between its discovery and its read: nothing was published."""


def cache_paths(out: Path, inp: InputFile) -> tuple[Path, Path, Path]:
    """(docs parquet, meta json, rejects jsonl); the tokens are ``docs parquet`` with .tokens.bin."""
    d = out / CACHE_DIR
    return d / f"{inp.cache_stem}.docs.parquet", d / f"{inp.cache_stem}.json", d / f"{inp.cache_stem}.rejects.jsonl"


def tokens_path(docs_path: Path) -> Path:
    return docs_path.with_name(docs_path.name.replace(".docs.parquet", ".tokens.bin"))


def cache_valid(out: Path, inp: InputFile, tok_hash: str) -> dict[str, Any] | None:
    pq_path, meta_path, _ = cache_paths(out, inp)
    if not (pq_path.exists() and meta_path.exists() and tokens_path(pq_path).exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    ok = (meta.get("version") == CACHE_VERSION and meta.get("sha256") == inp.sha256
          and meta.get("tokenizer_hash") == tok_hash and meta.get("key") == inp.key)
    return meta if ok else None


def read_cache(path: Path) -> Iterator[DocBatch]:
    pf = pq.ParquetFile(path)
    tokens = np.memmap(tokens_path(path), dtype=np.int32, mode="r") if tokens_path(path).stat().st_size else None
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


class CacheWriter:
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
        tmp_tokens = self._stack.enter_context(atomic_path(tokens_path(self.docs_path)))
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
class FreshInput:
    """An input being tokenized: its read counts and rejects (filled by the reader as it runs
    ahead) and what was packed from it (filled as its batches are consumed)."""

    inp: InputFile
    cache: CacheWriter
    stats: ReadStats = field(default_factory=ReadStats)
    rejects: list[Reject] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)  # of the bytes read, as they are read
    val_docs: int = 0
    tokens: int = 0
    opened: bool = False

    def batches(self, batch_docs: int, max_line_bytes: int) -> Iterator[tuple[list[dict], list[str], list[str]]]:
        return row_batches(self.inp, self.stats, self.rejects, batch_docs, max_line_bytes,
                            default_source(self.inp.key), self.digest)

    def check_unchanged(self) -> None:
        """After the whole input was read: refuse it when what was read is not what was discovered."""
        read = self.digest.hexdigest()
        if read != self.inp.sha256:
            raise InputChangedError(
                f"{self.inp.path} changed while this run read it (sha256 {self.inp.sha256[:12]}… when the run "
                f"started, {read[:12]}… of the bytes read): shards built from it would not match the manifest. "
                "Nothing was published; re-run once the file is no longer being written"
            )



def finish_cache(io: BackgroundWriter, out: Path, fresh: FreshInput, tok_hash: str) -> list[dict[str, Any]]:
    """Queue the end of an input's cache: its files renamed into place, then its rejects, then the meta
    that marks it valid (same writer thread, in order). Returns the rejects as dicts. Refuses an input
    whose bytes read differ from the ones discovered (:class:`InputChangedError`): no cache of it."""
    fresh.check_unchanged()
    inp, stats = fresh.inp, fresh.stats
    _, meta_path, rej_path = cache_paths(out, inp)
    rej_dicts = [r.to_dict() for r in fresh.rejects]
    io.submit(fresh.cache.close)
    io.submit(write_bytes_atomic, rej_path,
              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rej_dicts).encode())
    io.submit(write_json_atomic, meta_path, {"version": CACHE_VERSION, "key": inp.key, "sha256": inp.sha256,
                                             "tokenizer_hash": tok_hash, "docs": stats.rows,
                                             "rejects": stats.rejects, "reasons": dict(stats.reasons)})
    return rej_dicts

