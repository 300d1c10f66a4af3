"""Robust JSONL reading: every kind of bad line is skipped and reported with file, line and reason."""

from __future__ import annotations

import json

import pytest

from distill_dag.data.jsonl import ReadStats, Reject, RejectRateError, check_reject_rate, iter_jsonl


def _read(path, **kw):
    stats = ReadStats()
    items = list(iter_jsonl(path, stats, **kw))
    rows = [(n, r) for n, r in items if not isinstance(r, Reject)]
    rejects = [r for _, r in items if isinstance(r, Reject)]
    return rows, rejects, stats


def test_each_kind_of_bad_line_is_rejected_with_its_line_number_and_reason(tmp_path):
    lines = [
        json.dumps({"text": "good one"}).encode(),                    # 1 ok
        b'{"text": "unterminated',                                    # 2 malformed
        '{"text": "caf\u00e9"}'.encode("latin-1"),                    # 3 not UTF-8
        json.dumps({"title": "no text"}).encode(),                    # 4 missing text
        json.dumps({"text": 42}).encode(),                            # 5 non-string text
        b"",                                                          # 6 blank: neither row nor reject
        json.dumps({"prompt": "q?", "response": "a"}).encode(),       # 7 ok
        json.dumps({"prompt": "q?"}).encode(),                        # 8 response missing
        json.dumps(["a", "list"]).encode(),                           # 9 not an object
        json.dumps({"text": "   "}).encode(),                         # 10 empty text
        json.dumps({"prompt": "q", "response": None}).encode(),       # 11 non-string response
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, rejects, stats = _read(path)
    assert [n for n, _ in rows] == [1, 7]
    assert [r["text"] if "text" in r else r["response"] for _, r in rows] == ["good one", "a"]
    got = {r.line: r.reason for r in rejects}
    assert sorted(got) == [2, 3, 4, 5, 8, 9, 10, 11]
    assert got[2].startswith("malformed JSON")
    assert got[3].startswith("not UTF-8")
    assert "no 'text' field" in got[4]
    assert got[5] == "field 'text' is int, expected a string"
    assert "'response' is missing" in got[8]
    assert "JSON list" in got[9]
    assert got[10] == "field 'text' is empty"
    assert got[11] == "field 'response' is NoneType, expected a string"
    assert all(r.file == str(path) for r in rejects)
    assert (stats.rows, stats.rejects) == (2, 8)
    assert stats.bytes == path.stat().st_size


def test_50mb_line_is_rejected_and_the_following_rows_still_read(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"text": "before"}).encode() + b"\n")
        f.write(b'{"text": "' + b"x" * (50 * 2**20) + b'"}\n')
        f.write(json.dumps({"text": "after"}).encode() + b"\n")
    rows, rejects, stats = _read(path)
    assert [r["text"] for _, r in rows] == ["before", "after"]
    assert [r.line for r in rejects] == [2]
    assert "over max_line_bytes" in rejects[0].reason and str(50 * 2**20 + 13) in rejects[0].reason
    assert len(rejects[0].excerpt) <= 120


def test_empty_file_yields_nothing(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    rows, rejects, stats = _read(path)
    assert rows == [] and rejects == [] and stats.rows == stats.rejects == 0


def test_last_line_without_newline_is_read(tmp_path):
    path = tmp_path / "nonl.jsonl"
    path.write_bytes(b'{"text": "x"}\n{"text": "y"}')
    rows, _, _ = _read(path)
    assert [r["text"] for _, r in rows] == ["x", "y"]


def test_reject_rate_error_only_above_the_configured_rate():
    stats = ReadStats(rows=95, rejects=5)
    stats.reasons["malformed JSON"] = 5
    check_reject_rate(stats, 0.05, "src")  # exactly at the limit: fine
    check_reject_rate(stats, None, "src")  # None: never fails
    with pytest.raises(RejectRateError) as e:
        check_reject_rate(stats, 0.04, "data.sources 'x'", "/r/rejects.jsonl")
    msg = str(e.value)
    assert "5 of 100 rows" in msg and "malformed JSON: 5" in msg and "/r/rejects.jsonl" in msg
    assert "max_reject_rate" in msg


def test_the_orjson_fast_path_reads_exactly_what_the_stdlib_path_reads(tmp_path, monkeypatch):
    """Rows, reject reasons and counts are the same with and without orjson, on lines where the two
    parsers disagree (big ints, NaN, lone surrogates, deep nesting, BOM) and on plain ones."""
    from distill_dag.data import jsonl

    lines = [
        b'{"text": "plain", "id": 7, "source": "s", "flag": true, "none": null}',
        b'{"text": "big id", "id": 123456789012345678901234567890}',      # orjson: a float
        b'{"text": "max u64", "id": 18446744073709551615}',
        b'{"text": "float id", "id": 1.5e300}',
        b'{"text": "nan", "score": NaN}',                                  # orjson refuses NaN
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "pair \\ud83d\\ude00"}',
        b'{"text": "nested", "meta": {"a": [1, 2.5, {"b": null}]}}',
        b"[" * 3000 + b"]" * 3000,
        b'\xef\xbb\xbf{"text": "bom"}',
        b'{"text": 123456789012345678901234567890}',                      # non-string text: int, not float
        b'{"prompt": "p", "response": "r", "id": "x", "id": "y"}',        # duplicate key: the last wins
        b'{"text": "caf\xe9"}',
        b'{"text": "a\x01b"}',
        b'"just a string"',
    ]
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    fast = _read(f)
    monkeypatch.setattr(jsonl, "orjson", None)
    slow = _read(f)
    assert repr(fast[0]) == repr(slow[0])  # repr: 1.2e29 == 123...890 as numbers, not as ids
    assert [r.to_dict() for r in fast[1]] == [r.to_dict() for r in slow[1]]
    assert fast[2].to_dict() == slow[2].to_dict()
    assert len(fast[0]) == 8 and len(fast[1]) == 7
