"""Hypothesis fuzzing of the two doors bad input comes through: JSONL bytes and config dicts.

JSONL: every non-blank line is either a row or a reject carrying its file and line number, with the
decision of an independent oracle below; nothing crashes, in the reader nor in tokenization.
Config: any dict gives a PipelineConfig or a ConfigError naming a key, never another exception.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from distill_dag.config import ConfigError, PipelineConfig, Section, config_from_dict
from distill_dag.data.jsonl import ReadStats, Reject, iter_jsonl
from distill_dag.data.pack import tokenize_to_parquet

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
