"""Documents: a JSONL input read in batches of rows, and a batch of rows encoded into tokens.

- each text document becomes its ``ids`` (the packer appends the EOS); a prompt/response row is
  ``encode(prompt) + encode(response)`` (special tokens such as BOS only at the document start); a chat row
  (``messages`` / ``conversations``, and prompt/response when the tokenizer has a chat template of its own)
  is rendered by :class:`~distill_dag.data.chat.ChatRenderer` with that template (the plain one as the
  fallback), with the trained token ranges of its assistant turns;
- a document's id is the row's ``id`` field, else ``<input key>:<line>``; its source the row's ``source``,
  else the input's first folder (or file stem);
- ``encode_batch_fast`` releases the GIL and spreads each batch over every core; its texts are handed over
  longest first (:func:`encode_longest_first`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from distill_dag.data.chat import ChatRenderer, chat_text, is_chat_row, messages_of
from distill_dag.data.jsonl import ReadStats, Reject, iter_jsonl
from distill_dag.data.paths import InputFile

_BATCH_BYTES = 4 << 20  # text per encode call: long enough that a call is not mostly its tail


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


def row_batches(inp: InputFile, stats: ReadStats, rejects: list[Reject], batch_docs: int,
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


def default_source(key: str) -> str:
    parts = key.split("/")
    return parts[0] if len(parts) > 1 else Path(key).stem

