"""Security: the teacher server listens on loopback unless told otherwise and caps request bodies
before reading them (413); the Dagster code location takes secrets only from the environment.

Bearer-token refusals (401) and the B x T x k cap are in tests/teacher/test_server.py.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_teachers_helpers import tiny_llama  # noqa: E402

from distill_dag.config import config_from_dict  # noqa: E402
from distill_dag.teacher.providers import direct  # noqa: E402
from distill_dag.loss.topk import TeacherError  # noqa: E402
from distill_dag.teacher.providers.direct import DirectTeacher  # noqa: E402
from distill_dag.teacher.server import create_app, serve_teacher  # noqa: E402

K = 8


def _outward_ip() -> str | None:
    """This machine's address on its default route (no packet is sent), or None when it has only loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_teacher_host(monkeypatch, cfg, **kw) -> str:
    """The host ``serve_teacher`` hands to uvicorn (the model load and the server loop are stubbed out)."""
    import uvicorn

    seen = {}
    monkeypatch.setattr(direct.DirectTeacher, "from_config",
                        classmethod(lambda cls, *a, **k: DirectTeacher(tiny_llama(), K)))
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **k: seen.update(host=host, port=port))
    serve_teacher(cfg, device="cpu", **kw)
    return seen["host"]


def test_server_binds_loopback_unless_told_otherwise(monkeypatch):
    cfg = config_from_dict({"teacher": {"model_name_or_path": None}, "train": {"teacher_topk": K}})
    assert _serve_teacher_host(monkeypatch, cfg) == "127.0.0.1"
    monkeypatch.setenv(cfg.teacher.token_env, "a-secret")  # beyond loopback only with a token
    assert _serve_teacher_host(monkeypatch, cfg, host="0.0.0.0") == "0.0.0.0"
    cfg.teacher.serve_host = "0.0.0.0"
    assert _serve_teacher_host(monkeypatch, cfg) == "0.0.0.0"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "teacher.example.org"])
def test_non_loopback_bind_without_a_token_is_refused_before_the_model_loads(monkeypatch, host):
    cfg = config_from_dict({"teacher": {"model_name_or_path": None}, "train": {"teacher_topk": K}})
    monkeypatch.delenv(cfg.teacher.token_env, raising=False)
    loaded = []
    monkeypatch.setattr(direct.DirectTeacher, "from_config", classmethod(lambda cls, *a, **k: loaded.append(1)))
    with pytest.raises(TeacherError, match=rf"refusing to serve the teacher on {re.escape(host)} without a bearer "
                                           rf"token.*\${cfg.teacher.token_env}.*allow_no_token"):
        serve_teacher(cfg, host=host, device="cpu")
    assert not loaded


@pytest.mark.parametrize("host", ["127.0.0.1", "127.5.6.7", "::1", "[::1]", "localhost"])
def test_loopback_binds_need_no_token(monkeypatch, host):
    cfg = config_from_dict({"teacher": {"model_name_or_path": None}, "train": {"teacher_topk": K}})
    monkeypatch.delenv(cfg.teacher.token_env, raising=False)
    assert _serve_teacher_host(monkeypatch, cfg, host=host) == host


def test_non_loopback_bind_without_a_token_when_explicitly_forced(monkeypatch):
    cfg = config_from_dict({"teacher": {"model_name_or_path": None}, "train": {"teacher_topk": K}})
    monkeypatch.delenv(cfg.teacher.token_env, raising=False)
    assert _serve_teacher_host(monkeypatch, cfg, host="0.0.0.0", allow_no_token=True) == "0.0.0.0"


def test_a_loopback_server_is_not_reachable_from_the_network():
    import uvicorn

    ip = _outward_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to probe from")
    port = _free_port()
    host = config_from_dict({}).teacher.serve_host  # the default bind address
    server = uvicorn.Server(uvicorn.Config(create_app(DirectTeacher(tiny_llama(), K), k_max=K), host=host, port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        end = time.time() + 30
        while not server.started and time.time() < end:
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{ip}:{port}/health", timeout=5)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    app = create_app(DirectTeacher(tiny_llama(), K), k_max=K, token="t0k", max_request_elems=64)
    with TestClient(app) as c:
        yield c


def test_oversize_body_is_413_from_its_declared_length_or_as_it_streams(client):
    max_body = 8 * 64 + 65536
    auth = {"Authorization": "Bearer t0k"}
    r = client.post("/v1/topk", content=b"\0" * (max_body + 1), headers=auth)
    assert r.status_code == 413 and f"body of {max_body + 1} bytes exceeds {max_body}" in r.text

    sent = {"bytes": 0}

    def chunks():  # no Content-Length: the cap must hold while the body streams in
        for _ in range(100):
            sent["bytes"] += 4096
            yield b"\0" * 4096
    r = client.post("/v1/topk", content=chunks(), headers=auth)
    assert r.status_code == 413 and f"body exceeds {max_body} bytes" in r.text
    assert client.get("/health", headers=auth).status_code == 200  # still serving
    assert client.app.state.budget.used == 0  # what the refused bodies reserved was returned


def test_unauthenticated_oversize_body_is_refused_with_401_before_reading(client):
    r = client.post("/v1/topk", content=b"\0" * (1 << 20))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Bearer t0k", "bearer t0k", "BEARER t0k", "BeArEr t0k", "Bearer  t0k ",
                                    " bearer t0k"])
def test_bearer_scheme_is_case_insensitive(client, header):  # RFC 7235 section 2.1
    assert client.get("/health", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize("header", ["t0k", "Basic t0k", "Bearer", "Bearer t0K", "Bearer t0k extra", "Bearert0k",
                                    "Token t0k"])
def test_wrong_scheme_or_token_is_401(client, header):
    r = client.get("/health", headers={"Authorization": header})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


_DEFS = """
import json
import dagster as dg
from distill_dag.definitions import defs
out = {}
for name, res in defs.resources.items():
    for field, value in vars(res).items():
        if field.startswith("_"):
            continue
        if isinstance(value, dg.EnvVar):
            out[f"{name}.{field}"] = ["EnvVar", True, value.env_var_name]
        else:
            out[f"{name}.{field}"] = [type(value).__name__, False, None if value is None else str(value)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("env_set", [True, False], ids=["secrets_set", "secrets_unset"])
def test_code_location_takes_secrets_only_as_env_vars(env_set):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("DISTILL_TEACHER_TOKEN", "WANDB_API_KEY")}
    secrets = {"DISTILL_TEACHER_TOKEN": "sentinel-teacher-token-3141", "WANDB_API_KEY": "sentinel-wandb-key-2718"}
    if env_set:
        env.update(secrets)
    r = subprocess.run([sys.executable, "-c", _DEFS], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fields = json.loads(r.stdout.strip().splitlines()[-1])
    for key, env_name in (("teacher_endpoint.token", "DISTILL_TEACHER_TOKEN"), ("wandb.api_key", "WANDB_API_KEY")):
        if env_set:  # an EnvVar names the variable; the value is read at run time and never stored
            assert fields[key] == ["EnvVar", True, env_name], fields[key]
        else:
            assert fields[key][2] is None, fields[key]
    leaked = [k for k, (_, is_env, v) in fields.items() if v in secrets.values()]
    assert not leaked, leaked
