"""Per-position statistics of the cached teacher, and DuckDB queries over them.

Each cache shard carries ``stats.parquet`` (row, pos, entropy_lb, topk_mass, top1_prob per valid
position); :func:`cache_stats` aggregates any set of them with DuckDB (the Dagster layer passes its
``DuckDBResource`` connection).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from distill_dag.teacher.cache.codec import CacheEncoding, LogitCacheError
from distill_dag.io import atomic_path


def write_stats(rec: np.ndarray, enc: CacheEncoding, path: Path, chunk_rows: int = 64) -> None:
    """Per valid position: teacher entropy lower bound, top-k mass and top-1 prob, as Parquet.

    ``entropy_lb = -sum_{i<k} p_i log p_i - r log r`` with ``r`` the tail mass taken as one bucket:
    the entropy of the full distribution is at least this (splitting the tail only adds entropy).
    """
    parts = []
    for a in range(0, rec.shape[0], chunk_rows):
        r = np.asarray(rec[a : a + chunk_rows])
        parts.append(stats_columns(enc.decode(r)[1], r["log_mass"], r["n_valid"], a))
    write_stats_columns(parts, path)


def stats_columns(lp: np.ndarray, log_mass: np.ndarray, n_valid: np.ndarray, row0: int) -> dict[str, np.ndarray]:
    """The stats of rows ``row0 ..`` from their decoded log-probs [N, T, k] (``enc.decode``'s float32)."""
    T = lp.shape[1]
    lp64 = lp.astype(np.float64)
    p = np.exp(lp64)
    mass = np.exp(log_mass.astype(np.float64))
    tail = np.clip(1.0 - mass, 0.0, 1.0)
    ent = -(p * lp64).sum(-1) - np.where(tail > 0, tail * np.log(np.where(tail > 0, tail, 1.0)), 0.0)
    valid = np.arange(T)[None, :] < n_valid[:, None]
    rows, pos = np.nonzero(valid)
    return {"row": (rows + row0).astype(np.int32), "pos": pos.astype(np.int32), "entropy_lb": ent[valid].astype(np.float32),
            "topk_mass": mass[valid].astype(np.float32), "top1_prob": p[..., 0][valid].astype(np.float32)}


def write_stats_columns(parts: list[dict[str, np.ndarray]], path: Path) -> None:
    """:func:`stats_columns` of consecutive row ranges -> ``path`` (Parquet, zstd), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ("row", "pos", "entropy_lb", "topk_mass", "top1_prob")
    table = pa.table({k: np.concatenate([c[k] for c in parts]) if parts else np.zeros(0) for k in names})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def cache_stats(
    stats_files: Iterable[str | Path], con: Any = None, bins: Iterable[float] = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
) -> dict[str, Any]:
    """DuckDB over the shards' ``stats.parquet``: teacher entropy (lower bound) and top-k mass coverage.

    ``coverage_histogram`` gives the fraction of positions whose top-k mass falls in each bin.
    ``con``: a DuckDB connection (e.g. from ``dagster_duckdb.DuckDBResource``); an in-memory one if None.
    """
    files = [str(f) for f in stats_files]
    if not files:
        raise LogitCacheError("no cache shard stats to summarise; materialize logit_cache partitions first")
    if con is None:
        import duckdb

        con = duckdb.connect()
    src = f"read_parquet({files!r})"
    n, ent, mass, med, p05, top1 = con.execute(
        f"SELECT count(*), avg(entropy_lb), avg(topk_mass), median(topk_mass), quantile_cont(topk_mass, 0.05), "
        f"avg(top1_prob) FROM {src}"
    ).fetchone()
    edges = [0.0, *bins, 1.0000001]
    case = " ".join(f"WHEN topk_mass < {hi} THEN {i}" for i, hi in enumerate(edges[1:]))
    hist = dict(con.execute(f"SELECT CASE {case} ELSE {len(edges) - 2} END AS b, count(*) FROM {src} GROUP BY b").fetchall())
    return {
        "positions": int(n),
        "mean_entropy_lb": float(ent),
        "mean_topk_mass": float(mass),
        "median_topk_mass": float(med),
        "p05_topk_mass": float(p05),
        "mean_top1_prob": float(top1),
        "coverage_histogram": [
            {"bin": f"[{edges[i]:g}, {min(edges[i + 1], 1.0):g}{']' if i == len(edges) - 2 else ')'}",
             "fraction": hist.get(i, 0) / max(n, 1)}
            for i in range(len(edges) - 1)
        ],
    }
