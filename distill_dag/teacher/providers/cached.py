"""The cached teacher: replays the top-k that the ``logit_cache`` partitions stored, by (shard, row).

No teacher in memory: each batch reads exactly its rows' records from the memory-mapped cache
shards (see :mod:`distill_dag.teacher.cache.codec` for the encoding) and decodes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill_dag.io import sha256_dir, sha256_json
from distill_dag.loss.topk import TeacherTopK
from distill_dag.teacher.cache.codec import LogitCacheError
from distill_dag.teacher.cache.layout import DataManifest
from distill_dag.teacher.cache.reader import LogitCacheReader
from distill_dag.teacher.model import local_model_dir, teacher_fingerprint


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
        """The cache's identity, naming the teacher that wrote it as the other providers name theirs
        (``model``, ``weights_sha256``, ``adapter``): lineage and the student's model card show it."""
        h = self.reader.header
        t = h.get("teacher") or {}
        inner = _written_by(t)
        fp = h.get("teacher_fingerprint") or {}
        return {
            "provider": "cached",
            "model": inner.get("model") or t.get("model") or t.get("url"),
            "weights_sha256": inner.get("weights_sha256"),
            "adapter": inner.get("adapter"),
            "adapter_sha256": inner.get("adapter_sha256"),
            "teacher_fingerprint": fp.get("hash"),
            "cache_dir": str(self.reader.dir),
            "teacher": t,
            "teacher_hash": h.get("teacher_hash"),
            "cache_shards_sha256": sha256_json({k: v["data_version"] for k, v in sorted(self.reader.shards.items())}),
        }

    def check_teacher(self, model: str | Path | None, adapter: str | Path | None = None,
                      key: str = "teacher.model_name_or_path") -> str:
        """Refuse a cache written by another teacher than the configured one (``model`` + ``adapter``,
        ``key`` names where it was configured); returns what was checked, for the run's log.

        Compared: the fingerprints (config, weights' headers, sizes and sampled blocks: no full read). A
        cache written before fingerprints were recorded is compared by its teacher's whole-folder sha256
        instead (one full read of the configured teacher). Nothing to compare against (no teacher
        configured, a Hub teacher not on this machine, a cache of a vLLM server) is said, not refused."""

        h = self.reader.header
        inner = _written_by(h.get("teacher") or {})
        cached_name = inner.get("model") or "an unnamed teacher"
        if not model:
            return (f"cached mode: {key} is not set, so the cache {self.reader.dir} (written by {cached_name}) is used "
                    "unchecked")
        fix = ("rebuild the cache with the configured teacher: `distill cache-logits` (it rewrites every shard "
               "whose teacher differs; Dagster: a backfill of logit_cache), or set "
               f"{key} back to the teacher that wrote it")
        mine = teacher_fingerprint(model, adapter)
        theirs = (h.get("teacher_fingerprint") or {}).get("hash")
        desc = f"{model}" + (f" with adapter {adapter}" if adapter else "")
        if theirs and mine and mine["hash"]:
            if theirs != mine["hash"]:
                raise LogitCacheError(
                    f"{self.reader.dir}: the logit cache was written by teacher {cached_name} (fingerprint "
                    f"{theirs[:16]}), but {key} is {desc} (fingerprint {mine['hash'][:16]}): its top-k are another "
                    f"teacher's; {fix}"
                )
            return f"cached mode: the cache's teacher fingerprint {theirs[:16]} equals that of {desc}"
        local = local_model_dir(model)
        weights = inner.get("weights_sha256")
        if not theirs and local is not None and weights and not str(weights).startswith("hub:"):
            mine_w = sha256_dir(local)
            adapter_w = sha256_dir(adapter) if adapter and Path(adapter).is_dir() else None
            if mine_w != weights or adapter_w != inner.get("adapter_sha256"):
                raise LogitCacheError(
                    f"{self.reader.dir}: the logit cache was written by teacher {cached_name} (weights sha256 "
                    f"{str(weights)[:16]}, adapter sha256 {str(inner.get('adapter_sha256'))[:16]}), but {key} is "
                    f"{desc} (weights sha256 {mine_w[:16]}, adapter sha256 {str(adapter_w)[:16]}): its top-k "
                    f"are another teacher's; {fix}"
                )
            return f"cached mode: the cache's teacher weights sha256 {weights[:16]} equal those of {desc}"
        return (f"cached mode: cannot check the cache {self.reader.dir} (written by {cached_name}) against {key} {desc}: "
                + ("the cache records no fingerprint of its teacher" if not theirs else
                   f"{model} is not on this machine") + "; it is used as it is")

    def close(self) -> None:
        self.reader.close()


def _written_by(teacher: dict[str, Any]) -> dict[str, Any]:
    """The identity of the model that wrote a cache: a ``serve-teacher`` server's (nested under ``teacher``) or
    the provider's own."""
    inner = teacher.get("teacher")
    return inner if isinstance(inner, dict) else teacher
