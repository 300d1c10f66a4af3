"""The network teacher under faults: slow answers (timeouts), 500s, garbage answers, and a training run
whose server is killed mid-run (restarted: no step lost or doubled; not restarted: a clear error and a
resumable checkpoint).

tests/teacher/test_server.py covers: server down at start, killed between client batches, 401, 413,
a garbage request body. Faults here are injected by an ASGI wrapper around the real server app
(``create_app`` with a real DirectTeacher), served by uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _rel import final_weights, last_train_step, make_cfg  # noqa: E402
from test_server import Server, free_port  # noqa: E402  (`distill serve-teacher` in a subprocess, K=8)
from support import all_batches, write_data  # noqa: E402
from test_teachers_helpers import tiny_llama  # noqa: E402

from distill_dag.training.checkpoint import load_trainer_state  # noqa: E402
from distill_dag.loss.topk import TeacherError  # noqa: E402
from distill_dag.teacher.providers.direct import DirectTeacher  # noqa: E402
from distill_dag.teacher.providers.network import NetworkTeacher, encode_arrays  # noqa: E402
from distill_dag.teacher.server import create_app  # noqa: E402
from distill_dag.student.trainer import train  # noqa: E402

K = 8
SLOW_S = 3.0


class Faults:
    """ASGI wrapper: each POST /v1/topk takes the next planned fault (None = answer normally);
    ``forever`` repeats one fault for every request."""

    def __init__(self, app) -> None:
        self.app, self.plan, self.forever, self.served = app, [], None, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/topk":
            return await self.app(scope, receive, send)
        fault = self.forever or (self.plan.pop(0) if self.plan else None)
        self.served.append(fault)
        if fault is None:
            return await self.app(scope, receive, send)
        if fault == "slow":
            await asyncio.sleep(SLOW_S)
            return await self.app(scope, receive, send)
        if fault == "500":
            body, status = b'{"error": "injected"}', 500
        elif fault == "garbage":
            body, status = np.random.default_rng(0).bytes(333), 200
        elif fault == "shape":  # a well-formed message of the wrong shape
            body, status = encode_arrays({"indices": np.zeros((1, 1, K), "<i4"), "logprobs": np.zeros((1, 1, K), "<f4")}), 200
        elif fault == "ids":  # right shape, token ids outside the vocabulary
            body, status = None, 200
        else:
            raise AssertionError(fault)
        if body is None:
            sent = []

            async def capture(msg):
                sent.append(msg)
            await self.app(scope, receive, capture)
            from distill_dag.teacher.providers.network import decode_arrays

            arrays, _ = decode_arrays(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
            body = encode_arrays({"indices": arrays["indices"] + 10_000, "logprobs": arrays["logprobs"]})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/x-distill-topk"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    import uvicorn

    teacher = DirectTeacher(tiny_llama(), K)
    app = Faults(create_app(teacher, k_max=K))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.time() + 60
    while not server.started and time.time() < end:
        time.sleep(0.05)
    assert server.started
    data = write_data(tmp_path_factory.mktemp("faulty"), [4])
    yield app, f"http://127.0.0.1:{port}", teacher, all_batches(data, 4)[0]
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def faults(faulty):
    app = faulty[0]
    app.plan, app.forever, app.served = [], None, []
    yield faulty


def _client(url, **kw):
    kw = {"timeout_s": 1.0, "max_retries": 3, "backoff_s": 0.2, "batch_rows": 4} | kw
    return NetworkTeacher(url, K, **kw)


@pytest.mark.parametrize("plan", [["500", "500"], ["slow"], ["garbage", "shape", "ids"]],
                         ids=["500s", "slow", "garbage"])
def test_transient_faults_are_retried_with_backoff_and_give_the_teachers_answer(faults, plan):
    app, url, teacher, batch = faults
    net = _client(url)
    app.plan = list(plan)
    t0 = time.time()
    got = net.topk(batch)
    took = time.time() - t0
    assert app.served == [*plan, None]  # each fault met once, then one good answer
    assert net.http.retries_done == len(plan)
    backoff = sum(0.2 * 2**i for i in range(len(plan)))
    assert took >= backoff
    if plan == ["slow"]:
        assert took < SLOW_S  # gave up on the slow answer at the 1 s timeout, did not wait it out
    ref = teacher.topk(batch)
    assert torch.equal(got.indices, ref.indices) and torch.equal(got.logprobs, ref.logprobs)
    net.close()


@pytest.mark.parametrize("fault,last", [("500", r"HTTP 500"), ("slow", r"ReadTimeout"),
                                        ("garbage", r"unreadable response"), ("ids", r"outside the vocabulary")])
def test_persistent_faults_end_in_a_clear_error_after_bounded_retries(faults, fault, last):
    app, url, _, batch = faults
    net = _client(url, max_retries=2, backoff_s=0.1, timeout_s=0.5)
    app.forever = fault
    t0 = time.time()
    with pytest.raises(TeacherError, match=rf"/v1/topk failed after 3 attempts .*backoff.*last error: .*{last}"
                                           r".*distill serve-teacher"):
        net.topk(batch)
    took = time.time() - t0
    assert len(app.served) == 3 and net.http.retries_done == 2
    assert 0.3 <= took < 3 * 0.5 + 0.3 + 5  # two backoffs (0.1 + 0.2 s) and at most three timeouts
    net.close()


def test_a_full_byte_budget_is_503_and_the_client_retries_until_it_frees(faults):
    """Another request holds the server's whole byte budget: ours gets 503 (Retry-After), is retried with
    backoff, and gets the teacher's answer once the budget is returned."""
    app, url, teacher, batch = faults
    budget = app.app.state.budget
    assert budget.take(budget.limit)
    freer = threading.Timer(0.5, lambda: budget.give(budget.limit))
    net = _client(url, max_retries=6, backoff_s=0.2)
    freer.start()
    try:
        got = net.topk(batch)
    finally:
        freer.join()
    assert net.http.retries_done >= 1 and budget.used == 0
    ref = teacher.topk(batch)
    assert torch.equal(got.indices, ref.indices) and torch.equal(got.logprobs, ref.logprobs)
    net.close()


def test_rows_over_the_servers_max_seq_len_fail_clearly_before_anything_is_sent(faults):
    app, url, _, _ = faults
    net = _client(url)
    limit = net.health["max_seq_len"]
    assert limit == 4096  # the tiny teacher's max_position_embeddings
    with pytest.raises(TeacherError, match=rf"rows of {limit + 1} tokens .*max_seq_len={limit}.*tokenize.max_seq_length"):
        net.topk({"input_ids": torch.zeros(1, limit + 1, dtype=torch.long)})
    assert app.served == [] and net.http.retries_done == 0
    net.close()


# ---- training through the served teacher (a real `distill serve-teacher` process) ------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, small_corpus, tiny_teacher_dir):
    d = tmp_path_factory.mktemp("served")
    cfg = d / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": {"model_name_or_path": str(tiny_teacher_dir), "token_env": "TEST_TEACHER_TOKEN"},
                                   "train": {"teacher_topk": K, "device": "cpu"}}))
    srv = Server(cfg, tiny_teacher_dir, free_port(), None).start()
    yield srv, d
    srv.kill()


def _net_cfg(tmp, corpus, srv, **kw):
    kw = dict(teacher_mode="network", teacher_topk=K, max_steps=6, save_interval=2) | kw
    cfg = make_cfg(tmp, corpus, None, **kw)
    cfg.teacher.url = srv.url
    cfg.teacher.max_retries, cfg.teacher.backoff_s, cfg.teacher.timeout_s = 14, 0.25, 30.0
    return cfg


@pytest.fixture(scope="module")
def reference_run(served, small_corpus):
    """An uninterrupted network-mode run: the weights every interrupted run must reproduce."""
    srv, d = served
    return train(_net_cfg(d / "ref", small_corpus, srv))


def _kill_at_step(srv, run_dir, step, restart_after=None):
    state = {}

    def watch():
        end = time.time() + 300
        while time.time() < end and last_train_step(run_dir) < step:
            time.sleep(0.01)
        state["killed_at"] = last_train_step(run_dir)
        srv.kill()
        if restart_after is not None:
            time.sleep(restart_after)
            srv.start(wait=False)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, state


def test_network_training_equals_direct_training(tmp_path, reference_run, small_corpus, tiny_teacher_dir, monkeypatch):
    monkeypatch.delenv("DISTILL_TEACHER_TOKEN", raising=False)
    direct = train(make_cfg(tmp_path, small_corpus, tiny_teacher_dir, teacher_topk=K, max_steps=6, save_interval=2))
    a, b = final_weights(reference_run.run_dir), final_weights(direct.run_dir)
    for k in a:  # the same teacher top-k over the wire (float32 both ways)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_server_killed_and_restarted_mid_training_loses_or_doubles_no_step(tmp_path, served, reference_run,
                                                                          small_corpus, monkeypatch):
    monkeypatch.delenv("DISTILL_TEACHER_TOKEN", raising=False)
    srv, _ = served
    cfg = _net_cfg(tmp_path, small_corpus, srv)
    watcher, state = _kill_at_step(srv, cfg.run_dir, 2, restart_after=0.5)
    try:
        res = train(cfg)
    finally:
        watcher.join(60)
        srv.wait_up()
    assert 2 <= state["killed_at"] < 6  # killed mid-run; every later step needed the restarted server
    assert res.steps == 6
    train_steps = [h["step"] for h in res.history if h["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # each step once
    ref = final_weights(reference_run.run_dir)
    got = final_weights(res.run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_server_gone_for_good_fails_clearly_and_the_run_resumes_exactly(tmp_path, served, reference_run,
                                                                        small_corpus, monkeypatch):
    monkeypatch.delenv("DISTILL_TEACHER_TOKEN", raising=False)
    srv, _ = served
    cfg = _net_cfg(tmp_path, small_corpus, srv)
    cfg.teacher.max_retries, cfg.teacher.backoff_s = 2, 0.1
    watcher, state = _kill_at_step(srv, cfg.run_dir, 3)
    try:
        with pytest.raises(TeacherError, match=rf"{srv.url}/v1/topk failed after 3 attempts.*ConnectError"):
            train(cfg)
    finally:
        watcher.join(60)
        srv.start()
    assert 3 <= state["killed_at"] < 6
    path, st, _ = load_trainer_state(cfg.run_dir)  # the last periodic checkpoint is whole
    assert st["step"] in (2, 4) and path.name == f"step-{st['step']:07d}"
    resumed = train(_net_cfg(tmp_path, small_corpus, srv, resume_from=str(cfg.run_dir)))
    assert resumed.steps == 6
    ref = final_weights(reference_run.run_dir)
    got = final_weights(resumed.run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
