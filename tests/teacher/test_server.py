"""The real teacher server (`distill serve-teacher` in a subprocess on 127.0.0.1) and its client."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from support import all_batches, make_rows, write_data  # noqa: E402
from test_teachers_helpers import tiny_llama  # noqa: E402

from distill_dag.loss.topk import TeacherError  # noqa: E402
from distill_dag.teacher.providers.direct import DirectTeacher  # noqa: E402
from distill_dag.teacher.providers.network import CONTENT_TYPE, NetworkTeacher, decode_arrays, encode_arrays  # noqa: E402

K = 8
TOKEN = "s3cret-test-token"
MAX_ELEMS = 2 * 16 * K  # two rows of 16 tokens at k=8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`distill serve-teacher` in its own process group (so a kill takes all of it); what it prints (the
    access log included) goes to a file, so a long run never blocks on a full pipe."""

    def __init__(self, cfg: Path, model: Path, port: int, token: str | None) -> None:
        self.cfg, self.model, self.port, self.token = cfg, model, port, token
        self.proc: subprocess.Popen | None = None
        fd, name = tempfile.mkstemp(prefix="serve-teacher-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, wait: bool = True) -> "Server":
        env = dict(os.environ, TEST_TEACHER_TOKEN=self.token or "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "distill_dag.cli", "serve-teacher", "--config", str(self.cfg), "--model",
                 str(self.model), "--port", str(self.port), "--k", str(K), "--device", "cpu"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if wait:
            self.wait_up()
        return self

    def wait_up(self, timeout: float = 180) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    model_dir = d / "teacher"
    tiny_llama().save_pretrained(model_dir)
    cfg = d / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "teacher": {"model_name_or_path": str(model_dir), "token_env": "TEST_TEACHER_TOKEN",
                    "max_request_elems": MAX_ELEMS},
        "train": {"teacher_topk": K, "device": "cpu"},
    }))
    from transformers import AutoModelForCausalLM

    direct = DirectTeacher(AutoModelForCausalLM.from_pretrained(model_dir).eval(), K)
    data = write_data(d / "data", [8])
    return cfg, model_dir, direct, all_batches(data, 4)


@pytest.fixture(scope="module")
def server(setup):
    cfg, model_dir, _, _ = setup
    s = Server(cfg, model_dir, free_port(), TOKEN).start()
    yield s
    s.kill()


def assert_same_topk(a, b):
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_network_teacher_gives_the_direct_teachers_topk(setup, server):
    _, _, direct, batches = setup
    net = NetworkTeacher(server.url, K, timeout_s=30, max_retries=2, backoff_s=0.1, batch_rows=2, token=TOKEN)
    assert net.vocab_size == direct.vocab_size
    assert net.identity()["teacher"]["model"] == str(setup[1])
    for b in batches:
        assert_same_topk(net.topk(b), direct.topk(b))
    net.close()


def test_oversize_request_gets_413(setup, server):
    rows = make_rows(3)  # 3 x 16 x 8 > MAX_ELEMS
    body = encode_arrays({"input_ids": rows["input_ids"]}, {"k": K})
    r = httpx.post(server.url + "/v1/topk", content=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                                   "Content-Type": CONTENT_TYPE})
    assert r.status_code == 413 and "max_request_elems" in r.text
    net = NetworkTeacher(server.url, K, timeout_s=30, max_retries=3, backoff_s=0.1, batch_rows=4, token=TOKEN)
    with pytest.raises(TeacherError, match="413.*teacher.batch_rows"):
        net.topk(setup[3][0])
    assert net.http.retries_done == 0  # a 413 is not retried


def test_bearer_token_is_enforced(setup, server):
    r = httpx.post(server.url + "/v1/topk", content=encode_arrays({"input_ids": make_rows(1)["input_ids"]}, {"k": K}))
    assert r.status_code == 401
    assert httpx.get(server.url + "/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(TeacherError, match="401.*teacher.token_env"):
        NetworkTeacher(server.url, K, max_retries=3, backoff_s=0.1, token=None)
    ok = httpx.post(server.url + "/v1/topk", content=encode_arrays({"input_ids": make_rows(1)["input_ids"]}, {"k": K}),
                    headers={"Authorization": f"Bearer {TOKEN}"})
    out, _ = decode_arrays(ok.content)
    assert out["indices"].shape == (1, 16, K) and out["logprobs"].dtype == np.float32


def test_json_body_gives_the_direct_teachers_topk(setup, server):
    """`curl -H 'Content-Type: application/json' -d '{"input_ids": [[...]], "k": 4}'`: the same top-k as
    the binary path, as JSON; a flat list is one row, answered without the batch axis."""
    _, _, direct, batches = setup
    b = batches[0]
    ref = direct.topk(b)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"input_ids": b["input_ids"].tolist(), "position_ids": b["position_ids"].tolist(), "k": 4}
    r = httpx.post(server.url + "/v1/topk", json=body, headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    got = r.json()
    assert got["shape"] == [*b["input_ids"].shape, 4]
    assert torch.equal(torch.tensor(got["indices"]), ref.indices[..., :4])
    torch.testing.assert_close(torch.tensor(got["logprobs"]), ref.logprobs[..., :4], atol=1e-5, rtol=0)
    r = httpx.post(server.url + "/v1/topk", json={"input_ids": b["input_ids"][0].tolist()}, headers=auth)
    assert r.status_code == 200 and r.json()["shape"] == [b["input_ids"].shape[1], K]  # k defaults to k_max
    r = httpx.post(server.url + "/v1/topk", json={"input_ids": [1.5]}, headers=auth)
    assert r.status_code == 400 and "integers" in r.json()["error"]


def test_json_without_its_content_type_gets_a_hint(server):
    r = httpx.post(server.url + "/v1/topk", content=b'{"input_ids": [1, 2]}',
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]


def test_lower_case_bearer_scheme_is_accepted(server):
    assert httpx.get(server.url + "/health", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_every_request_gets_an_access_log_line_with_size_and_latency(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = encode_arrays({"input_ids": make_rows(2)["input_ids"]}, {"k": 3})
    assert httpx.post(server.url + "/v1/topk", content=body, headers=auth).status_code == 200
    assert httpx.post(server.url + "/v1/topk", content=b"junk", headers=auth).status_code == 400
    assert httpx.get(server.url + "/health").status_code == 401
    out_bytes = 8 + len(b'{"arrays": [{"name": "indices", "dtype": "<i4", "shape": [2, 16, 3]}, '
                         b'{"name": "logprobs", "dtype": "<f4", "shape": [2, 16, 3]}], "meta": {}}') + 8 * 2 * 16 * 3
    pats = [rf'127\.0\.0\.1:\d+ "POST /v1/topk" 200 in={len(body)}B out={out_bytes}B bin 2x16x3 \d+\.\dms',
            r'127\.0\.0\.1:\d+ "POST /v1/topk" 400 in=4B out=\d+B \d+\.\dms',
            r'127\.0\.0\.1:\d+ "GET /health" 401 in=0B out=\d+B \d+\.\dms']
    end = time.time() + 10
    while time.time() < end and not all(re.search(p, server.output()) for p in pats):
        time.sleep(0.1)  # the log is flushed per line, but written by another process
    for p in pats:
        assert re.search(p, server.output()), (p, server.output()[-2000:])


def test_garbage_body_is_a_400_not_a_crash(server):
    r = httpx.post(server.url + "/v1/topk", content=b"DTK1\xff\xff\xff\xffjunk", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400
    assert httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_server_down_gives_a_clear_error_after_the_retries():
    port = free_port()
    t0 = time.time()
    with pytest.raises(TeacherError, match=rf"127\.0\.0\.1:{port}/health failed after 3 attempts.*ConnectError"):
        NetworkTeacher(f"http://127.0.0.1:{port}", K, timeout_s=2, max_retries=2, backoff_s=0.1)
    assert 0.3 <= time.time() - t0 < 10  # backoff 0.1 + 0.2 s


def test_server_killed_mid_sequence_client_retries_and_loses_no_batch(setup):
    cfg, model_dir, direct, batches = setup
    srv = Server(cfg, model_dir, free_port(), None).start()
    try:
        net = NetworkTeacher(srv.url, K, timeout_s=30, max_retries=12, backoff_s=0.25, batch_rows=1)
        got = [net.topk(batches[0])]
        srv.kill()  # mid-sequence: the next batch finds no server
        restarter = threading.Timer(1.0, lambda: srv.start(wait=False))
        restarter.start()
        got += [net.topk(b) for b in batches[1:]]
        restarter.join()
        assert net.http.retries_done > 0
        assert len(got) == len(batches)
        for g, b in zip(got, batches):  # every batch, in order, once, equal to the direct teacher's answer
            assert_same_topk(g, direct.topk(b))
    finally:
        srv.kill()
