"""The ``logit_cache`` stage, as the Dagster asset (one partition per run) and ``distill cache-logits``
(a loop over shards) both run it: build the finetuned teacher, write cache shards, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

from distill_dag.config import PipelineConfig
from distill_dag.device import pick_device
from distill_dag.teacher.cache import layout
from distill_dag.teacher.cache.stats import cache_stats
from distill_dag.teacher.cache.writer import CacheShard, write_cache_shard
from distill_dag.teacher.model import resolve_teacher
from distill_dag.teacher.providers.factory import make_teacher


def open_cache_teacher(cfg: PipelineConfig, *, via: str = "direct", model_path: str | Path | None = None,
                       adapter_path: str | Path | None = None) -> Any:
    """The teacher that fills the cache: ``teacher_adapters``' output unless paths are given; ``via``
    direct (in this process) or network (``teacher.url``), with ``k = logit_cache.k``."""
    resolved = resolve_teacher(cfg)
    mode = "network" if via == "network" else "direct"
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"teacher_mode": mode, "teacher_topk": cfg.logit_cache.k})})
    return make_teacher(cfg, pick_device(cfg.train.device), None,
                        model_path=model_path or resolved.model, adapter_path=adapter_path or resolved.adapter)


class ProgressLog:
    """``progress(done, total)`` that logs rows done, rate and ETA at most every ``every_s`` seconds."""

    def __init__(self, key: str, log: Callable[[str], None], every_s: float = 10.0) -> None:
        self.key, self.log, self.every_s = key, log, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        self.log(f"logit_cache {self.key}: {done}/{total} rows, {rate:.1f} rows/s, ETA {eta:.0f} s")


def cache_shard(cfg: PipelineConfig, key: str, *, teacher: Any, force: bool = False,
                log: Callable[[str], None] = print) -> CacheShard:
    """Write (or reuse) the cache shard of data shard ``key`` with ``teacher``."""
    c = cfg.logit_cache
    return write_cache_shard(teacher, cfg.tokenized_dir, key, cfg.cache_dir, k=c.k, dtype=c.dtype,
                             batch_rows=c.batch_rows, force=force, progress=ProgressLog(key, log))


def build_logit_cache(cfg: PipelineConfig, *, shards: Iterable[str] | None = None, via: str = "direct",
                      model_path: str | Path | None = None, adapter_path: str | Path | None = None,
                      force: bool = False, stats: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``distill cache-logits``: the given shard keys (default: every data shard) one after another."""
    dm = layout.read_data_manifest(cfg.tokenized_dir)
    keys = list(shards) if shards is not None else [s.key for s in dm.shards]
    for key in keys:
        dm.shard(key)  # an unknown key fails before the teacher loads
    teacher = open_cache_teacher(cfg, via=via, model_path=model_path, adapter_path=adapter_path)
    log(f"logit cache: teacher {teacher.identity()}, k={cfg.logit_cache.k}, dtype={cfg.logit_cache.dtype}, "
        f"{len(keys)} shard(s)")
    try:
        written = [cache_shard(cfg, key, teacher=teacher, force=force, log=log) for key in keys]
    finally:
        teacher.close()
    for w in written:
        log(f"logit_cache {w.key}: {'reused' if w.reused else 'written'} {w.dir} ({w.rows} rows, version {w.data_version[:12]})")
    present = [s.key for s in dm.shards if layout.read_shard_header(cfg.cache_dir, s.key) is not None]
    summary: dict[str, Any] = {
        "k": cfg.logit_cache.k, "dtype": cfg.logit_cache.dtype,
        "written": [w.key for w in written if not w.reused], "reused": [w.key for w in written if w.reused],
        "shards_present": len(present), "shards_total": len(dm.shards),
    }
    if stats:
        summary["stats"] = cache_stats(layout.shard_dir(cfg.cache_dir, k) / layout.STATS for k in present)
    return summary
