"""The cached teacher: replays the top-k that the ``logit_cache`` partitions stored, by (shard, row).

No teacher in memory: each batch reads exactly its rows' records from the memory-mapped cache
shards (see :mod:`distill_dag.distill.cache.codec` for the encoding) and decodes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill_dag.distill.cache.layout import DataManifest
from distill_dag.distill.cache.reader import LogitCacheReader
from distill_dag.distill.teachers.base import TeacherTopK
from distill_dag.io import sha256_json


class CachedTeacher:
    """Provider over a logit cache.

    Args:
        cache_dir: the cache folder (``logit_cache.dir``).
        data_manifest: ``tokenized_parquet``'s manifest (path, its folder or the data root); the cache
            is refused when it was built for another tokenizer or other shards.
        k: entries per position wanted (<= the cache's k; the first k of the stored top-K are the top-k).
        verify: check each shard's sha256 on its first use (one sequential read per shard).
        check_tokens: refuse a batch whose input ids differ from those the cache was built on.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        data_manifest: str | Path | DataManifest,
        k: int,
        *,
        verify: bool = True,
        check_tokens: bool = True,
    ) -> None:
        self.reader = LogitCacheReader(cache_dir, data_manifest, k, verify=verify)
        self.k = self.reader.k
        self.vocab_size = self.reader.vocab_size
        self.check_tokens = check_tokens

    def require_shards(self, shards: list[int]) -> None:
        """Refuse, before any compute, a cache that lacks data shards (indices in the data manifest) a run will read."""
        self.reader.require(shards)

    def topk(self, batch: dict[str, torch.Tensor]) -> TeacherTopK:
        """``batch["shard"]`` [B], ``batch["row"]`` [B] (and ``input_ids`` [B, T]) -> TeacherTopK [B, T, k]."""
        if "shard" not in batch or "row" not in batch:
            raise KeyError("the cached teacher needs batch['shard'] and batch['row'] (from the data loader)")
        ids = batch["input_ids"].cpu().numpy() if self.check_tokens and "input_ids" in batch else None
        idx, lp = self.reader.read(batch["shard"].cpu().numpy(), batch["row"].cpu().numpy(), ids)
        T = batch["input_ids"].shape[1] if "input_ids" in batch else idx.shape[1]
        return TeacherTopK(torch.from_numpy(np.ascontiguousarray(idx[:, :T])), torch.from_numpy(np.ascontiguousarray(lp[:, :T])))

    def identity(self) -> dict[str, Any]:
        h = self.reader.header
        return {
            "provider": "cached",
            "cache_dir": str(self.reader.dir),
            "teacher": h.get("teacher"),
            "teacher_hash": h.get("teacher_hash"),
            "cache_shards_sha256": sha256_json({k: v["data_version"] for k, v in sorted(self.reader.shards.items())}),
        }

    def close(self) -> None:
        self.reader.close()
