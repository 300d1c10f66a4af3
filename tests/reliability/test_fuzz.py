"""Hypothesis fuzzing of the doors bad input comes through: JSONL bytes, config dicts, teacher requests.

JSONL: every non-blank line is either a row or a reject carrying its file and line number, with the
decision of an independent oracle below; nothing crashes, in the reader nor in tokenization.
Config: any dict gives a PipelineConfig or a ConfigError naming a key, never another exception.
Teacher server: any binary (DTK1) or JSON body to /v1/topk gets 200 or a 4xx with a message, never a 500.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from distill_dag.config import ConfigError, PipelineConfig, Section, config_from_dict
from distill_dag.data.jsonl import ReadStats, Reject, iter_jsonl
from distill_dag.data.pack import TooFewRowsError, tokenize_to_parquet

MAX_LINE = 200


# ---- the oracle: what each line must become --------------------------------------------------------
def _good_str(v: Any, nonblank: bool) -> bool:
    if not isinstance(v, str) or (nonblank and not v.strip()):
        return False
    try:
        v.encode("utf-8")  # a lone surrogate (from a \ud800 escape) is not text
    except UnicodeEncodeError:
        return False
    return True


def _all_strings_encode(obj: Any) -> bool:
    if isinstance(obj, str):
        return _good_str(obj, False)
    if isinstance(obj, dict):
        return all(_all_strings_encode(k) and _all_strings_encode(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_all_strings_encode(v) for v in obj)
    return True


def expected(line: bytes, max_line: int) -> str:
    """'blank', 'row' or 'reject' for one line (without its newline)."""
    if len(line) > max_line:
        return "reject"
    if not line.strip():
        return "blank"
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "reject"
    if not isinstance(obj, dict) or not _all_strings_encode(obj):
        return "reject"
    if "text" in obj:
        return "row" if _good_str(obj["text"], True) else "reject"
    if "prompt" in obj or "response" in obj:
        ok = _good_str(obj.get("prompt"), False) and _good_str(obj.get("response"), True)
        return "row" if ok else "reject"
    return "reject"


def lines_of(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    return parts[:-1] if parts and parts[-1] == b"" else parts


# ---- strategies ------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
row_objects = st.fixed_dictionaries({}, optional={
    "text": st.text(max_size=60) | json_values, "prompt": st.text(max_size=30) | json_values,
    "response": st.text(max_size=30) | json_values, "id": json_values, "source": json_values,
})
lines = st.one_of(
    row_objects.map(lambda o: json.dumps(o).encode()),
    row_objects.map(lambda o: json.dumps(o, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    json_values.map(lambda o: json.dumps(o).encode()),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")),
    st.sampled_from([b"", b"   ", b"\r", b'{"text": "\\ud800 x"}', b'{"prompt": "a", "response": "\\udfff"}',
                     b'{"text": "ok", "id": "\\ud83d"}', b'{"text": "\\ud83d\\ude00 pair"}', b"[" * 5000,
                     b'{"text": ' * 3000, b'{"text": "' + b"x" * (MAX_LINE + 5) + b'"}', b"\xff\xfe{}"]),
)
files = st.tuples(st.lists(lines, max_size=12), st.sampled_from([b"\n", b"\r\n"]), st.booleans()).map(
    lambda t: t[1].join(t[0]) + (t[1] if t[2] and t[0] else b""))


def _check_reader(data: bytes, path: Path) -> tuple[int, set[int]]:
    path.write_bytes(data)
    stats = ReadStats()
    got = list(iter_jsonl(path, stats, max_line_bytes=MAX_LINE))
    want = {i + 1: expected(x, MAX_LINE) for i, x in enumerate(lines_of(data))}
    seen = {}
    for line_no, row in got:
        assert line_no not in seen, f"line {line_no} reported twice"
        seen[line_no] = "reject" if isinstance(row, Reject) else "row"
        if isinstance(row, Reject):
            assert row.file == str(path) and row.line == line_no and row.reason
    assert seen == {n: k for n, k in want.items() if k != "blank"}, (repr(data)[:300], seen, want)
    assert stats.rows == sum(k == "row" for k in seen.values())
    assert stats.rejects == sum(k == "reject" for k in seen.values())
    return stats.rows, {n for n, k in seen.items() if k == "reject"}


@settings(max_examples=300, deadline=None)
@given(files)
@example(b"[" * 100_000 + b"\n" + b'{"text": "after"}\n')
@example(b'{"text": "\\ud800"}\n{"text": "fine"}')
def test_every_jsonl_line_is_a_row_or_a_reject_with_file_and_line(data):
    with tempfile.TemporaryDirectory() as d:
        _check_reader(data, Path(d) / "in.jsonl")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=files)
@example(data=b'{"text": "ok"}\n{"text": "\\ud800 lone"}\n{"prompt": "\\udc00", "response": "r"}\n'
              b'{"text": "x", "id": "\\ud83d"}\n{"text": "y", "source": "\\ud83d"}\n' + b"[" * 100_000 + b"\n")
@example(data=b'{"text": "\xc2\x85"}')  # U+0085 is a line break to str.splitlines: rejects must split on "\n" only
def test_tokenizing_fuzzed_jsonl_never_crashes_and_accounts_for_every_line(small_corpus, data):
    d = Path(tempfile.mkdtemp())
    try:
        src = d / "in" / "x.jsonl"
        src.parent.mkdir()
        rows, rejected = _check_reader(data, src)
        if rows == 0:
            # no usable row (the oracle's count): refused under the default tokenize.min_rows=1, naming the
            # input and the key, and nothing published (issue 30 point 2: an empty rebuild is not a dataset)
            with pytest.raises(TooFewRowsError, match=rf"{re.escape(str(src))}.*tokenize.min_rows"):
                tokenize_to_parquet(src.parent, d / "out", small_corpus["tokenizer"], 16, val_fraction=0.0,
                                    max_line_bytes=MAX_LINE, skip_existing=False)
            assert not (d / "out" / "manifest.json").exists()
            return
        r = tokenize_to_parquet(src.parent, d / "out", small_corpus["tokenizer"], 16, val_fraction=0.0,
                                max_line_bytes=MAX_LINE, skip_existing=False)
        assert r["totals"]["docs"] == rows
        rej = [json.loads(x) for x in (d / "out" / "rejects.jsonl").read_text().split("\n") if x]
        assert [(x["file"], x["line"]) for x in rej] == [(str(src.resolve()), n) for n in sorted(rejected)] or \
               [(x["file"], x["line"]) for x in rej] == [(str(src), n) for n in sorted(rejected)]
        assert all(x["reason"] for x in rej)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- config dicts -----------------------------------------------------------------------------------
def _section_dicts(model: type[Section], depth: int = 0) -> st.SearchStrategy[dict]:
    """Dicts with some of ``model``'s real keys (nested sections recursed), values of any JSON type
    (sometimes a plausible one), and now and then a key that does not exist."""
    fields = {}
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, Section) and depth < 2:
            fields[name] = _section_dicts(ann, depth + 1) | json_values
        else:
            fields[name] = json_values | st.sampled_from([0, -1, 1, 2**40, 0.5, "auto", "", [1, 2], {}])
    return st.fixed_dictionaries({}, optional={**fields, "not_a_key": json_values, "Data": json_values})


@settings(max_examples=150, deadline=None)
@given(_section_dicts(PipelineConfig) | json_values)
@example({"train": {"batch_size": "eight"}})
@example({"train": {"sources": []}})
@example([1, 2])
@example({"data": {"sources": [{"name": 1}]}})
def test_any_config_dict_is_a_config_or_a_config_error_naming_a_key(d):
    try:
        cfg = config_from_dict(d)
    except ConfigError as err:
        msg = str(err)
        assert msg.startswith("invalid config"), msg
        assert re.search(r"(unknown key|key) '[^']+'", msg), msg
    else:
        assert isinstance(cfg, PipelineConfig)


# ---- teacher server request bodies --------------------------------------------------------------------
# The server's two body formats (DTK1 binary and JSON), fuzzed against the real app around a tiny Llama
# built here: every body gets 200 with the right shapes or a 4xx with an error message, never a 500;
# for bodies built from arrays, an independent oracle says which must be 200.
SRV_K, SRV_T, SRV_ELEMS, SRV_VOCAB = 4, 16, 256, 96


@pytest.fixture(scope="module")
def topk_client():
    import sys

    from fastapi.testclient import TestClient

    sys.path.insert(0, str(Path(__file__).parent.parent / "teacher"))
    from test_teachers_helpers import tiny_llama

    from distill_dag.teacher.providers.direct import DirectTeacher
    from distill_dag.teacher.server import create_app

    app = create_app(DirectTeacher(tiny_llama(SRV_VOCAB), SRV_K), k_max=SRV_K, max_seq_len=SRV_T,
                     max_request_elems=SRV_ELEMS, max_buffered_bytes=4 << 20, access_log_enabled=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _valid(ids: Any, pos: Any, k: Any) -> bool:
    """The oracle: is this request one the server must answer (200)?"""
    def int_matrix(a: Any) -> bool:
        return isinstance(a, np.ndarray) and a.dtype.kind == "i" and a.ndim == 2

    if not int_matrix(ids) or 0 in ids.shape or type(k) is not int or not 1 <= k <= SRV_K:
        return False
    B, T = ids.shape
    if T > SRV_T or B * T * k > SRV_ELEMS or ids.min() < 0 or ids.max() >= SRV_VOCAB:
        return False
    return pos is None or (int_matrix(pos) and pos.shape == ids.shape and pos.min() >= 0)


def _check_answer(r: Any, want_shape: tuple | None, must_succeed: bool | None, decode: Any) -> None:
    event(f"status {r.status_code}")
    assert r.status_code in (200, 400, 413), (r.status_code, r.text[:300])
    if must_succeed is not None:
        assert (r.status_code == 200) == must_succeed, (r.status_code, r.text[:300])
    if r.status_code == 200:
        idx, lp = decode(r)
        if want_shape is not None:
            assert idx.shape == lp.shape == want_shape
        assert idx.min() >= 0 and idx.max() < SRV_VOCAB and np.all(np.diff(lp, axis=-1) <= 0)
    else:
        err = r.json()["error"]
        assert isinstance(err, str) and err and "Traceback" not in err


def _decode_bin(r: Any) -> tuple[np.ndarray, np.ndarray]:
    from distill_dag.teacher.providers.network import decode_arrays

    out, _ = decode_arrays(r.content)
    return out["indices"], out["logprobs"]


def _decode_json(r: Any) -> tuple[np.ndarray, np.ndarray]:
    j = r.json()
    return np.array(j["indices"]), np.array(j["logprobs"])


_shapes = st.lists(st.integers(0, 20), min_size=0, max_size=3)
_dtypes = st.sampled_from(["<i4", "<i8", "<f4", "<f2"])
_id_values = st.sampled_from([0, 1, 95, 96, -1, 2**31 - 1, -2**31])


@st.composite
def _arrays(draw: Any) -> np.ndarray:
    """Half the time a plausible [B, T] integer array (most of those valid), else any shape and dtype."""
    plausible = draw(st.booleans())
    shape = [draw(st.integers(1, 4)), draw(st.integers(1, SRV_T + 1))] if plausible else draw(_shapes)
    dt = draw(st.sampled_from(["<i4", "<i8"]) if plausible else _dtypes)
    n = int(np.prod(shape))
    if plausible or draw(st.booleans()):
        vals = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, SRV_VOCAB, n)
    else:
        vals = np.array(draw(st.lists(_id_values, min_size=n, max_size=n)), dtype=np.int64)
    with np.errstate(all="ignore"):  # 2**31 as float16 is inf: one more bad id
        a = vals.reshape(shape).astype(dt)
    if dt in ("<f4", "<f2") and n and draw(st.booleans()):
        a.flat[0] = np.nan  # NaN ids
    return a


_k_values = st.integers(1, SRV_K) | st.integers(-2, SRV_K + 2) | st.sampled_from([1.0, 2.5, True, False, None, "2", [2], {"k": 2},
                                                           float("nan"), 2**70])


@st.composite
def _binary_requests(draw: Any) -> tuple[bytes, Any]:
    """(body, (ids, pos, k) when built from arrays, else None)."""
    from distill_dag.teacher.providers.network import encode_arrays

    ids = draw(_arrays())
    pos = draw(st.none() | st.just(np.abs(ids) if ids.dtype.kind == "i" else ids) | _arrays())
    arrays = {"input_ids": ids} if pos is None else {"input_ids": ids, "position_ids": pos}
    meta = draw(st.sampled_from(["k", "none", "junk"]))
    k = draw(_k_values)
    body = encode_arrays(arrays, {"k": k} if meta == "k" else ({} if meta == "none" else {"other": 1}))
    k_eff = k if meta == "k" else SRV_K
    how = draw(st.sampled_from(["as is"] * 4 + ["truncate", "flip", "append", "extra array"]))
    if how == "as is":
        return body, (ids, pos, k_eff)
    if how == "truncate":
        return body[: draw(st.integers(0, max(0, len(body) - 1)))], None
    if how == "flip":
        i = draw(st.integers(0, len(body) - 1))
        return body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :], None
    if how == "append":
        return body + draw(st.binary(min_size=1, max_size=16)), None
    return encode_arrays({**arrays, "attention_mask": np.ones((1, 1), "<i4")}, {"k": 1}), None


def _header_body(header: Any) -> bytes:
    import struct

    h = json.dumps(header).encode()
    return b"DTK1" + struct.pack("<I", len(h)) + h


_raw_binary = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda b: b"DTK1" + b),
    json_values.map(lambda v: _header_body(v)),
    st.fixed_dictionaries({}, optional={"arrays": json_values | st.lists(st.fixed_dictionaries(
        {}, optional={"name": json_values | st.sampled_from(["input_ids", "position_ids"]),
                      "dtype": json_values | _dtypes, "shape": json_values | st.lists(
                          st.integers(-2, 2**40) | st.booleans() | st.floats(), max_size=3)}), max_size=3),
        "meta": json_values}).map(_header_body),
)


@settings(max_examples=150, deadline=None)
@given(_binary_requests())
@example((b"", None))
@example((b"DTK1", None))
@example((_header_body({"arrays": [{"name": "input_ids", "dtype": "<i4", "shape": [2**62, 2**62]}]}), None))
@example((_header_body({"arrays": [{"name": "input_ids", "dtype": "<i4", "shape": [True, 1]}], "meta": {}}), None))
def test_fuzzed_binary_topk_bodies_get_200_or_a_4xx_never_a_500(topk_client, req):
    body, spec = req
    r = topk_client.post("/v1/topk", content=body, headers={"Content-Type": "application/x-distill-topk"})
    if spec is None:
        _check_answer(r, None, None, _decode_bin)
    else:
        ids, pos, k = spec
        ok = _valid(ids, pos, k)
        _check_answer(r, (*ids.shape, k) if ok else None, ok, _decode_bin)


@settings(max_examples=100, deadline=None)
@given(_raw_binary)
def test_fuzzed_raw_binary_bodies_and_headers_are_4xx_never_a_500(topk_client, body):
    r = topk_client.post("/v1/topk", content=body, headers={"Content-Type": "application/x-distill-topk"})
    _check_answer(r, None, None, _decode_bin)


_json_ids = st.one_of(
    st.lists(st.lists(st.integers(0, SRV_VOCAB - 1), min_size=1, max_size=6), min_size=1, max_size=3),
    st.lists(st.integers(0, SRV_VOCAB - 1), max_size=20),
    st.lists(st.lists(st.integers(-3, 2**65) | st.floats(allow_nan=True) | st.booleans() | st.none(), max_size=4),
             max_size=3),
    json_values,
)


def _json_oracle(obj: dict) -> tuple[bool, tuple | None]:
    ids, k = obj.get("input_ids"), obj.get("k", SRV_K)
    pos = obj.get("position_ids")
    if set(obj) - {"input_ids", "position_ids", "k"} or not isinstance(ids, list) or not ids:
        return False, None
    flat = not isinstance(ids[0], list)
    rows = [ids] if flat else ids
    if not all(isinstance(r, list) and r and all(type(x) is int for x in r) and len(r) == len(rows[0])
               for r in rows):
        return False, None
    a = np.array(rows, dtype=object)
    if pos is not None:
        if not isinstance(pos, list) or not pos or (not isinstance(pos[0], list)) != flat:
            return False, None
        prows = [pos] if flat else pos
        if not all(isinstance(r, list) and all(type(x) is int and 0 <= x < 2**31 for x in r) for r in prows):
            return False, None
        if [len(r) for r in prows] != [len(r) for r in rows]:
            return False, None
    if type(k) is not int or not 1 <= k <= SRV_K:
        return False, None
    B, T = a.shape
    if T > SRV_T or B * T * k > SRV_ELEMS or min(a.flat) < 0 or max(a.flat) >= SRV_VOCAB:
        return False, None
    return True, ((T, k) if flat else (B, T, k))


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries({"input_ids": _json_ids}, optional={"k": _k_values, "position_ids": json_values | _json_ids,
                                                                  "extra": json_values}) | json_values)
@example({"input_ids": [1, 2, 3], "k": 2})
@example({"input_ids": [[1, 2], [3, 4]]})
@example({"input_ids": [float("nan")]})
@example({"input_ids": [], "k": 1})
@example({"input_ids": [[]]})
@example({"input_ids": [1.0, 2.0]})
@example({"input_ids": [True, False]})
@example({"input_ids": [[1, 2], [3]]})
@example({"input_ids": [1], "k": 1.0})
@example({"input_ids": [1], "k": True})
@example({"input_ids": [2**64]})
@example({"input_ids": [[1, 2]], "position_ids": [[0, 1]]})
@example({"input_ids": [1, 2], "position_ids": [[0, 1]]})
@example({"input_ids": [1, 2], "position_ids": [0, -1]})
@example([[1, 2, 3]])
@example("input_ids")
def test_fuzzed_json_topk_bodies_get_200_or_a_4xx_never_a_500(topk_client, obj):
    body = json.dumps(obj).encode()  # NaN and Infinity go out as JSON's non-standard constants
    r = topk_client.post("/v1/topk", content=body, headers={"Content-Type": "application/json"})
    if isinstance(obj, dict):
        ok, shape = _json_oracle(obj)
        _check_answer(r, shape, ok, _decode_json)
    else:
        _check_answer(r, None, False, _decode_json)


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=80) | st.text(max_size=40).map(str.encode)
       | st.sampled_from([b"{", b'{"input_ids": [NaN]}', b'{"input_ids": [Infinity], "k": 1}', b"[" * 5000,
                          b'{"input_ids": ' * 3000, b"\xff\xfe{}", b'{"input_ids": [1]} trailing']))
def test_fuzzed_raw_json_bodies_are_400_never_a_500(topk_client, body):
    r = topk_client.post("/v1/topk", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    _check_answer(r, None, None, _decode_json)


@pytest.mark.parametrize("body, field", [
    ({"input_ids": [[1, 2]], "k": 2, "meta": [1]}, "unknown fields ['meta']"),
    ({"input_ids": [float("nan")]}, "NaN"),
    ({"input_ids": [[]]}, "input_ids is empty"),
    ({"input_ids": [1.0, 2]}, "input_ids must hold integers only, got float 1.0"),
    ({"input_ids": [True]}, "input_ids must hold integers only, got bool True"),
    ({"input_ids": [1], "k": 2.0}, "k must be an integer, got float 2.0"),
    ({"input_ids": [1], "k": False}, "k must be an integer, got bool False"),
    ({"input_ids": [1], "k": 99}, f"k=99 outside [1, {SRV_K}]"),
    ({"input_ids": [1, 96]}, f"token id 96 outside [0, {SRV_VOCAB})"),
])
def test_each_malformed_json_field_is_a_400_that_names_it(topk_client, body, field):
    r = topk_client.post("/v1/topk", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and field in r.json()["error"], r.text


@pytest.mark.parametrize("case, field", [
    ("meta as a list", "'meta' must be an object, not list"),
    ("meta as a string", "'meta' must be an object, not str"),
    ("NaN ids", "input_ids must be int32 or int64, got float32"),
    ("empty shape", "input_ids is empty"),
    ("no rows", "input_ids is empty"),
    ("1-D ids", "input_ids must be [B, T], got shape [3]"),
    ("float k", "k must be an integer, got float 2.0"),
    ("bool k", "k must be an integer, got bool True"),
    ("NaN k", "k must be an integer, got float nan"),
    ("float positions", "position_ids must be int32 or int64"),
    ("negative positions", "position_ids must be in [0,"),
    ("positions of another shape", "position_ids shape [1, 2] != input_ids shape [1, 3]"),
    ("arrays as a string", "'arrays' must be a list, not str"),
    ("array spec not an object", "bad array spec 1"),
    ("bool dimension", "bad array spec"),
])
def test_each_malformed_binary_field_is_a_400_that_names_it(topk_client, case, field):
    from distill_dag.teacher.providers.network import encode_arrays

    ids = np.array([[1, 2, 3]], "<i4")
    body = {
        "meta as a list": lambda: _header_body({"arrays": [], "meta": [1]}),
        "meta as a string": lambda: _header_body({"arrays": [], "meta": "k=2"}),
        "NaN ids": lambda: encode_arrays({"input_ids": np.full((1, 3), np.nan, "<f4")}),
        "empty shape": lambda: encode_arrays({"input_ids": np.zeros((1, 0), "<i4")}),
        "no rows": lambda: encode_arrays({"input_ids": np.zeros((0, 3), "<i4")}),
        "1-D ids": lambda: encode_arrays({"input_ids": ids[0]}),
        "float k": lambda: encode_arrays({"input_ids": ids}, {"k": 2.0}),
        "bool k": lambda: encode_arrays({"input_ids": ids}, {"k": True}),
        "NaN k": lambda: encode_arrays({"input_ids": ids}, {"k": float("nan")}),
        "float positions": lambda: encode_arrays({"input_ids": ids, "position_ids": ids.astype("<f4")}),
        "negative positions": lambda: encode_arrays({"input_ids": ids, "position_ids": -ids}),
        "positions of another shape": lambda: encode_arrays({"input_ids": ids, "position_ids": ids[:, :2]}),
        "arrays as a string": lambda: _header_body({"arrays": "input_ids"}),
        "array spec not an object": lambda: _header_body({"arrays": [1]}),
        "bool dimension": lambda: _header_body({"arrays": [{"name": "input_ids", "dtype": "<i4", "shape": [True]}]}),
    }[case]()
    r = topk_client.post("/v1/topk", content=body, headers={"Content-Type": "application/x-distill-topk"})
    assert r.status_code == 400 and field in r.json()["error"], r.text
