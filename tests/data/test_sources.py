"""Raw sources -> JSONL parts: stdlib text, local JSONL, local HF datasets; resume without duplicates."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest

from distill_dag.config import PipelineConfig, SourceConfig
from distill_dag.data.jsonl import Reject, RejectRateError
from distill_dag.data.sources import decode_python_source, gather_sources, write_parts



def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, *sources, rows_per_part=1000, max_reject_rate=0.05) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.data.root = str(tmp_path / "data")
    cfg.data.rows_per_part = rows_per_part
    cfg.data.max_reject_rate = max_reject_rate
    cfg.data.sources = list(sources)
    return cfg


def _rows(d: Path) -> list[dict]:
    return [json.loads(x) for p in sorted(d.glob("part-*.jsonl")) for x in p.read_text().splitlines()]


def test_stdlib_source_is_the_real_stdlib_in_sorted_order_up_to_max_bytes(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    # independent listing: os.walk, sorted relative paths, stop once the size total reaches max_bytes
    found = []
    for d, dirs, files in os.walk(root):
        rel_d = Path(d).relative_to(root)
        if {"site-packages", "dist-packages", "__pycache__"} & set(rel_d.parts):
            continue
        found += [(rel_d / f).as_posix() for f in files if f.endswith(".py")]
    expected, total = [], 0
    for rel in sorted(found):
        if total >= 200_000:
            break
        expected.append(rel)
        total += (root / rel).stat().st_size
    cfg = _cfg(tmp_path, SourceConfig(name="std", kind="stdlib", max_bytes=200_000), rows_per_part=7)
    res = gather_sources(cfg)["std"]
    rows = _rows(cfg.data_root / "raw/std")
    nonempty = [r for r in expected if (root / r).read_bytes().strip()]
    assert [r["id"] for r in rows] == [f"std:{r}" for r in nonempty]
    assert res["rows"] == len(nonempty) and res["skipped"] == len(expected) - len(nonempty)
    assert res["files"] == -(-len(nonempty) // 7)
    assert res["bytes"] == sum(p.stat().st_size for p in (cfg.data_root / "raw/std").glob("part-*.jsonl"))
    for r in rows[:20]:
        assert r["text"] == (root / r["id"][4:]).read_text(encoding="utf-8")
        assert (r["source"], r["category"]) == ("std", "general")


def test_non_utf8_python_files_are_decoded_by_their_coding_cookie():
    src = "# -*- coding: latin-1 -*-\nname = 'caf\u00e9'\n"
    assert decode_python_source(src.encode("latin-1")) == (src, "iso-8859-1")  # tokenize's name for latin-1
    assert decode_python_source("x = 'caf\u00e9'\n".encode()) == ("x = 'caf\u00e9'\n", "utf-8")
    text, how = decode_python_source(b"x = '\xff\xfe'\n")  # no cookie, not UTF-8
    assert how == "replace" and "\ufffd" in text
    koi8 = Path(sysconfig.get_paths()["stdlib"]) / "test/encoded_modules/module_koi8_r.py"
    if koi8.exists():  # a real stdlib file that is not UTF-8
        text, how = decode_python_source(koi8.read_bytes())
        assert how == "koi8-r" and "\u0410" <= max(text) and "\ufffd" not in text


def test_jsonl_source_normalises_rows_and_rejects_bad_lines(tmp_path):
    src_dir = tmp_path / "in"
    write_jsonl(src_dir / "x.jsonl", [{"text": "one"}, {"prompt": "q", "response": "a", "id": "mine", "category": "qa"}])
    write_jsonl(src_dir / "sub/x.jsonl", [{"text": "two"}])
    (src_dir / "sub/x.jsonl").open("a").write("not json\n")
    write_jsonl(src_dir / "_skipped.jsonl", [{"text": "bookkeeping files are not inputs"}])
    cfg = _cfg(tmp_path, SourceConfig(name="loc", kind="jsonl", path=str(src_dir), category="web"), max_reject_rate=0.5)
    res = gather_sources(cfg)["loc"]
    assert (res["rows"], res["rejects"]) == (3, 1)
    assert _rows(cfg.data_root / "raw/loc") == [  # files in sorted path order: in/sub/x.jsonl < in/x.jsonl
        {"text": "two", "id": "loc:sub/x.jsonl:1", "source": "loc", "category": "web"},
        {"text": "one", "id": "loc:x.jsonl:1", "source": "loc", "category": "web"},
        {"prompt": "q", "response": "a", "id": "mine", "category": "qa", "source": "loc"},
    ]
    rej = [json.loads(x) for p in (cfg.data_root / "raw/loc").glob("_rejects-*.jsonl") for x in p.read_text().splitlines()]
    assert rej == [{"file": str(src_dir / "sub/x.jsonl"), "line": 2, "reason": rej[0]["reason"], "excerpt": "not json\n"}]
    assert rej[0]["reason"].startswith("malformed JSON")


def test_source_above_the_reject_rate_fails_naming_the_source(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{oops\n{"nope": 1}\n')
    cfg = _cfg(tmp_path, SourceConfig(name="bad", kind="jsonl", path=str(f)), max_reject_rate=0.5)
    with pytest.raises(RejectRateError, match="data.sources 'bad': 2 of 3 rows rejected"):
        gather_sources(cfg)


def test_hf_source_reads_a_local_saved_dataset_with_field_map(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"question": ["2+2?", "3+3?", "4+4?"], "answer": ["4", "6", None],
                                     "meta": [{"lvl": "a"}, {"lvl": "b"}, {"lvl": "c"}]})
    ds.save_to_disk(str(tmp_path / "saved"))
    src = SourceConfig(name="qa", kind="hf", dataset=str(tmp_path / "saved"), category="math",
                       field_map={"prompt": "question", "response": "answer", "category": "meta.lvl"})
    cfg = _cfg(tmp_path, src, max_reject_rate=0.5)
    res = gather_sources(cfg)["qa"]
    assert (res["rows"], res["rejects"]) == (2, 1)  # the None answer is a reject
    assert _rows(cfg.data_root / "raw/qa") == [
        {"prompt": "2+2?", "response": "4", "category": "a", "id": "qa:0", "source": "qa"},
        {"prompt": "3+3?", "response": "6", "category": "b", "id": "qa:1", "source": "qa"},
    ]


def test_hf_source_reads_a_local_data_file_with_max_rows(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"content": f"doc {i}"} for i in range(10)])
    src = SourceConfig(name="t", kind="hf", dataset=str(tmp_path / "t.jsonl"), field_map={"text": "content"}, max_rows=4)
    res = gather_sources(_cfg(tmp_path, src))["t"]
    assert res["rows"] == 4
    assert [r["text"] for r in _rows(tmp_path / "data/raw/t")] == [f"doc {i}" for i in range(4)]


def test_interrupted_gather_resumes_without_duplicating_rows(tmp_path):
    items = [{"text": f"row {i}", "id": str(i)} for i in range(23)]

    def items_from(start):
        yield from items[start:]

    class Boom(Exception):
        pass

    def dying(start):  # the same stream, but the process "dies" at item 17
        for i, it in enumerate(items[start:], start):
            if i == 17:
                raise Boom
            yield it

    out = tmp_path / "src"
    with pytest.raises(Boom):
        write_parts(out, "fp", dying, 5)
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    calls = []
    res = write_parts(out, "fp", lambda s: calls.append(s) or items_from(s), 5)
    assert calls == [15]  # resumed after the 3 committed parts
    assert [r["id"] for r in _rows(out)] == [str(i) for i in range(23)]
    clean = write_parts(tmp_path / "clean", "fp", items_from, 5)
    for p in (tmp_path / "clean").glob("part-*.jsonl"):
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert {k: res[k] for k in ("rows", "bytes", "files")} == {k: clean[k] for k in ("rows", "bytes", "files")}
    # done: a rerun reads nothing; a changed fingerprint starts over
    assert write_parts(out, "fp", lambda s: calls.append(s) or items_from(s), 5)["rows"] == 23 and calls == [15]
    assert write_parts(out, "fp2", lambda s: iter(items[:3]), 5)["rows"] == 3
    assert [r["id"] for r in _rows(out)] == ["0", "1", "2"]


def test_rejects_and_skips_between_parts_are_kept(tmp_path):
    items = [{"text": "a"}, Reject("f", 2, "bad"), None, Reject("f", 4, "worse"), {"text": "b"}]
    res = write_parts(tmp_path / "s", "fp", lambda s: iter(items[s:]), 1)
    assert (res["rows"], res["rejects"], res["skipped"]) == (2, 2, 1)
    rej = sorted(json.loads(x)["line"] for p in (tmp_path / "s").glob("_rejects-*.jsonl") for x in p.read_text().splitlines())
    assert rej == [2, 4]


def test_unique_source_names_are_required(tmp_path):
    cfg = _cfg(tmp_path, SourceConfig(name="a", kind="stdlib"), SourceConfig(name="a", kind="stdlib"))
    # assigned after construction, so the config's own check did not run: the gather checks again
    with pytest.raises(ValueError, match=r"data\.sources\[1\]\.name': 'a' names the same folder as data\.sources\[0\]"):
        gather_sources(cfg, dry_run=True)


def test_catalog_dataset_names_that_are_paths_are_refused_before_anything_is_written(tmp_path):
    """A catalog dataset's name is a folder under raw/<source>/: a user catalog naming one '../../x' would
    write (and clean part files) outside the data root."""
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    victim = write_jsonl(tmp_path / "x" / "part-00000.jsonl", [{"text": "not ours"}])
    (tmp_path / "cat.yaml").write_text(
        "categories: {math: m}\n"
        f"datasets:\n  - {{name: ../../../x, hub_id: '{data}', split: train, category: math, samples: 1, "
        "formatter: gsm8k}\n")
    cfg = _cfg(tmp_path, SourceConfig(name="cat", kind="catalog", path=str(tmp_path / "cat.yaml"), categories=["math"]))
    with pytest.raises(ValueError, match=r"names datasets that cannot be folder names: '\.\./\.\./\.\./x' is not a safe"):
        gather_sources(cfg)
    assert victim.read_text() == '{"text": "not ours"}\n'
    assert not (tmp_path / "data" / "raw" / "cat").exists() or not any((tmp_path / "data" / "raw" / "cat").iterdir())
