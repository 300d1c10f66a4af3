"""Parquet shards of packed rows: the schema, an atomic streaming writer, and verification.

Columns (one row = one packed sequence of ``max_seq_length`` tokens):
``input_ids`` list<int32>, ``attention_mask`` list<int8>, ``labels`` list<int32>,
``position_ids`` list<int32>, ``source`` string. Snappy-compressed; row groups of about 2**20
tokens so a reader decodes one group (a few MB), not a whole shard, to get a row.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_dag.data.manifest import Manifest, ShardInfo
from distill_dag.io import atomic_path, sha256_file

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("attention_mask", pa.list_(pa.int8())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("source", pa.string()),
])
COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids")
ROW_GROUP_TOKENS = 1 << 20


class CorruptShardError(RuntimeError):
    """A shard on disk does not match the manifest (missing, truncated, or changed)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def np_to_arrow(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A 1-d numpy array as an arrow array without a copy (``pa.array`` would import pandas)."""
    values = np.ascontiguousarray(values, dtype=dtype.to_pandas_dtype())
    return pa.Array.from_buffers(dtype, len(values), [None, pa.py_buffer(values)])


def _list_array(values: np.ndarray, n: int, width: int, dtype: pa.DataType) -> pa.Array:
    offsets = np_to_arrow(np.arange(0, (n + 1) * width, width, dtype=np.int32), pa.int32())
    return pa.ListArray.from_arrays(offsets, np_to_arrow(values.reshape(-1), dtype))


def rows_to_table(ids: np.ndarray, att: np.ndarray, lab: np.ndarray, pos: np.ndarray, sources: list[str]) -> pa.Table:
    """Arrays ``[n, T]`` (+ ``n`` sources) -> a table of :data:`SCHEMA`."""
    n, t = ids.shape
    return pa.Table.from_arrays([
        _list_array(ids, n, t, pa.int32()),
        _list_array(att, n, t, pa.int8()),
        _list_array(lab, n, t, pa.int32()),
        _list_array(pos, n, t, pa.int32()),
        pa.array(sources, type=pa.string()),
    ], schema=SCHEMA)


def table_to_arrays(table: pa.Table, width: int) -> dict[str, np.ndarray]:
    """A shard table (or row group) -> ``{column: int array [n, width]}`` (fixed-width rows)."""
    out = {}
    n = table.num_rows
    for c in COLUMNS:
        col = table.column(c).combine_chunks()
        out[c] = col.flatten().to_numpy(zero_copy_only=False).reshape(n, width)
    return out


class ShardWriter:
    """Streams rows of one split into ``<split>-NNNNN.parquet`` files of ``rows_per_shard`` rows.

    Each shard is written to a temp file and renamed into place when full (:func:`atomic_path`),
    so a file with a shard's name is always complete. ``shards`` lists the finished ones.
    """

    def __init__(self, out_dir: Path, split: str, width: int, rows_per_shard: int):
        self.out_dir, self.split, self.width, self.rows_per_shard = Path(out_dir), split, width, rows_per_shard
        self.row_group_rows = max(1, min(rows_per_shard, ROW_GROUP_TOKENS // width))
        self.shards: list[ShardInfo] = []
        self._buf: list[tuple[np.ndarray, ...]] = []
        self._buf_src: list[str] = []
        self._buf_rows = 0
        self._stack: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = self._tokens = 0

    def add(self, ids: np.ndarray, att: np.ndarray, lab: np.ndarray, pos: np.ndarray, sources: list[str]) -> None:
        i = 0
        n = ids.shape[0]
        while i < n:
            # never let a row group cross a shard boundary
            room = min(self.row_group_rows - self._buf_rows, self.rows_per_shard - self._rows - self._buf_rows)
            j = min(n, i + room)
            self._buf.append((ids[i:j], att[i:j], lab[i:j], pos[i:j]))
            self._buf_src.extend(sources[i:j])
            self._buf_rows += j - i
            i = j
            if self._buf_rows == self.row_group_rows or self._rows + self._buf_rows == self.rows_per_shard:
                self._write_group()

    def _write_group(self) -> None:
        if not self._buf_rows:
            return
        if self._writer is None:
            self._stack = contextlib.ExitStack()
            path = self.out_dir / shard_name(self.split, len(self.shards))
            tmp = self._stack.enter_context(atomic_path(path))
            # dictionary encoding of token columns triples the write time for ~35% smaller files
            self._writer = pq.ParquetWriter(tmp, SCHEMA, compression="snappy", use_dictionary=["source"])
        ids, att, lab, pos = (np.concatenate([b[k] for b in self._buf]) for k in range(4))
        self._writer.write_table(rows_to_table(ids, att, lab, pos, self._buf_src), row_group_size=len(ids))
        self._rows += len(ids)
        self._tokens += int(att.sum())
        self._buf, self._buf_src, self._buf_rows = [], [], 0
        if self._rows == self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None and self._stack is not None
        self._writer.close()
        self._stack.close()  # fsync + rename into place
        path = self.out_dir / shard_name(self.split, len(self.shards))
        self.shards.append(ShardInfo(path=path.name, split=self.split, rows=self._rows, tokens=self._tokens,
                                     sha256=sha256_file(path), bytes=path.stat().st_size))
        self._writer, self._stack, self._rows, self._tokens = None, None, 0, 0

    def close(self) -> list[ShardInfo]:
        self._write_group()
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the unfinished shard's temp file (finished shards stay; the manifest is not updated)."""
        if self._writer is not None:
            self._writer.close()
            assert self._stack is not None
            with contextlib.suppress(Exception):
                self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._writer, self._stack = None, None


def verify_shards(directory: str | os.PathLike, check_hash: bool = True) -> dict[str, Any]:
    """Check every shard of the manifest against the file on disk (existence, size, sha256, rows).

    Returns ``{"shards": n, "ok": True}``; raises :class:`CorruptShardError` naming each bad file
    and saying how to fix it.
    """
    m = Manifest.load(directory)
    problems = []
    for s in m.shards:
        p = m.shard_path(s)
        if not p.exists():
            problems.append(f"{p}: missing")
            continue
        size = p.stat().st_size
        if size != s.bytes:
            problems.append(f"{p}: {size} bytes, manifest says {s.bytes} (truncated or replaced)")
            continue
        if check_hash and sha256_file(p) != s.sha256:
            problems.append(f"{p}: sha256 differs from the manifest (corrupt or replaced)")
            continue
        try:
            rows = pq.ParquetFile(p).metadata.num_rows
        except Exception as err:  # noqa: BLE001 - any read failure means the file is unusable
            problems.append(f"{p}: unreadable parquet ({err})")
            continue
        if rows != s.rows:
            problems.append(f"{p}: {rows} rows, manifest says {s.rows}")
    if problems:
        raise CorruptShardError(
            f"{len(problems)} bad shard(s) in {directory}:\n  " + "\n  ".join(problems)
            + "\nRe-run preprocessing with force=True (tokenize.force / --force) to rebuild them."
        )
    return {"shards": len(m.shards), "ok": True}
