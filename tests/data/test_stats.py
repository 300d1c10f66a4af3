"""DuckDB stats and checks over the shards, against plain-Python references computed from the rows."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_dag.data import stats
from distill_dag.data.manifest import Manifest
from distill_dag.data.pack import tokenize_to_parquet


@pytest.fixture(scope="module")
def built(tmp_path_factory, stdlib_raw, bpe_tokenizer):
    root = tmp_path_factory.mktemp("stats")
    src = root / "in"
    for f in sorted(stdlib_raw.rglob("*.jsonl")):
        (src / f.relative_to(stdlib_raw)).parent.mkdir(parents=True, exist_ok=True)
        (src / f.relative_to(stdlib_raw)).write_text(f.read_text())
    rows = [json.loads(x) for x in (stdlib_raw / "a/docs.jsonl").read_text().splitlines()][:5]
    dup = [dict(r, id=r["id"] + "#copy", source="dup") for r in rows]  # 5 duplicated documents
    qa = [{"prompt": f"Q{i}: what is {i}?\n", "response": f"It is {i}.", "id": f"qa{i}", "source": "qa"} for i in range(30)]
    (src / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dup + qa))
    out = root / "out"
    tokenize_to_parquet(src, out, bpe_tokenizer[0], 96, val_fraction=0.0, rows_per_shard=300)
    return out


def _reference(out: Path) -> dict:
    m = Manifest.load(out)
    per_source = Counter()
    tokens = masked = 0
    docs, cur, doc_lens = [], [], []
    for s in m.shards:
        t = pq.read_table(out / s.path).to_pydict()
        for ids, att, lab, pos, src in zip(t["input_ids"], t["attention_mask"], t["labels"], t["position_ids"], t["source"]):
            per_source[src] += sum(att)
            for tok, a, l, p in zip(ids, att, lab, pos):
                if not a:
                    continue
                tokens += 1
                masked += l == -100
                if p == 0 and cur:
                    docs.append(tuple(cur))
                    cur = []
                cur.append(tok)
                if tok == m.eos_id:
                    doc_lens.append(p + 1)
    docs.append(tuple(cur))
    return {"per_source": dict(per_source), "tokens": tokens, "masked": masked / tokens, "docs": docs, "doc_lens": doc_lens}


def test_stats_match_a_python_reference(built):
    s = stats.data_stats(built)
    ref = _reference(built)
    assert {r["source"]: r["tokens"] for r in s["tokens_per_source"]} == ref["per_source"]
    assert s["tokens"] == ref["tokens"]
    assert s["masked_label_fraction"] == pytest.approx(ref["masked"])
    assert s["documents"] == len(ref["docs"]) == len(ref["doc_lens"])
    dups = len(ref["docs"]) - len(set(ref["docs"]))
    assert dups >= 5  # the 5 copies (the stdlib itself may hold identical files too)
    assert s["duplicate_document_rate"] == pytest.approx(dups / len(ref["docs"]))
    hist = {h["from"]: h["count"] for h in s["document_length_histogram"]}
    for lo, c in hist.items():
        assert c == sum(1 for n in ref["doc_lens"] if lo <= n < 2 * lo or (lo == max(hist) and n >= lo))
    assert sum(h["count"] for h in s["sequence_length_histogram"]) == s["rows"] == Manifest.load(built).totals["train"]["rows"]


def test_as_metadata_is_plain_data_tables_as_row_dicts_not_markdown(built):
    """Formatting (markdown, Dagster metadata) belongs to the Dagster layer; the data layer gives rows."""
    s = stats.data_stats(built)
    md = stats.as_metadata(s)
    assert md["tokens_per_source"] == s["tokens_per_source"] and list(md["tokens_per_source"][0]) == [
        "source", "rows", "tokens"]
    assert md["sequence_length_histogram"] == s["sequence_length_histogram"]
    assert not [k for k, v in md.items() if isinstance(v, str)]  # no pre-formatted text
    import json

    json.dumps(md)  # plain JSON-able values


def test_checks_pass_on_good_shards(built):
    checks = stats.run_checks(built)
    assert set(checks) == {"rows_fit_max_seq_length", "labels_aligned_with_input_ids", "manifest_matches_files"}
    assert all(ok for ok, _ in checks.values()), checks


def _rewrite_first_shard(src: Path, dst: Path, edit) -> None:
    import shutil

    shutil.copytree(src, dst)
    m = Manifest.load(dst)
    p = dst / m.shards[0].path
    d = pq.read_table(p).to_pydict()
    edit(d)
    pq.write_table(pa.Table.from_pydict(d, schema=pq.read_schema(p)), p)
    from distill_dag.io import sha256_file

    m.shards[0].sha256, m.shards[0].bytes = sha256_file(p), p.stat().st_size  # a consistent manifest
    m.save(dst)


def test_checks_fail_on_misaligned_labels_and_overlong_rows(built, tmp_path):
    def shift_labels(d):
        d["labels"][3] = d["labels"][3][1:] + [-100]  # HF-style shifted labels: the trap the check catches

    _rewrite_first_shard(built, tmp_path / "shifted", shift_labels)
    ok, msg = stats.check_labels_aligned(tmp_path / "shifted")
    assert not ok and "differ from input_ids" in msg

    def overlong(d):
        for k in ("input_ids", "labels", "position_ids", "attention_mask"):
            d[k][0] = d[k][0] + [d[k][0][-1]]

    _rewrite_first_shard(built, tmp_path / "long", overlong)
    ok, msg = stats.check_row_lengths(tmp_path / "long")
    assert not ok and "1 rows longer than max_seq_length 96" in msg


def test_manifest_check_fails_on_missing_or_extra_files(built, tmp_path):
    import shutil

    shutil.copytree(built, tmp_path / "x")
    m = Manifest.load(tmp_path / "x")
    shutil.copy(tmp_path / "x" / m.shards[0].path, tmp_path / "x/train-09999.parquet")
    ok, msg = stats.check_manifest_files(tmp_path / "x")
    assert not ok and "train-09999.parquet" in msg
    (tmp_path / "x/train-09999.parquet").unlink()
    # a shard in a generation folder the manifest does not name (a killed run's) is extra too
    (tmp_path / "x/gen-leftover").mkdir()
    shutil.copy(tmp_path / "x" / m.shards[0].path, tmp_path / "x/gen-leftover/train-00000.parquet")
    ok, msg = stats.check_manifest_files(tmp_path / "x")
    assert not ok and "gen-leftover/train-00000.parquet" in msg
    shutil.rmtree(tmp_path / "x/gen-leftover")
    (tmp_path / "x" / m.shards[-1].path).unlink()
    ok, msg = stats.check_manifest_files(tmp_path / "x")
    assert not ok and f"{m.shards[-1].path}: missing" in msg
