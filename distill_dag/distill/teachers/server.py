"""``distill serve-teacher``: the teacher's top-k over HTTP (FastAPI + uvicorn).

* ``POST /v1/topk``: body in the DTK1 binary format (:mod:`.network`): ``input_ids`` [B, T] int32,
  optional ``position_ids`` [B, T] int32, meta ``{"k": k}`` -> ``indices`` [B, T, k] int32 and
  ``logprobs`` [B, T, k] float32 (T=1, full-vocabulary log-softmax, sorted descending).
* ``GET /health``: ``{"status", "vocab_size", "k_max", "max_request_elems", "identity"}``.

Security: binds 127.0.0.1 unless told otherwise; when a token is set (the environment variable named
by ``teacher.token_env``) every route needs ``Authorization: Bearer <token>`` (401 otherwise);
requests with ``B * T * k > max_request_elems`` (or a body larger than such a request can be) get 413.
One forward runs at a time (a lock): the model is not re-entrant on one device.
"""

from __future__ import annotations

import hmac
import threading
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request, Response  # module level: FastAPI resolves the string annotations here
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from distill_dag.distill.teachers.network import CONTENT_TYPE, WireError, decode_arrays, encode_arrays


def create_app(teacher: Any, *, k_max: int, token: str | None = None, max_request_elems: int = 1 << 25):
    """The FastAPI app around a provider (normally a :class:`DirectTeacher` with ``k >= k_max``)."""
    app = FastAPI(title="distill-dag teacher", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    # the largest honest body: int32 ids + int32 positions for max_request_elems tokens (k >= 1), plus a header
    max_body = 8 * max_request_elems + 65536

    def unauthorized(request: Request) -> Response | None:
        if token is None:
            return None
        got = request.headers.get("authorization", "")
        if got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), token.encode()):
            return None
        return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health(request: Request) -> Response:
        if (r := unauthorized(request)) is not None:
            return r
        return JSONResponse({
            "status": "ok",
            "vocab_size": int(teacher.vocab_size),
            "k_max": int(k_max),
            "max_request_elems": int(max_request_elems),
            "identity": teacher.identity(),
        })

    @app.post("/v1/topk")
    async def topk(request: Request) -> Response:
        if (r := unauthorized(request)) is not None:
            return r
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            return JSONResponse({"error": f"body of {declared} bytes exceeds {max_body}"}, status_code=413)
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a chunked body cannot dodge the cap
            body += chunk
            if len(body) > max_body:
                return JSONResponse({"error": f"body exceeds {max_body} bytes"}, status_code=413)
        try:
            arrays, meta = decode_arrays(bytes(body))
            ids = arrays["input_ids"]
            pos = arrays.get("position_ids")
            k = int(meta.get("k", k_max))
        except (WireError, KeyError, TypeError, ValueError) as err:
            return JSONResponse({"error": f"bad request body: {err}"}, status_code=400)
        if ids.ndim != 2 or (pos is not None and pos.shape != ids.shape):
            return JSONResponse({"error": "input_ids must be [B, T] and position_ids the same shape"}, status_code=400)
        if not 1 <= k <= k_max:
            return JSONResponse({"error": f"k={k} outside [1, {k_max}] (restart with --k)"}, status_code=400)
        elems = int(ids.shape[0]) * int(ids.shape[1]) * k
        if elems > max_request_elems:
            return JSONResponse(
                {"error": f"batch x length x k = {elems} exceeds max_request_elems={max_request_elems}"}, status_code=413
            )
        if ids.size and (ids.min() < 0 or ids.max() >= teacher.vocab_size):
            return JSONResponse({"error": f"token id outside [0, {teacher.vocab_size})"}, status_code=400)
        batch = {"input_ids": torch.from_numpy(ids.astype(np.int64))}
        if pos is not None:
            batch["position_ids"] = torch.from_numpy(pos.astype(np.int64))

        def run() -> bytes:
            with lock:
                out = teacher.topk(batch)
            return encode_arrays({
                "indices": out.indices[..., :k].numpy().astype("<i4"),
                "logprobs": out.logprobs[..., :k].numpy().astype("<f4"),
            })

        return Response(content=await run_in_threadpool(run), media_type=CONTENT_TYPE)

    return app


def serve_teacher(cfg: Any, *, model_path: str | None = None, host: str | None = None, port: int | None = None,
                  k: int | None = None, device: str | None = None) -> None:
    """Load the teacher of ``cfg`` (``PipelineConfig``) and serve it until interrupted."""
    import os

    import uvicorn

    from distill_dag.device import pick_device
    from distill_dag.distill.teachers.direct import DirectTeacher

    t = cfg.teacher
    k = int(k or max(cfg.train.teacher_topk, cfg.logit_cache.k))
    teacher = DirectTeacher.from_config(t, k, pick_device(device or cfg.train.device), model_path=model_path)
    token = os.environ.get(t.token_env) or None
    host = host or t.serve_host
    port = int(port or t.serve_port)
    print(
        f"serving teacher {teacher.identity()['model']} (vocab {teacher.vocab_size}, k <= {k}) on http://{host}:{port}"
        f" ({'bearer token required' if token else 'no token: set $' + t.token_env + ' to require one'})",
        flush=True,
    )
    app = create_app(teacher, k_max=k, token=token, max_request_elems=t.max_request_elems)
    uvicorn.run(app, host=host, port=port, log_level="warning")
