"""Data statistics and checks over the parquet shards, with DuckDB.

Stats (:func:`data_stats`): tokens per source, sequence-length histogram (attended tokens per
row), document-length histogram, fraction of label tokens masked, duplicate-document rate.
Documents are recovered from the shards alone: a document ends at an attended EOS token, and
its length is that EOS's ``position_ids`` + 1 (positions count from the document start and
continue across rows). Duplicates are found by hashing each document's token list, rebuilt by
ordering tokens (shard, row, index) and numbering documents by the running count of
``position_ids == 0``.

Checks return ``(passed, description)`` for ``@asset_check`` or tests: no row longer than
max_seq_length, labels aligned with input_ids (``labels[i]`` in ``{input_ids[i], -100}``), the
manifest matches the files on disk.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any

import duckdb

from distill_dag.data.manifest import Manifest
from distill_dag.data.shards import CorruptShardError, shard_files, verify_shards


def _connect(m: Manifest, split: str | None = None,
             con: duckdb.DuckDBPyConnection | None = None) -> tuple[duckdb.DuckDBPyConnection, str]:
    """A connection (``con`` or a new in-memory one) with view
    ``rows(shard, row, input_ids, attention_mask, labels, position_ids, source, split)``."""
    con = con if con is not None else duckdb.connect()
    shards = [(i, s) for i, s in enumerate(m.shards) if split is None or s.split == split]
    if not shards:
        con.execute("CREATE OR REPLACE VIEW rows AS SELECT NULL::INT AS shard, NULL::BIGINT AS row, []::INT[] AS input_ids, "
                    "[]::TINYINT[] AS attention_mask, []::INT[] AS labels, []::INT[] AS position_ids, "
                    "NULL::VARCHAR AS source, NULL::VARCHAR AS split WHERE false")
        return con, "rows"
    parts = []
    for i, s in shards:
        path = str(m.shard_path(s)).replace("'", "''")
        parts.append(f"SELECT {i} AS shard, file_row_number AS row, input_ids, attention_mask, labels, "
                     f"position_ids, source, '{s.split}' AS split FROM read_parquet('{path}', file_row_number = true)")
    con.execute("CREATE OR REPLACE VIEW rows AS " + " UNION ALL ".join(parts))
    return con, "rows"


def _tokens_view(con: duckdb.DuckDBPyConnection) -> None:
    # one line per token; the parallel unnest zips the lists, generate_subscripts gives the index
    con.execute("""
        CREATE OR REPLACE VIEW toks AS
        SELECT shard, row, split, source,
               unnest(input_ids) AS tok, unnest(attention_mask) AS att, unnest(labels) AS lab,
               unnest(position_ids) AS pos, generate_subscripts(input_ids, 1) AS idx
        FROM rows
    """)


def histogram(values: list[int], bins: list[int]) -> list[dict[str, Any]]:
    """Counts of ``values`` in ``[bins[i], bins[i+1])`` (the last bin is open-ended)."""
    counts = [0] * len(bins)
    for v in values:
        counts[max(0, bisect.bisect_right(bins, v) - 1)] += 1
    return [{"from": b, "to": bins[i + 1] if i + 1 < len(bins) else None, "count": c} for i, (b, c) in enumerate(zip(bins, counts))]


def _pow2_bins(hi: int) -> list[int]:
    bins = [1]
    while bins[-1] * 2 <= max(hi, 1):
        bins.append(bins[-1] * 2)
    return bins


def data_stats(data_dir: str | os.PathLike, split: str | None = None,
               con: duckdb.DuckDBPyConnection | None = None) -> dict[str, Any]:
    """Statistics of the shards in ``data_dir`` (one split, or all with None)."""
    m = Manifest.load(data_dir)
    con, _ = _connect(m, split, con)
    _tokens_view(con)
    per_source = con.execute("""
        SELECT source, count(*) AS rows, sum(list_sum(attention_mask)) AS tokens FROM rows
        GROUP BY source ORDER BY tokens DESC
    """).fetchall()
    totals = con.execute("""
        SELECT count(*), coalesce(sum(att), 0), coalesce(sum(CASE WHEN att = 1 AND lab = -100 THEN 1 ELSE 0 END), 0)
        FROM toks
    """).fetchone()
    tokens, masked = int(totals[1]), int(totals[2])
    seq_lens = [int(r[0]) for r in con.execute("SELECT list_sum(attention_mask) FROM rows").fetchall()]
    doc_lens = [int(r[0]) for r in con.execute(
        f"SELECT pos + 1 FROM toks WHERE att = 1 AND tok = {int(m.eos_id)}").fetchall()]
    dup = con.execute("""
        WITH numbered AS (
            SELECT split, tok, shard, row, idx,
                   sum(CASE WHEN pos = 0 THEN 1 ELSE 0 END) OVER (PARTITION BY split ORDER BY shard, row, idx) AS doc
            FROM toks WHERE att = 1
        ), docs AS (
            SELECT split, doc, hash(list(tok ORDER BY shard, row, idx)) AS h FROM numbered GROUP BY split, doc
        )
        SELECT count(*), count(DISTINCT h) FROM docs
    """).fetchone()
    n_docs, n_distinct = int(dup[0]), int(dup[1])
    return {
        "split": split or "all",
        "rows": len(seq_lens),
        "tokens": tokens,
        "tokens_per_source": [{"source": s, "rows": int(r), "tokens": int(t)} for s, r, t in per_source],
        "masked_label_fraction": masked / tokens if tokens else 0.0,
        "documents": n_docs,
        "duplicate_document_rate": 1 - n_distinct / n_docs if n_docs else 0.0,
        "sequence_length_histogram": histogram(seq_lens, _pow2_bins(m.max_seq_length)),
        "document_length_histogram": histogram(doc_lens, _pow2_bins(max(doc_lens, default=1))),
        "mean_document_length": sum(doc_lens) / len(doc_lens) if doc_lens else 0.0,
    }


# ---- checks ------------------------------------------------------------------------------------
def check_row_lengths(data_dir: str | os.PathLike, con: duckdb.DuckDBPyConnection | None = None) -> tuple[bool, str]:
    """No row longer than ``max_seq_length``, and all four token columns of a row equally long."""
    m = Manifest.load(data_dir)
    con, _ = _connect(m, None, con)
    T = int(m.max_seq_length)
    bad, longest = con.execute(f"""
        SELECT count(*) FILTER (WHERE len(input_ids) > {T} OR len(labels) != len(input_ids)
                                   OR len(attention_mask) != len(input_ids) OR len(position_ids) != len(input_ids)),
               max(len(input_ids))
        FROM rows
    """).fetchone()
    ok = int(bad or 0) == 0
    return ok, (f"all rows <= max_seq_length {T} with equal column lengths (longest {longest})" if ok
                else f"{bad} rows longer than max_seq_length {T} or with unequal column lengths (longest {longest})")


def check_labels_aligned(data_dir: str | os.PathLike, con: duckdb.DuckDBPyConnection | None = None) -> tuple[bool, str]:
    """``labels[i]`` is ``input_ids[i]`` or -100 everywhere, and -100 wherever attention is 0."""
    m = Manifest.load(data_dir)
    con, _ = _connect(m, None, con)
    _tokens_view(con)
    bad, pad_bad = con.execute("""
        SELECT count(*) FILTER (WHERE lab != -100 AND lab != tok), count(*) FILTER (WHERE att = 0 AND lab != -100)
        FROM toks
    """).fetchone()
    ok = int(bad) == 0 and int(pad_bad) == 0
    return ok, ("labels are input_ids or -100 (not shifted), and -100 on padding" if ok else
                f"{bad} label tokens differ from input_ids and are not -100; {pad_bad} padding tokens carry labels")


def check_manifest_files(data_dir: str | os.PathLike, check_hash: bool = True) -> tuple[bool, str]:
    """The manifest lists exactly the shard files on disk (in the directory and its generation
    folders), with matching size, sha256 and rows."""
    d = Path(data_dir)
    try:
        m = Manifest.load(d)
        verify_shards(d, check_hash=check_hash)
    except (CorruptShardError, FileNotFoundError, ValueError) as err:
        return False, str(err)
    listed = {s.path for s in m.shards}
    on_disk = {p.relative_to(d).as_posix() for p in shard_files(d)}
    extra = sorted(on_disk - listed)
    if extra:
        return False, f"shard files not in the manifest: {extra} (left by an interrupted run; re-run preprocessing)"
    return True, f"{len(m.shards)} shards match the manifest (size, sha256, rows)"


def run_checks(data_dir: str | os.PathLike, con: duckdb.DuckDBPyConnection | None = None) -> dict[str, tuple[bool, str]]:
    """All checks by their asset-check names: ``{name: (passed, description)}``."""
    return {
        "rows_fit_max_seq_length": check_row_lengths(data_dir, con),
        "labels_aligned_with_input_ids": check_labels_aligned(data_dir, con),
        "manifest_matches_files": check_manifest_files(data_dir),
    }


def as_metadata(stats: dict[str, Any]) -> dict[str, Any]:
    """The headline values of :func:`data_stats` as plain data: rounded numbers, and each table as a
    list of row dicts (columns in order). Formatting them (markdown, Dagster metadata) is the caller's."""
    return {
        "documents": stats["documents"],
        "masked_label_fraction": round(stats["masked_label_fraction"], 6),
        "duplicate_document_rate": round(stats["duplicate_document_rate"], 6),
        "mean_document_length": round(stats["mean_document_length"], 2),
        "tokens_per_source": [dict(r) for r in stats["tokens_per_source"]],
        "sequence_length_histogram": [dict(r) for r in stats["sequence_length_histogram"]],
        "document_length_histogram": [dict(r) for r in stats["document_length_histogram"]],
    }
