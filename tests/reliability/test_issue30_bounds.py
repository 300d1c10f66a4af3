"""Issue 30, points 4, 5, 6, 11 and 12: untrusted sizes are bounded before they are read or allocated,
and every refusal names its file or key.

Each test replays the attack of the issue and shows the bound holding within a stated time (and, for the
server, memory), or the refusal naming the key or file.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from distill_dag.config import ConfigError, config_from_dict, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _within(seconds: float, fn, *args, **kw):
    """``fn(*args, **kw)`` in a daemon thread; fails the test when it is still running after ``seconds``
    (a FIFO read that blocks, an endless hash), else returns its result or re-raises its exception."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s: the bound did not hold"
    out["seconds"] = time.perf_counter() - t0
    if "error" in out:
        raise out["error"]
    return out["value"]


# ---- 4: files read whole are regular and bounded -------------------------------------------------------
def test_point4_config_from_dev_zero_a_fifo_or_a_base_fifo_is_refused_at_once_naming_the_file(tmp_path, capsys):
    from distill_dag.cli import main
    from distill_dag.model.model_card import read_folder_json as _read_json
    from distill_dag.safe_read import UnsafeFileError, read_bounded

    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)  # no writer: a plain open() would block forever
    child = tmp_path / "child.yaml"
    child.write_text("base: c.yaml\ntrain:\n  max_steps: 3\n")
    for path, kind in (("/dev/zero", "a character device"), (str(fifo), "a FIFO"), (str(child), "a FIFO")):
        with pytest.raises(ConfigError) as err:
            _within(5, load_config, path)
        named = str(fifo) if path == str(child) else path
        assert str(err.value).startswith(f"{named}: {kind}") or f"{named}: {kind}" in str(err.value), err.value
    # the CLI: exit 2, the file named, no traceback
    assert _within(5, main, ["train", "--config", "/dev/zero"]) == 2
    e = capsys.readouterr().err
    assert "/dev/zero: a character device, not a regular file" in e and "Traceback" not in e
    # a checkpoint's JSON (the model card facts, config.json) through the same reader
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(UnsafeFileError, match=r"config\.json: a FIFO"):
        _within(5, _read_json, tmp_path / "config.json")
    # a regular file past the bound is refused, a /proc file (st_size 0) is still read whole
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match=r"big\.yaml: 2,097,152 bytes is too large"):
        load_config(big)
    assert b"VmRSS" in read_bounded("/proc/self/status", 1 << 20)
    # hashing: a weights file that is a symlink to /dev/zero is refused at once, a real one hashes as hashlib does
    import hashlib

    from distill_dag.safe_read import sha256_regular

    (tmp_path / "w.safetensors").symlink_to("/dev/zero")
    with pytest.raises(UnsafeFileError, match=r"w\.safetensors: a character device"):
        _within(5, sha256_regular, tmp_path / "w.safetensors")
    big.write_bytes(os.urandom(3 << 20))
    assert sha256_regular(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    with pytest.raises(UnsafeFileError, match=r"big\.yaml: 3,145,728 bytes is above the 1,048,576 bytes"):
        sha256_regular(big, limit=1 << 20)


# ---- 5: the server's budget follows the bytes received ---------------------------------------------------
def test_point5_a_stalled_declared_huge_body_reserves_only_what_arrived_and_gets_408_at_its_deadline():
    """Driven through the ASGI app itself (the subprocess measurement with 50 concurrent requests is
    tests/reliability/test_server_limits.py::test_stalled_declared_huge_bodies_...): a client declares
    268 MB, sends 64 KiB and stalls. The budget holds 64 KiB (not 268 MB), Python allocates no body-sized
    buffer, and the request gets 408 once body_timeout_s + 64 KiB / body_min_rate has passed."""
    from test_teachers_helpers import tiny_llama

    from distill_dag.teacher.providers.direct import DirectTeacher
    from distill_dag.teacher.providers.network import CONTENT_TYPE
    from distill_dag.teacher.server import create_app

    timeout_s, rate, sent, declared = 0.5, float(1 << 20), 64 << 10, 8 * (1 << 25)
    app = create_app(DirectTeacher(tiny_llama(), 4), k_max=4, access_log_enabled=False, body_timeout_s=timeout_s,
                     body_min_rate=rate)
    budget = app.state.budget
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/topk", "raw_path": b"/v1/topk", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(declared).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent_msgs: list = []
    held: list = []

    async def drive():
        first = True

        async def receive():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": b"\0" * sent, "more_body": True}
            held.append(budget.used)
            await asyncio.sleep(3600)  # the client stalls

        async def send(msg):
            sent_msgs.append(msg)

        await app(scope, receive, send)

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        asyncio.run(asyncio.wait_for(drive(), 30))
        took = time.perf_counter() - t0
        _, peak_alloc = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    status = next(m["status"] for m in sent_msgs if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent_msgs if m["type"] == "http.response.body")
    assert status == 408 and b"did not arrive in time" in body, (status, body)
    assert held and max(held) == sent  # reserved what arrived
    assert budget.peak == sent and budget.used == 0  # and returned it
    assert peak_alloc < 16 << 20, peak_alloc  # no 268 MB buffer from Content-Length
    deadline = timeout_s + sent / rate
    assert deadline <= took < deadline + 5, took


# ---- 6: saved models and eval lengths ------------------------------------------------------------------------
@pytest.fixture
def tiny_student_dir(tmp_path, small_corpus):
    from distill_dag.data.manifest import Manifest
    from distill_dag.model.retnet import RetNetForCausalLM
    from distill_dag.model.variants import student_config

    out = tmp_path / "student"
    cfg = student_config("tiny", Manifest.load(small_corpus["tokenized"]).vocab_size, hidden_size=32,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    RetNetForCausalLM(cfg).save_pretrained(out)
    return out


def _eval_cfg(tmp_path, small_corpus) -> Path:
    from support import cfg_dict

    d = cfg_dict(tmp_path, small_corpus, None, pretrain_ce_only=True)
    d["eval"] = {"niah": False, "long_context": False, "sample_prompts": 0, "max_batches": 1}
    d["teacher_ft"] = {"output_dir": str(tmp_path / "no_teacher_ft")}  # no finetuned teacher to compare with
    p = tmp_path / "eval.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_point6_eval_of_a_crafted_checkpoint_is_refused_before_loading_or_hashing(tmp_path, small_corpus,
                                                                                    tiny_student_dir, capsys):
    from distill_dag.cli import main

    cfg = _eval_cfg(tmp_path, small_corpus)
    # a config.json asking for 10M layers: refused before a layer is built
    c = json.loads((tiny_student_dir / "config.json").read_text())
    c["num_hidden_layers"] = 10_000_000
    (tiny_student_dir / "config.json").write_text(json.dumps(c))
    rc = _within(60, main, ["eval", "--config", str(cfg), "--checkpoint", str(tiny_student_dir)])
    e = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in e, e
    assert f"{tiny_student_dir / 'config.json'}: key 'num_hidden_layers' is 10000000, outside [1, 1024]" in e, e
    # weights that are a symlink to /dev/zero, listed in checksums.json: never hashed, never read
    c["num_hidden_layers"] = 1
    (tiny_student_dir / "config.json").write_text(json.dumps(c))
    w = tiny_student_dir / "model.safetensors"
    w.unlink()
    w.symlink_to("/dev/zero")
    (tiny_student_dir / "checksums.json").write_text(json.dumps({"model.safetensors": "0" * 64}))
    rc = _within(60, main, ["eval", "--config", str(cfg), "--checkpoint", str(tiny_student_dir)])
    e = capsys.readouterr().err
    assert rc == 1 and f"{w}: a character device, not a regular file" in e and "Traceback" not in e, e
    # eval lengths are capped in the schema, naming the key
    with pytest.raises(ConfigError, match=r"key 'eval.niah_context_lengths.0': Input should be less than or equal "
                                          r"to 131072 \(got 100000000\)"):
        config_from_dict({"eval": {"niah_context_lengths": [100_000_000]}})


# ---- 11: every config value validated where it is declared -------------------------------------------------
@pytest.mark.parametrize("section,value,key,message", [
    ("data", {"retokenize_cron": "every tuesday"}, "data.retokenize_cron", "needs 5 fields"),
    ("data", {"retokenize_cron": "0 25 * * *"}, "data.retokenize_cron", "the hour field '25'"),
    ("student", {"overrides": {"hidden_size": "abc"}}, "student.overrides.hidden_size", "must be an integer"),
    ("student", {"overrides": {"value_factor": 0}}, "student.overrides.value_factor", "out of bounds"),
    ("student", {"overrides": {"vocab_size": 10}}, "student.overrides.vocab_size", "comes from the tokenizer"),
    ("student", {"overrides": {"hidden_size": 1_000_000}}, "student.overrides.hidden_size", "<= 16384"),
    ("student", {"overrides": {"hidden_size": 16384, "num_hidden_layers": 256, "num_attention_heads": 128}},
     "student.overrides",
     "non-embedding parameters"),
    ("student", {"overrides": {"hidden_size": 130}, "variant": "tiny"}, "student.overrides.hidden_size",
     "not divisible by num_attention_heads 4"),
    ("student", {"overrides": {"num_hidden_layers": 0}}, "student.overrides.num_hidden_layers", "must be >= 1"),
    ("student", {"overrides": {"no_such_field": 1}}, "student.overrides.no_such_field", "not a RetNetConfig field"),
    ("student", {"chunk_size": 1e9}, "student.chunk_size", "less than or equal to 4096"),
    ("train", {"seed": 2**64}, "train.seed", "less than or equal to 4294967295"),
    ("eval", {"niah_depths": []}, "eval.niah_depths", "at least 1 item"),
])
def test_point11_extreme_or_wrong_values_are_refused_at_config_time_naming_the_key(section, value, key, message):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as err:
            config_from_dict({section: value})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"key '{key}'" in str(err.value) and message in str(err.value), str(err.value)
    assert peak < 64 << 20 and time.perf_counter() - t0 < 30  # nothing terabyte-sized was attempted


def test_point11_cron_strings_we_accept_dagster_accepts_and_its_refusals_are_ours():
    """The reference: Dagster's own validator (what the code location runs when it loads)."""
    from dagster._utils.schedules import is_valid_cron_string

    from distill_dag.config import cron_error

    good = ["0 3 * * *", "*/15 0-6 1,15 jan-mar mon-fri", "@daily", "0 0 * * 7", "59 23 31 12 6", "0 */2 * * SUN"]
    bad = ["every tuesday", "61 * * * *", "* * * *", "*/0 * * * *", "0 0 0 * *", "0 0 * 13 *", "0 0 * * 8", ""]
    for c in good:
        assert cron_error(c) is None and is_valid_cron_string(c), c
    for c in bad:
        assert cron_error(c) is not None and not is_valid_cron_string(c), c
        with pytest.raises(ConfigError, match=r"key 'data.retokenize_cron'"):
            config_from_dict({"data": {"retokenize_cron": c}})


def test_point11_token_ids_past_the_vocabulary_name_the_shard(tmp_path, small_corpus):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill_dag.data.dataset import make_loader
    from distill_dag.data.manifest import MANIFEST
    from distill_dag.data.shards import CorruptShardError
    from distill_dag.io import sha256_file

    data = tmp_path / "tokenized"
    shutil.copytree(small_corpus["tokenized"], data)
    m = json.loads((data / MANIFEST).read_text())
    vocab = m["vocab_size"]
    shard = next(s for s in m["shards"] if s["split"] == "train")
    path = data / shard["path"]
    table = pq.read_table(path)
    ids = table.column("input_ids").to_pylist()
    ids[0][3] = vocab + 7
    table = table.set_column(table.schema.get_field_index("input_ids"), "input_ids",
                             pa.array(ids, type=table.schema.field("input_ids").type))
    pq.write_table(table, path)
    shard["sha256"], shard["bytes"] = sha256_file(path), path.stat().st_size
    (data / MANIFEST).write_text(json.dumps(m))
    loader = make_loader(data, "train", batch_size=len(ids), shuffle=False, infinite=False)
    with pytest.raises(CorruptShardError, match=rf"{path}: row group 0: input_ids holds token id {vocab + 7}, "
                                               rf"outside the manifest's vocabulary \[0, {vocab}\)"):
        next(iter(loader))


def test_point11_an_output_that_is_a_file_and_an_eio_name_the_path(tmp_path):
    from distill_dag.cli import describe_error

    f = tmp_path / "out"
    f.write_text("x")
    try:
        f.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        code, msg = describe_error(err)
    assert code == 1 and msg.startswith(f"{f}: is a file, where a folder is needed")
    try:  # what read() raises on a failing disk: EIO, no file name; the caller's context names it
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as inner:
            raise OSError(errno.EIO, "Input/output error", str(tmp_path / "part-00000.jsonl")) from inner
    except OSError as err:
        code, msg = describe_error(err)
    assert code == 1 and msg.startswith(f"{tmp_path / 'part-00000.jsonl'}: input/output error (EIO)")


# ---- 12: the model card ------------------------------------------------------------------------------------
def test_point12_values_from_config_and_paths_cannot_inject_markdown_or_html_into_the_card(tmp_path):
    """The reference renderer is markdown-it (CommonMark + GFM tables): the rendered card has exactly one
    <h1>, no <img> nor any raw HTML tag from the values, no extra table row, and shows each value's text."""
    from markdown_it import MarkdownIt

    from distill_dag.model import hub

    evil = "runs/t`x\n# Injected heading\n<img src=x onerror=alert(1)> | cell | [link](javascript:alert(1))"
    hub.update_model_card(tmp_path, run={"teacher": {"model": evil, "adapter": evil, "provider": evil},
                                         "teacher_mode": evil, "student": {"variant": evil, "overrides": {"x": evil}},
                                         "manifest_hash": evil, "teacher_topk": evil, "temperature": evil},
                          training={"losses": {evil: 1.5}, "wandb_url": evil},
                          evaluation={"split": evil, "perplexity_rows": [{"model": evil, "ppl": 2.0}],
                                      "niah_table": f"| depth | 256 |\n|---|---:|\n| 0.1 | 1.00 |\n{evil}"})
    text = (tmp_path / "README.md").read_text()
    out = MarkdownIt("commonmark").enable("table").render(text)
    assert out.count("<h1>") == 1 and "Injected heading</h1>" not in out
    assert "<img" not in out and "<a href" not in out and "onerror=alert(1)>" not in out
    assert "&lt;img src=x onerror=alert(1)&gt;" in out  # shown as text, not dropped
    training = out.split("<h2>Training</h2>")[1].split("<h3>")[0]
    assert training.count("<tr>") == 1 + 12, training  # header + the card's 12 rows: no row injected
    assert training.count("<td>") == 2 * 12  # and no cell split by the value's "|"
    cells = MarkdownIt("commonmark").enable("table").parse(text)
    teacher = next(t for t in cells if t.type == "inline" and t.content.startswith("``runs/t"))
    code = [c.content for c in teacher.children if c.type == "code_inline"]
    assert code[0] == "runs/t`x # Injected heading <img src=x onerror=alert(1)> | cell | [link](javascript:alert(1))"
