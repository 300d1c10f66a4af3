"""Reading ``tokenized_parquet`` splits for evaluation and teacher finetuning.

A small reader of the shard contract (columns ``input_ids``, ``attention_mask``, ``labels``,
``position_ids``; files ``<split>-NNNNN.parquet`` beside ``manifest.json``) that yields batches in the
data loader's format: long tensors ``[B, T]`` plus ``shard``/``row`` ``[B]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids")


def tokenized_dir(data_dir: str | Path) -> Path:
    """``data_dir`` may be the tokenized folder itself or the data root holding ``tokenized/``."""
    d = Path(data_dir)
    if (d / "manifest.json").exists() or any(d.glob("*-*.parquet")):
        return d
    if (d / "tokenized").is_dir():
        return d / "tokenized"
    raise FileNotFoundError(
        f"no tokenized shards in {d} (expected manifest.json and <split>-NNNNN.parquet there or in {d}/tokenized); "
        "materialize tokenized_parquet first (`distill preprocess`)"
    )


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    p = tokenized_dir(data_dir) / "manifest.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON ({err}); re-run `distill preprocess --force`") from None


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The shards of ``split`` in manifest order (the manifest's list when it has one, else by name)."""
    d = tokenized_dir(data_dir)
    files = [
        d / name
        for name, sp in _shard_entries(read_manifest(d))
        if (sp == split if sp is not None else name.startswith(f"{split}-"))
    ]
    if not files:
        files = sorted(d.glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"split '{split}' has no shards in {d} (looked for {split}-*.parquet and the manifest)")
    return files


def shard_index(data_dir: str | Path) -> dict[str, int]:
    """File name -> index in the manifest's shard list (the loader's ``shard`` value)."""
    return {name: i for i, (name, _) in enumerate(_shard_entries(read_manifest(data_dir)))}


def _shard_entries(manifest: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(file name, split or None) for each shard the manifest lists, in its order."""
    out = []
    for s in manifest.get("shards") or []:
        if isinstance(s, dict):
            name, sp = s.get("file") or s.get("path") or s.get("name"), s.get("split")
        else:
            name, sp = str(s), None
        if name:
            out.append((Path(name).name, sp))
    return out


def load_split(data_dir: str | Path, split: str) -> dict[str, torch.Tensor]:
    """Every row of ``split`` as long tensors ``[N, T]`` (and ``shard``/``row`` ``[N]``)."""
    import pyarrow.parquet as pq

    idx = shard_index(data_dir)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*COLUMNS, "shard", "row")}
    for fi, f in enumerate(split_files(data_dir, split)):
        table = pq.read_table(f, columns=list(COLUMNS))
        n = table.num_rows
        for k in COLUMNS:
            col = table.column(k).combine_chunks()
            flat = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).astype("int64"))
            if n and flat.numel() % n:
                raise ValueError(f"{f}: column '{k}' rows are not all the same length (max_seq_length packing broken)")
            parts[k].append(flat.view(n, -1))
        parts["shard"].append(torch.full((n,), idx.get(f.name, fi), dtype=torch.long))
        parts["row"].append(torch.arange(n, dtype=torch.long))
    return {k: torch.cat(v) for k, v in parts.items()}


def iter_batches(
    data_dir: str | Path, split: str, batch_size: int, *, max_batches: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``split`` in file order (deterministic: evaluation sees the same rows every time)."""
    rows = load_split(data_dir, split)
    n = rows["input_ids"].shape[0]
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield {k: v[start : start + batch_size] for k, v in rows.items()}
