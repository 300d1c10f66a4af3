"""The network teacher: a client of ``distill serve-teacher`` (``POST /v1/topk``), and the wire format.

Wire format (request and response bodies, ``Content-Type: application/x-distill-topk``)::

    b"DTK1" | uint32 LE header length | header (UTF-8 JSON) | raw arrays, C order, little-endian

The header is ``{"arrays": [{"name", "dtype", "shape"}, ...], "meta": {...}}``; the arrays follow in
that order. Only ``<i4``, ``<i8``, ``<f2``, ``<f4`` are accepted (nothing is unpickled). A request
carries ``input_ids`` [B, T] int32 and optionally ``position_ids`` [B, T] int32 with meta ``{"k"}``;
the response carries ``indices`` [B, T, k] int32 and ``logprobs`` [B, T, k] float32: 8 bytes per
entry instead of ~20 as JSON text, and no float parsing.
"""

from __future__ import annotations

import json
import math
import struct
import time
from typing import Any

import numpy as np
import torch

from distill_dag.loss.topk import TeacherError, TeacherTopK

MAGIC = b"DTK1"
CONTENT_TYPE = "application/x-distill-topk"
_DTYPES = {"<i4", "<i8", "<f2", "<f4"}


class WireError(ValueError):
    """A body that is not a valid DTK1 message."""


def encode_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
    parts, specs = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        dt = a.dtype.newbyteorder("<").str
        if dt not in _DTYPES:
            raise WireError(f"array {name!r} has dtype {a.dtype}, not one of {sorted(_DTYPES)}")
        specs.append({"name": name, "dtype": dt, "shape": list(a.shape)})
        parts.append(a.astype(dt, copy=False).tobytes())
    header = json.dumps({"arrays": specs, "meta": meta or {}}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *parts])


def decode_arrays(body: bytes | bytearray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse a DTK1 message (``bytes`` or ``bytearray``; the arrays are views of it, not copies).

    Every malformed message raises :class:`WireError` with what is wrong, never another exception:
    a header that is not an object, ``arrays`` not a list of ``{"name", "dtype", "shape"}``, a name
    twice, a bool or negative dimension, ``meta`` not an object, truncated or trailing bytes.
    """
    if len(body) < 8 or body[:4] != MAGIC:
        raise WireError("not a DTK1 message (bad magic)")
    (hlen,) = struct.unpack("<I", body[4:8])
    if 8 + hlen > len(body):
        raise WireError("truncated header")
    try:
        header = json.loads(bytes(body[8 : 8 + hlen]))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise WireError(f"bad header: {err}") from None
    if not isinstance(header, dict):
        raise WireError(f"bad header: a JSON object is expected, not {type(header).__name__}")
    specs, meta = header.get("arrays"), header.get("meta", {})
    if not isinstance(specs, list):
        raise WireError(f"bad header: 'arrays' must be a list, not {type(specs).__name__}")
    if not isinstance(meta, dict):
        raise WireError(f"bad header: 'meta' must be an object, not {type(meta).__name__}")
    out, off = {}, 8 + hlen
    for s in specs:
        if not isinstance(s, dict):
            raise WireError(f"bad array spec {s!r}: an object with name, dtype and shape is expected")
        name, dt, shape = s.get("name"), s.get("dtype"), s.get("shape")
        if (not isinstance(name, str) or not isinstance(dt, str) or dt not in _DTYPES
                or not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape)):
            raise WireError(f"bad array spec {s!r}")
        if name in out:
            raise WireError(f"array {name!r} given twice")
        count = math.prod(shape)  # Python ints: a huge shape cannot overflow into a small one
        n = count * np.dtype(dt).itemsize
        if off + n > len(body):
            raise WireError(f"array {name!r} truncated")
        out[name] = np.frombuffer(body, dtype=dt, count=count, offset=off).reshape(shape)
        off += n
    if off != len(body):
        raise WireError(f"{len(body) - off} trailing bytes")
    return out, meta


class RetryingHTTP:
    """httpx client with a timeout per request and bounded retries with exponential backoff.

    Retried: connection errors, timeouts, 5xx, 429 and bodies that fail ``parse``. Not retried:
    401/403 (token), 413 (too large), other 4xx (a bug on our side). After ``max_retries`` retries the
    error names the URL and the last failure.
    """

    def __init__(self, url: str, *, timeout_s: float, max_retries: int, backoff_s: float, token: str | None,
                 max_backoff_s: float = 30.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)
        self.retries_done = 0  # total retries over the client's life, for telemetry

    def request(self, method: str, path: str, parse: Any, **kw: Any) -> Any:
        import httpx

        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries_done += 1
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                r = self.client.request(method, path, **kw)
            except httpx.TransportError as err:  # refused, reset, timeout, ...
                last = f"{type(err).__name__}: {err}"
                continue
            if r.status_code in (401, 403):
                raise TeacherError(
                    f"teacher server {self.url}{path} refused the request ({r.status_code} {r.text[:200]}): set the "
                    "bearer token in the environment variable named by teacher.token_env"
                )
            if r.status_code == 413:
                raise TeacherError(
                    f"teacher server {self.url}{path}: request too large (413 {r.text[:200]}); lower teacher.batch_rows "
                    "or the top-k (rows longer than the server's max_seq_len: shorter tokenize.max_seq_length), or "
                    "raise the server's limits (teacher.max_request_elems)"
                )
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                raise TeacherError(f"teacher server {self.url}{path}: HTTP {r.status_code}: {r.text[:500]}")
            try:
                return parse(r)
            except (WireError, ValueError, KeyError, TypeError, IndexError) as err:
                last = f"unreadable response: {err}"
                continue
        raise TeacherError(
            f"teacher server {self.url}{path} failed after {self.max_retries + 1} attempts "
            f"({self.max_retries} retries with backoff from {self.backoff_s}s); last error: {last}. "
            "Is the server running (`distill serve-teacher`) and teacher.url right?"
        )

    def close(self) -> None:
        self.client.close()


class ServerTeacher:
    """What every teacher behind an HTTP server shares: the connection (:class:`RetryingHTTP`: timeout,
    retries with backoff, bearer token), the top-k size ``k`` and ``batch_rows``, the rows per request.
    Subclasses take these arguments first, in this order, and add their own after them."""

    def __init__(
        self,
        url: str,
        k: int,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        batch_rows: int = 8,
        token: str | None = None,
    ) -> None:
        self.http = RetryingHTTP(url, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s, token=token)
        self.url = self.http.url
        self.k = int(k)
        self.batch_rows = max(1, int(batch_rows))

    def close(self) -> None:
        self.http.close()


class NetworkTeacher(ServerTeacher):
    """Client of ``distill serve-teacher``.

    ``topk(batch)`` sends ``input_ids`` [B, T] (+ ``position_ids``) in requests of ``batch_rows`` rows
    and returns TeacherTopK [B, T, k]; each request is retried on its own, so a server restart in the
    middle of a batch neither loses nor repeats a row. The vocabulary size comes from ``GET /health``.
    Arguments: :class:`ServerTeacher`'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.health = self.http.request("GET", "/health", lambda r: r.json())
        self.vocab_size = int(self.health["vocab_size"])
        if self.k > int(self.health["k_max"]):
            raise TeacherError(
                f"teacher server {self.url} serves k <= {self.health['k_max']} but k={self.k} was requested; restart it "
                f"with `distill serve-teacher --k {self.k}` or lower train.teacher_topk"
            )

    def _post(self, ids: np.ndarray, pos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        arrays = {"input_ids": ids.astype("<i4")}
        if pos is not None:
            arrays["position_ids"] = pos.astype("<i4")
        body = encode_arrays(arrays, {"k": self.k})

        def parse(r: Any) -> tuple[np.ndarray, np.ndarray]:
            out, _ = decode_arrays(r.content)
            idx, lp = out["indices"], out["logprobs"]
            if idx.shape != (*ids.shape, self.k) or lp.shape != idx.shape:
                raise WireError(f"response shape {idx.shape} / {lp.shape}, expected {(*ids.shape, self.k)}")
            if idx.min(initial=0) < 0 or idx.max(initial=0) >= self.vocab_size:
                raise WireError("token id outside the vocabulary")
            return idx, lp

        return self.http.request("POST", "/v1/topk", parse, content=body, headers={"Content-Type": CONTENT_TYPE})

    def topk(self, batch: dict[str, torch.Tensor]) -> TeacherTopK:
        ids = batch["input_ids"].cpu().numpy()
        pos = batch["position_ids"].cpu().numpy() if "position_ids" in batch else None
        max_t = self.health.get("max_seq_len")
        if isinstance(max_t, int) and ids.shape[-1] > max_t:  # refused by the server (413): say it before sending
            raise TeacherError(
                f"rows of {ids.shape[-1]} tokens are longer than teacher server {self.url} accepts (max_seq_len="
                f"{max_t}, the teacher's maximum positions): pack shorter rows (tokenize.max_seq_length)"
            )
        idx_parts, lp_parts = [], []
        for a in range(0, ids.shape[0], self.batch_rows):
            i, lp = self._post(ids[a : a + self.batch_rows], None if pos is None else pos[a : a + self.batch_rows])
            idx_parts.append(i)
            lp_parts.append(lp)
        return TeacherTopK(
            torch.from_numpy(np.concatenate(idx_parts).astype(np.int64)),
            torch.from_numpy(np.concatenate(lp_parts).astype(np.float32)),
        )

    def identity(self) -> dict[str, Any]:
        return {"provider": "network", "url": self.url, "teacher": self.health.get("identity")}
