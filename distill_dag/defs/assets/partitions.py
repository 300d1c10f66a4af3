"""The data-shard partitions: one key per shard of ``tokenized_parquet`` (its file stem, e.g. ``train-00000``).

``tokenized_parquet`` registers the keys of the shards it wrote and removes the keys of shards that are
gone; ``logit_cache`` is partitioned by them, so a backfill fans one cache shard out per run and the
partition status in the UI is the cache's completeness.
"""

from __future__ import annotations

import dagster as dg

DATA_SHARDS = "data_shards"
data_shards = dg.DynamicPartitionsDefinition(name=DATA_SHARDS)


def sync_data_shards(instance: dg.DagsterInstance, keys: list[str]) -> tuple[list[str], list[str]]:
    """Make the registered keys exactly ``keys``; returns (added, removed)."""
    have = set(instance.get_dynamic_partitions(DATA_SHARDS))
    added = [k for k in keys if k not in have]
    removed = sorted(have - set(keys))
    if added:
        instance.add_dynamic_partitions(DATA_SHARDS, added)
    for k in removed:
        instance.delete_dynamic_partition(DATA_SHARDS, k)
    return added, removed
