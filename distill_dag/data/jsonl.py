"""Robust JSONL reading: every bad line is skipped, counted and logged, never fatal by itself.

A row is usable when it is a JSON object with a non-empty string ``text``, or with string
``prompt`` and non-empty string ``response``, or a chat row: ``messages`` (role/content) or
``conversations`` (ShareGPT from/value) with an assistant turn (:mod:`distill_dag.data.chat`). Anything else (malformed JSON, bytes that are not
UTF-8, a missing or non-string field, a line longer than ``max_line_bytes``) becomes a *reject*:
``{"file", "line", "reason", "excerpt"}``. Callers decide when the rejects are too many with
:func:`check_reject_rate`, which raises :class:`RejectRateError` only above the configured rate.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from distill_dag.data.chat import chat_row_problem
from distill_dag.io import write_bytes_atomic

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the stdlib path gives the same rows
    orjson = None

DEFAULT_MAX_LINE_BYTES = 16 * 2**20
_EXCERPT = 120


class RejectRateError(RuntimeError):
    """More rows were rejected than ``data.max_reject_rate`` allows; the message names the files."""


@dataclass
class Reject:
    file: str
    line: int
    reason: str
    excerpt: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason, "excerpt": self.excerpt}


@dataclass
class ReadStats:
    """Counts of one read: ``rows`` usable rows, ``rejects`` skipped lines, ``bytes`` read."""

    rows: int = 0
    rejects: int = 0
    bytes: int = 0
    reasons: Counter = field(default_factory=Counter)

    def add(self, other: "ReadStats") -> None:
        self.rows += other.rows
        self.rejects += other.rejects
        self.bytes += other.bytes
        self.reasons.update(other.reasons)

    @property
    def reject_rate(self) -> float:
        total = self.rows + self.rejects
        return self.rejects / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "rejects": self.rejects, "bytes": self.bytes, "reasons": dict(self.reasons)}


def row_problem(obj: Any) -> str | None:
    """Why ``obj`` is not a usable row, or None when it is."""
    if not isinstance(obj, dict):
        return f"row is a JSON {type(obj).__name__}, expected an object"
    if "text" in obj:
        t = obj["text"]
        if not isinstance(t, str):
            return f"field 'text' is {type(t).__name__}, expected a string"
        if not t.strip():
            return "field 'text' is empty"
        return None
    if "messages" in obj or "conversations" in obj:
        return chat_row_problem(obj)
    if "prompt" in obj or "response" in obj:
        for k in ("prompt", "response"):
            if k not in obj:
                return f"field '{k}' is missing (a prompt/response row needs both)"
            if not isinstance(obj[k], str):
                return f"field '{k}' is {type(obj[k]).__name__}, expected a string"
        if not obj["response"].strip():
            return "field 'response' is empty"
        return None
    return "no 'text' field, no 'prompt'/'response' fields and no 'messages'/'conversations' list"


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(obj: Any) -> bool:
    """True when a string (key or value) anywhere in ``obj`` holds an unpaired UTF-16 surrogate."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):  # unencodable, or too deep to check: not a usable row
        return True
    return False


_PLAIN = (str, int, bool, type(None))


def _fast_row(raw: bytes) -> dict[str, Any] | None:
    """``raw`` parsed by orjson (~2x faster, no separate UTF-8 decode) when the result is certainly what
    ``json.loads`` gives: an object whose values are strings, ints, bools or nulls. Else None: the
    caller takes the stdlib path, which also words every reject's reason. orjson refuses invalid
    UTF-8, lone surrogates, NaN/Infinity and deep nesting; it turns ints beyond 64 bits into floats
    (so floats go the stdlib way too)."""
    if orjson is None:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    for v in obj.values():
        if not isinstance(v, _PLAIN):
            return None
    return obj


def _excerpt(raw: bytes) -> str:
    return raw[:_EXCERPT].decode("utf-8", errors="replace")


def iter_jsonl(
    path: str | os.PathLike,
    stats: ReadStats | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    validate: bool = True,
    digest: Any = None,
) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """Yield ``(line_number, row)`` for good rows and ``(line_number, Reject)`` for bad ones.

    Line numbers start at 1. Blank lines are neither rows nor rejects. A line longer than
    ``max_line_bytes`` is skipped in bounded chunks, so a 50 MB line never sits in memory whole.
    ``digest`` (a ``hashlib`` object) is updated with every byte read, in the same pass: once the
    iterator is exhausted it is the hash of exactly the content the rows came from.
    """
    stats = stats if stats is not None else ReadStats()
    name = str(path)
    with open(path, "rb") as f:
        line_no = 0

        def readline(limit: int) -> bytes:
            # read() errors (EIO from a failing disk) carry no file name: say which input and where
            try:
                return f.readline(limit)
            except OSError as err:
                raise OSError(err.errno, f"{name}: cannot read the input after line {line_no} "
                                         f"({err.strerror or err}); copy it to a healthy disk or leave it out",
                              name) from err

        while True:
            raw = readline(max_line_bytes + 1)
            if not raw:
                break
            if digest is not None:
                digest.update(raw)
            line_no += 1
            stats.bytes += len(raw)
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                head = raw
                size = len(raw)
                while True:  # drain the rest of the long line without keeping it
                    chunk = readline(1 << 20)
                    if digest is not None:
                        digest.update(chunk)
                    size += len(chunk)
                    stats.bytes += len(chunk)
                    if not chunk or chunk.endswith(b"\n"):
                        break
                r = Reject(name, line_no, f"line is {size} bytes, over max_line_bytes={max_line_bytes}", _excerpt(head))
                stats.rejects += 1
                stats.reasons["line too long"] += 1
                yield line_no, r
                continue
            if not raw.strip():
                continue
            obj = _fast_row(raw)
            if obj is not None:
                problem = row_problem(obj) if validate else None
                if problem is None:
                    stats.rows += 1
                    yield line_no, obj
                    continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                stats.rejects += 1
                stats.reasons["not UTF-8"] += 1
                yield line_no, Reject(name, line_no, f"not UTF-8 (byte {err.start}: {err.reason})", _excerpt(raw))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                stats.rejects += 1
                stats.reasons["malformed JSON"] += 1
                yield line_no, Reject(name, line_no, f"malformed JSON: {err.msg} at column {err.colno}", _excerpt(raw))
                continue
            except RecursionError:  # e.g. 100k nested '[': valid-looking, but no row is nested that deep
                stats.rejects += 1
                stats.reasons["malformed JSON"] += 1
                yield line_no, Reject(name, line_no, "malformed JSON: nested too deeply", _excerpt(raw))
                continue
            if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
                # "\ud800" is valid JSON but not text: the tokenizer, parquet and hashing all refuse it
                stats.rejects += 1
                stats.reasons["lone surrogate"] += 1
                yield line_no, Reject(name, line_no, "lone surrogate: a \\uD800-\\uDFFF escape that is not part of a "
                                      "pair is not valid Unicode", _excerpt(raw))
                continue
            if validate:
                problem = row_problem(obj)
                if problem is not None:
                    stats.rejects += 1
                    stats.reasons[problem.split(",")[0]] += 1
                    yield line_no, Reject(name, line_no, problem, _excerpt(raw))
                    continue
            stats.rows += 1
            yield line_no, obj


def check_reject_rate(stats: ReadStats, max_rate: float | None, what: str, rejects_file: str | os.PathLike | None = None) -> None:
    """Raise :class:`RejectRateError` when ``stats.reject_rate`` exceeds ``max_rate`` (None: never)."""
    if max_rate is None or stats.rejects == 0 or stats.reject_rate <= max_rate:
        return
    where = f"; each is listed with file and line in {rejects_file}" if rejects_file else ""
    reasons = ", ".join(f"{k}: {v}" for k, v in stats.reasons.most_common(5))
    raise RejectRateError(
        f"{what}: {stats.rejects} of {stats.rows + stats.rejects} rows rejected "
        f"({stats.reject_rate:.1%} > data.max_reject_rate={max_rate:.1%}); reasons: {reasons}{where}. "
        "Fix the input files, or raise data.max_reject_rate if these rows may be dropped."
    )


def write_rejects(path: str | os.PathLike, rejects: list[Reject]) -> None:
    """Write rejects as JSONL atomically (an empty list writes an empty file)."""
    data = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rejects)
    write_bytes_atomic(Path(path), data.encode())
