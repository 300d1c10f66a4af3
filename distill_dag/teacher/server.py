"""``distill serve-teacher``: the teacher's top-k over HTTP (FastAPI + uvicorn).

* ``POST /v1/topk``, two body formats:

  - binary (the fast path, ``Content-Type: application/x-distill-topk``): a DTK1 message
    (:mod:`.network`) with ``input_ids`` [B, T] int32/int64, optional ``position_ids`` [B, T] of the
    same kind, meta ``{"k": k}`` -> ``indices`` [B, T, k] int32 and ``logprobs`` [B, T, k] float32;
  - JSON (``Content-Type: application/json``, for curl):
    ``{"input_ids": [[1, 2, 3]], "position_ids": [[0, 1, 2]], "k": 4}`` (one row may be a flat list)
    -> ``{"indices": [...], "logprobs": [...], "shape": [B, T, k]}`` of the input's rank.
    ``curl -s localhost:8765/v1/topk -H 'Content-Type: application/json' -d '{"input_ids": [1, 2, 3], "k": 3}'``

  Log-probs are the full-vocabulary log-softmax at T=1, sorted descending; position ``t`` scores
  token ``t + 1``. ``k`` defaults to ``k_max``.
* ``GET /health``: ``{"status", "vocab_size", "k_max", "max_request_elems", "max_seq_len",
  "max_buffered_bytes", "buffered_bytes", "requests_in_flight", "identity"}``.

Every malformed body is a 400 naming the field (types are checked: ids and ``k`` must be integers,
not floats, bools or NaN; shapes must be [B >= 1, T >= 1]); nothing a client sends gives a 500.

Limits (each refused before any compute):

* ``T > max_seq_len`` (default: the model's ``max_position_embeddings``) -> 413;
* ``B * T * k > max_request_elems``, or a body larger than such a request can be -> 413;
* ``max_buffered_bytes`` bounds the memory held for all requests at once: each request reserves its
  body chunk by chunk as the bytes arrive (never from ``Content-Length``, which a client may declare
  and then not send: four stalled clients declaring ~268 MB each once held a 1 GiB budget and made
  everyone else wait) and then its answer; when the budget is full the request gets 503 with
  ``Retry-After`` (the client retries 5xx with backoff), and a request whose ``Content-Length`` could
  never fit gets 413 at once. The reservation is returned once the answer is sent.
* a body must arrive within ``body_timeout_s`` plus one second per ``body_min_rate`` bytes received
  (defaults 30 s and 1 MiB/s): a client that stalls mid-body gets 408 and its bytes are returned to
  the budget, so stalled clients hold memory for a bounded time only.

Scheduling: one worker thread runs the model (it is not re-entrant on one device). Each request is
cut into units of whole rows of at most ``unit_tokens`` tokens (one row when a row is longer), and
the worker takes one unit of each waiting request in turn (round robin), so a short request waits
for at most one unit of each request ahead of it, never for a long request to finish. A request
whose client went away (a client timeout, say) is dropped at its next unit.

Security: binds 127.0.0.1 unless told otherwise, and refuses a non-loopback address without a token
unless ``allow_no_token``; when a token is set (the environment variable named by
``teacher.token_env``) every route needs ``Authorization: Bearer <token>`` (401 otherwise; the
scheme is case-insensitive, RFC 7235), checked before the body is read, compared in constant time.

Access log (logger ``distill_dag.teacher_server.access``, on stderr under ``distill serve-teacher``):
one line per request with client, method, path, status, bytes in and out, rows x T x k and latency.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request, Response  # module level: FastAPI resolves the string annotations here
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from distill_dag.device import pick_device
from distill_dag.loss.topk import TeacherError
from distill_dag.teacher.providers.direct import DirectTeacher
from distill_dag.teacher.providers.network import CONTENT_TYPE, MAGIC, WireError, decode_arrays

log = logging.getLogger("distill_dag.teacher_server")
access_log = logging.getLogger("distill_dag.teacher_server.access")

JSON_TYPE = "application/json"
DEFAULT_MAX_SEQ_LEN = 4096  # when neither the caller nor the model's config gives one
DEFAULT_MAX_BUFFERED_BYTES = 1 << 30
DEFAULT_UNIT_TOKENS = 4096
DEFAULT_MAX_JSON_BYTES = 8 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_BODY_MIN_RATE = 1 << 20  # bytes/s a body must keep up, on average, after body_timeout_s
# what a request holds besides its body: the binary answer is 8 bytes per entry (+ a header); a JSON
# body is parsed into Python lists (~36 bytes per id for ~4 bytes of text) and its answer goes
# through Python lists and text (~100 bytes per entry)
_HEADER_BYTES = 4096
_JSON_PARSE_FACTOR = 12
_JSON_BYTES_PER_ENTRY = 100
_MAX_ID = (1 << 31) - 1  # ids and positions travel as int32
_DISCONNECT_POLL_S = 0.25


class BadRequest(Exception):
    """A request refused with ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    def response(self) -> Response:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


# ---- the byte budget ------------------------------------------------------------------------------
class ByteBudget:
    """Bytes reserved by all requests at once, at most ``limit``; ``peak`` is the most ever held."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_buffered_bytes={limit} must be >= 1")
        self.limit, self.used, self.peak = int(limit), 0, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class _Hold:
    """What one request has reserved; returned all at once when its answer is sent (or it fails)."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget, self.n = budget, 0

    def take(self, n: int, what: str) -> None:
        if n > self.budget.limit - self.n:
            raise BadRequest(413, f"{what} needs {n} bytes, more than the server's whole max_buffered_bytes="
                                  f"{self.budget.limit}; send fewer rows per request")
        if not self.budget.take(n):
            raise BadRequest(503, f"server busy: {self.budget.used} of max_buffered_bytes={self.budget.limit} "
                                  f"held by requests in flight, {what} needs {n} more; retry shortly",
                             {"Retry-After": "1"})
        self.n += n

    def release(self) -> None:
        self.budget.give(self.n)
        self.n = 0


# ---- fair scheduling ------------------------------------------------------------------------------
@dataclass
class _Job:
    ids: np.ndarray  # [B, T] int32/int64 (a view of the request body)
    pos: np.ndarray | None
    k: int
    out_idx: np.ndarray  # [B, T, k] int32, written unit by unit
    out_lp: np.ndarray  # [B, T, k] float32
    rows_per_unit: int
    next_row: int = 0
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class FairScheduler:
    """One worker thread for the model; requests advance one unit (whole rows, <= ``unit_tokens``
    tokens, at least one row) at a time, round robin, so none waits for another to finish."""

    def __init__(self, teacher: Any, unit_tokens: int = DEFAULT_UNIT_TOKENS) -> None:
        if unit_tokens < 1:
            raise ValueError(f"unit_tokens={unit_tokens} must be >= 1")
        self.teacher, self.unit_tokens = teacher, int(unit_tokens)
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running: _Job | None = None
        self.units_run = 0

    def submit(self, ids: np.ndarray, pos: np.ndarray | None, k: int, out_idx: np.ndarray,
               out_lp: np.ndarray) -> concurrent.futures.Future:
        job = _Job(ids, pos, k, out_idx, out_lp, rows_per_unit=max(1, self.unit_tokens // int(ids.shape[1])))
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="teacher-worker", daemon=True)
                self._thread.start()
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                job = self._jobs.popleft()
                self._running = job
            try:
                self._unit(job)
            except BaseException as err:  # noqa: BLE001 - handed to the request, which logs it; the worker lives on
                _settle(job.future, err)
            finally:
                with self._cv:
                    self._running = None

    def _unit(self, job: _Job) -> None:
        if job.future.cancelled():  # the client went away: drop the rest of its rows
            return
        a = job.next_row
        b = min(int(job.ids.shape[0]), a + job.rows_per_unit)
        batch = {"input_ids": torch.from_numpy(job.ids[a:b].astype(np.int64))}
        if job.pos is not None:
            batch["position_ids"] = torch.from_numpy(job.pos[a:b].astype(np.int64))
        out = self.teacher.topk(batch)
        job.out_idx[a:b] = out.indices[..., : job.k].numpy()
        job.out_lp[a:b] = out.logprobs[..., : job.k].numpy()
        self.units_run += 1
        job.next_row = b
        if b >= job.ids.shape[0]:
            _settle(job.future, None)
        else:
            with self._cv:
                self._jobs.append(job)

    def in_flight(self) -> int:
        """Requests queued or running (a cancelled one counts until the worker drops it)."""
        with self._cv:
            return len(self._jobs) + (self._running is not None)


def _settle(fut: concurrent.futures.Future, err: BaseException | None) -> None:
    try:
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        pass


# ---- request parsing and validation ---------------------------------------------------------------
@dataclass
class _Work:
    ids: np.ndarray
    pos: np.ndarray | None
    k: int
    flat: bool = False  # JSON: one row given as a flat list, answered without the batch axis


@dataclass
class Limits:
    k_max: int
    vocab_size: int
    max_request_elems: int
    max_seq_len: int


def _int_field(v: Any, name: str) -> int:
    if type(v) is not int:  # bool is an int subclass; 8.0 and "8" are not integers on this wire
        raise BadRequest(400, f"{name} must be an integer, got {type(v).__name__} {v!r:.40}")
    return v


def _check(work: _Work, lim: Limits) -> _Work:
    ids, pos, k = work.ids, work.pos, work.k
    for name, a in (("input_ids", ids), ("position_ids", pos)):
        if a is None:
            continue
        if a.dtype.kind not in "iu":
            raise BadRequest(400, f"{name} must be int32 or int64, got {a.dtype} (ids are integers: no floats, "
                                  "no NaN)")
        if a.ndim != 2:
            raise BadRequest(400, f"{name} must be [B, T], got shape {list(a.shape)}")
    B, T = (int(x) for x in ids.shape)
    if B < 1 or T < 1:
        raise BadRequest(400, f"input_ids is empty (shape {[B, T]}): send at least one row of one token")
    if pos is not None and pos.shape != ids.shape:
        raise BadRequest(400, f"position_ids shape {list(pos.shape)} != input_ids shape {[B, T]}")
    k = _int_field(k, "k")
    if not 1 <= k <= lim.k_max:
        raise BadRequest(400, f"k={k} outside [1, {lim.k_max}] (the server's k_max; restart it with --k)")
    if T > lim.max_seq_len:
        raise BadRequest(413, f"sequence length T={T} exceeds the server's max_seq_len={lim.max_seq_len} (the "
                              "teacher's maximum positions); send shorter rows")
    elems = B * T * k
    if elems > lim.max_request_elems:
        raise BadRequest(413, f"batch x length x k = {B} x {T} x {k} = {elems} exceeds max_request_elems="
                              f"{lim.max_request_elems}; send fewer rows per request")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= lim.vocab_size:
        raise BadRequest(400, f"input_ids: token id {lo if lo < 0 else hi} outside [0, {lim.vocab_size})")
    if pos is not None and (int(pos.min()) < 0 or int(pos.max()) > _MAX_ID):
        raise BadRequest(400, f"position_ids must be in [0, {_MAX_ID}]")
    return _Work(ids, pos, k, work.flat)


def parse_binary(body: bytearray, lim: Limits) -> _Work:
    try:
        arrays, meta = decode_arrays(body)
    except WireError as err:
        hint = "; JSON bodies need Content-Type: application/json" if bytes(body[:1]) in (b"{", b"[") else ""
        raise BadRequest(400, f"bad request body: {err}{hint}") from None
    unknown = sorted(set(arrays) - {"input_ids", "position_ids"})
    if unknown:
        raise BadRequest(400, f"unknown arrays {unknown}: a request carries input_ids and optionally position_ids")
    if "input_ids" not in arrays:
        raise BadRequest(400, "the body has no input_ids array")
    return _check(_Work(arrays["input_ids"], arrays.get("position_ids"), meta.get("k", lim.k_max)), lim)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


_ALL_INT = object()


def _json_ids(v: Any, name: str) -> tuple[np.ndarray, bool]:
    """A list of ints (one row) or a list of equal-length lists of ints -> ([B, T] int64, flat)."""
    example = f'{{"{name}": [[1, 2, 3]]}}'
    if not isinstance(v, list):
        raise BadRequest(400, f"{name} must be a list of token ids or of rows of them, like {example}; got "
                              f"{type(v).__name__}")
    flat = not v or not isinstance(v[0], list)
    rows = [v] if flat else v
    for r, row in enumerate(rows):
        if not isinstance(row, list):
            raise BadRequest(400, f"{name}[{r}] must be a list of integers, got {type(row).__name__}")
        bad = next((x for x in row if type(x) is not int), _ALL_INT)
        if bad is not _ALL_INT:
            raise BadRequest(400, f"{name}{'' if flat else f'[{r}]'} must hold integers only, got "
                                  f"{type(bad).__name__} {bad!r:.40}")
        if len(row) != len(rows[0]):
            raise BadRequest(400, f"{name}: rows of different lengths ({len(rows[0])} and {len(row)}); pad them")
    try:
        a = np.array(rows, dtype=np.int64).reshape(len(rows), len(rows[0]) if rows else 0)
    except OverflowError:
        raise BadRequest(400, f"{name}: an integer outside int64") from None
    if a.size and (int(a.min()) < -_MAX_ID - 1 or int(a.max()) > _MAX_ID):
        raise BadRequest(400, f"{name}: an integer outside int32")
    return a, flat


def parse_json(body: bytearray, lim: Limits) -> _Work:
    try:
        obj = json.loads(bytes(body), parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise BadRequest(400, f"body is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise BadRequest(400, 'the JSON body must be an object like {"input_ids": [[1, 2, 3]], "k": 8}, got '
                              f"{type(obj).__name__}")
    unknown = sorted(set(obj) - {"input_ids", "position_ids", "k"})
    if unknown:
        raise BadRequest(400, f"unknown fields {unknown}: the JSON body takes input_ids, position_ids and k")
    if "input_ids" not in obj:
        raise BadRequest(400, 'the JSON body has no input_ids, e.g. {"input_ids": [[1, 2, 3]], "k": 8}')
    ids, flat = _json_ids(obj["input_ids"], "input_ids")
    pos = None
    if obj.get("position_ids") is not None:
        pos, pflat = _json_ids(obj["position_ids"], "position_ids")
        if pflat != flat:
            raise BadRequest(400, "position_ids must be nested like input_ids (both flat or both lists of rows)")
    return _check(_Work(ids, pos, obj.get("k", lim.k_max), flat), lim)


def _binary_answer(B: int, T: int, k: int) -> tuple[bytearray, np.ndarray, np.ndarray]:
    """The DTK1 answer, allocated once: the worker writes the top-k straight into its arrays."""
    shape = [B, T, k]
    header = json.dumps({"arrays": [{"name": "indices", "dtype": "<i4", "shape": shape},
                                    {"name": "logprobs", "dtype": "<f4", "shape": shape}], "meta": {}}).encode()
    n = B * T * k
    off = 8 + len(header)
    buf = bytearray(off + 8 * n)
    buf[:off] = MAGIC + len(header).to_bytes(4, "little") + header
    idx = np.frombuffer(buf, dtype="<i4", count=n, offset=off).reshape(shape)
    lp = np.frombuffer(buf, dtype="<f4", count=n, offset=off + 4 * n).reshape(shape)
    return buf, idx, lp


def _json_answer(idx: np.ndarray, lp: np.ndarray, flat: bool) -> bytes:
    if flat:
        idx, lp = idx[0], lp[0]
    lp = np.maximum(lp, np.finfo(np.float32).min)  # -inf is not JSON: the most negative float32 instead
    return json.dumps({"indices": idx.tolist(), "logprobs": lp.tolist(), "shape": list(idx.shape)},
                      allow_nan=False).encode()


# ---- the app --------------------------------------------------------------------------------------
def model_max_positions(teacher: Any) -> int | None:
    """The teacher model's maximum positions (``max_position_embeddings`` and kin), if it says."""
    cfg = getattr(getattr(teacher, "model", None), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, name, None)
        if type(v) is int and v > 0:
            return v
    return None


def _bearer_ok(header: str, token: str) -> bool:
    scheme, _, cred = header.strip().partition(" ")
    if scheme.lower() != "bearer":  # auth-scheme is case-insensitive (RFC 7235 section 2.1)
        return False
    return hmac.compare_digest(cred.strip().encode(), token.encode())


class _AccessLog:
    """Pure ASGI middleware: gives each request its budget hold (returned once the answer is sent or
    the request fails) and writes one access-log line with sizes and latency."""

    def __init__(self, app: Any, budget: ByteBudget, enabled: bool) -> None:
        self.app, self.budget, self.enabled = app, budget, enabled

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        info = {"in": 0, "out": 0, "status": None}
        hold = _Hold(self.budget)
        scope["distill"] = {"hold": hold, "note": ""}

        async def recv() -> dict:
            msg = await receive()
            if msg["type"] == "http.request":
                info["in"] += len(msg.get("body", b""))
            return msg

        async def snd(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                info["status"] = msg["status"]
            elif msg["type"] == "http.response.body":
                info["out"] += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, recv, snd)
        finally:
            hold.release()
            if self.enabled:
                client = scope.get("client") or ("-", 0)
                access_log.info('%s:%s "%s %s" %s in=%dB out=%dB%s %.1fms', client[0], client[1], scope["method"],
                                scope["path"], info["status"] or 500, info["in"], info["out"],
                                scope["distill"]["note"], 1000 * (time.perf_counter() - t0))


def create_app(teacher: Any, *, k_max: int, token: str | None = None, max_request_elems: int = 1 << 25,
               max_seq_len: int | None = None, max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
               unit_tokens: int = DEFAULT_UNIT_TOKENS, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, body_min_rate: float = DEFAULT_BODY_MIN_RATE,
               access_log_enabled: bool = True) -> FastAPI:
    """The FastAPI app around a provider (normally a :class:`DirectTeacher` with ``k >= k_max``).

    ``max_seq_len`` None: the model's maximum positions (:func:`model_max_positions`), else
    ``DEFAULT_MAX_SEQ_LEN``. A body must arrive within ``body_timeout_s`` + (bytes received) /
    ``body_min_rate`` seconds (408 otherwise). The app's ``state.budget`` / ``state.scheduler`` / ``state.limits``
    expose the byte budget (its ``peak``), the scheduler and the limits.
    """
    lim = Limits(k_max=int(k_max), vocab_size=int(teacher.vocab_size), max_request_elems=int(max_request_elems),
                 max_seq_len=int(max_seq_len or model_max_positions(teacher) or DEFAULT_MAX_SEQ_LEN))
    budget = ByteBudget(max_buffered_bytes)
    scheduler = FairScheduler(teacher, unit_tokens)
    if not body_timeout_s > 0 or not body_min_rate > 0:
        raise ValueError(f"body_timeout_s={body_timeout_s} and body_min_rate={body_min_rate} must be > 0 "
                         "(teacher.serve_body_timeout_s / teacher.serve_body_min_rate)")
    app = FastAPI(title="distill-dag teacher", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.budget, app.state.scheduler, app.state.limits = budget, scheduler, lim
    # the largest honest body: int32 ids + int32 positions for max_request_elems tokens (k >= 1), plus a
    # header; never more than the whole budget
    max_body = min(8 * lim.max_request_elems + 65536, budget.limit)
    max_json = min(int(max_json_bytes), max_body)

    def unauthorized(request: Request) -> Response | None:
        if token is None or _bearer_ok(request.headers.get("authorization", ""), token):
            return None
        return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health(request: Request) -> Response:
        if (r := unauthorized(request)) is not None:
            return r
        return JSONResponse({
            "status": "ok",
            "vocab_size": lim.vocab_size,
            "k_max": lim.k_max,
            "max_request_elems": lim.max_request_elems,
            "max_seq_len": lim.max_seq_len,
            "max_buffered_bytes": budget.limit,
            "buffered_bytes": budget.used,
            "requests_in_flight": scheduler.in_flight(),
            "identity": teacher.identity(),
        })

    async def read_body(request: Request, cap: int, hold: _Hold, parse_factor: int) -> bytearray:
        """The body, counted against ``cap`` and reserved in the budget (x ``parse_factor``) chunk by
        chunk as it arrives, under the body deadline. ``Content-Length`` is only checked against ``cap``
        (413 at once) and against the bytes that came: memory follows what was received, never what was
        declared."""
        declared = request.headers.get("content-length")
        n = None
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest(400, f"bad Content-Length {declared!r:.40}")
            n = int(declared)
            if n > cap:
                raise BadRequest(413, f"body of {n} bytes exceeds {cap}")
            if n * parse_factor > budget.limit:
                raise BadRequest(413, f"a body of {n} bytes needs {n * parse_factor} bytes, more than the server's "
                                      f"whole max_buffered_bytes={budget.limit}; send fewer rows per request")
        limit = cap if n is None else n
        body = bytearray()
        start = time.monotonic()
        chunks = request.stream().__aiter__()
        while True:
            # the deadline moves with the bytes received: a body that keeps up body_min_rate is never cut
            left = start + body_timeout_s + len(body) / body_min_rate - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                chunk = await asyncio.wait_for(chunks.__anext__(), left)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise BadRequest(408, f"the body did not arrive in time: {len(body)} of "
                                      f"{'?' if n is None else n} bytes after {time.monotonic() - start:.1f} s (the "
                                      f"server waits {body_timeout_s:g} s plus 1 s per {body_min_rate:g} bytes "
                                      "received)", {"Connection": "close"}) from None
            if len(body) + len(chunk) > limit:
                raise (BadRequest(413, f"body exceeds {cap} bytes") if n is None else
                       BadRequest(400, f"body longer than its Content-Length {n}"))
            hold.take(len(chunk) * parse_factor, "the body" if n is None else f"a body of {n} bytes")
            body += chunk
        if n is not None and len(body) != n:
            raise BadRequest(400, f"body of {len(body)} bytes, Content-Length said {n}")
        return body

    @app.post("/v1/topk")
    async def topk(request: Request) -> Response:
        if (r := unauthorized(request)) is not None:
            return r
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        is_json = ctype == JSON_TYPE or ctype.endswith("+json")
        state = request.scope["distill"]
        hold: _Hold = state["hold"]
        try:
            body = await read_body(request, max_json if is_json else max_body, hold,
                                   _JSON_PARSE_FACTOR if is_json else 1)
            work = await run_in_threadpool(parse_json if is_json else parse_binary, body, lim)
            B, T = (int(x) for x in work.ids.shape)
            state["note"] = f" {'json' if is_json else 'bin'} {B}x{T}x{work.k}"
            n = B * T * work.k
            if is_json:
                hold.take(n * _JSON_BYTES_PER_ENTRY, f"a JSON answer of {n} entries")
                idx = np.empty((B, T, work.k), dtype="<i4")
                lp = np.empty((B, T, work.k), dtype="<f4")
            else:
                hold.take(_HEADER_BYTES + 8 * n, f"an answer of {n} entries")
                buf, idx, lp = _binary_answer(B, T, work.k)
        except BadRequest as err:
            return err.response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it; logged as 400
        fut = asyncio.wrap_future(scheduler.submit(work.ids, work.pos, work.k, idx, lp))
        try:
            while not (await asyncio.wait({fut}, timeout=_DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():  # e.g. a client timeout: stop computing for nobody
                    fut.cancel()
                    state["note"] += " abandoned"
                    return Response(status_code=499)
            fut.result()
        except Exception as err:  # noqa: BLE001 - a teacher failure on a validated request: a server bug
            log.exception("teacher failed on a %dx%dx%d request", B, T, work.k)
            return JSONResponse({"error": f"teacher failed: {type(err).__name__}: {err}"[:500]}, status_code=500)
        if is_json:
            return Response(content=await run_in_threadpool(_json_answer, idx, lp, work.flat), media_type=JSON_TYPE)
        return Response(content=memoryview(buf), media_type=CONTENT_TYPE)

    app.add_middleware(_AccessLog, budget=budget, enabled=access_log_enabled)
    return app


# ---- serve-teacher --------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for 0.0.0.0, ::, other addresses and host names."""
    h = host.strip().strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, allow_no_token: bool, token_env: str) -> None:
    """Refuse to listen beyond loopback without a bearer token, unless explicitly forced."""
    if token is None and not allow_no_token and not is_loopback(host):
        raise TeacherError(
            f"refusing to serve the teacher on {host} without a bearer token: anyone who can reach it could use "
            f"it. Set ${token_env} to a secret (clients send it as `Authorization: Bearer ...`), bind 127.0.0.1, "
            "or force it with allow_no_token (teacher.serve_allow_no_token: true)"
        )


def _setting(t: Any, name: str, default: Any) -> Any:
    v = getattr(t, name, None)
    return default if v is None else v


def serve_teacher(cfg: Any, *, model_path: str | None = None, host: str | None = None, port: int | None = None,
                  k: int | None = None, device: str | None = None, allow_no_token: bool | None = None,
                  max_seq_len: int | None = None, max_buffered_bytes: int | None = None) -> None:
    """Load the teacher of ``cfg`` (``PipelineConfig``) and serve it until interrupted.

    Settings read from ``cfg.teacher`` when present (arguments win): ``serve_allow_no_token``,
    ``serve_max_seq_len``, ``serve_max_buffered_bytes``, ``serve_unit_tokens``, ``serve_body_timeout_s``,
    ``serve_body_min_rate``.
    """
    import os

    import uvicorn


    t = cfg.teacher
    token = os.environ.get(t.token_env) or None
    host = host or t.serve_host
    allow = bool(allow_no_token if allow_no_token is not None else _setting(t, "serve_allow_no_token", False))
    check_bind(host, token, allow, t.token_env)  # before the model loads: refused at once
    k = int(k or max(cfg.train.teacher_topk, cfg.logit_cache.k))
    teacher = DirectTeacher.from_config(t, k, pick_device(device or cfg.train.device), model_path=model_path)
    port = int(port or t.serve_port)
    app = create_app(teacher, k_max=k, token=token, max_request_elems=t.max_request_elems,
                     max_seq_len=max_seq_len or _setting(t, "serve_max_seq_len", None),
                     max_buffered_bytes=int(max_buffered_bytes or _setting(t, "serve_max_buffered_bytes",
                                                                           DEFAULT_MAX_BUFFERED_BYTES)),
                     unit_tokens=int(_setting(t, "serve_unit_tokens", DEFAULT_UNIT_TOKENS)),
                     body_timeout_s=float(_setting(t, "serve_body_timeout_s", DEFAULT_BODY_TIMEOUT_S)),
                     body_min_rate=float(_setting(t, "serve_body_min_rate", DEFAULT_BODY_MIN_RATE)))
    if not access_log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access_log.addHandler(h)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
    lim = app.state.limits
    print(
        f"serving teacher {teacher.identity()['model']} (vocab {teacher.vocab_size}, k <= {k}, T <= {lim.max_seq_len},"
        f" {app.state.budget.limit >> 20} MiB buffered at most) on http://{host}:{port}"
        f" ({'bearer token required' if token else 'no token: set $' + t.token_env + ' to require one'})",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
