"""Materializing the data assets through Dagster: results, checks, data versions, partitions, missing upstream."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from distill_dag.defs.assets import data
from dagster_duckdb import DuckDBResource

from distill_dag.defs.resources import PipelineConfigResource


@pytest.fixture()
def config_file(tmp_path):
    cfg = {
        "data": {"root": str(tmp_path / "data"), "sources": [{"name": "stdlib", "kind": "stdlib", "max_bytes": 300_000}]},
        "tokenizer": {"vocab_size": 512, "train_bytes": 300_000},
        "tokenize": {"max_seq_length": 128, "rows_per_shard": 256, "val_fraction": 0.1},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _resources(config_file):
    return {"pipeline": PipelineConfigResource(config_file=str(config_file)), "duckdb": DuckDBResource(database=":memory:")}


def _meta(result, key):
    mats = [m for m in result.asset_materializations_for_node(key)]
    return mats[-1].metadata


def _version(result, key):
    return result.asset_materializations_for_node(key)[-1].tags["dagster/data_version"]


def test_data_assets_materialize_then_skip_existing_keeps_every_data_version(config_file):
    assets = [data.raw_jsonl, data.tokenizer, data.tokenized_parquet]
    with dg.instance_for_test() as instance:
        first = dg.materialize(assets, resources=_resources(config_file), instance=instance)
        assert first.success
        meta = _meta(first, "tokenized_parquet")
        assert meta["dagster/row_count"].value > 0 and meta["tokens"].value > 0
        assert meta["tokenized_inputs"].value >= 1
        assert [c.name for c in meta["dagster/column_schema"].value.columns][:4] == [
            "input_ids", "attention_mask", "labels", "position_ids"]
        checks = first.get_asset_check_evaluations()
        assert {c.check_name for c in checks} == set(data.TOKENIZED_CHECKS)
        assert all(c.passed for c in checks)
        specs = {s.name: s for s in data.tokenized_parquet.check_specs}
        assert all(s.description for s in specs.values()) and specs["tokenizer_matches_manifest"].blocking
        keys = instance.get_dynamic_partitions("data_shards")
        assert len(keys) == meta["shards"].value and all(k.startswith(("train-", "val-")) for k in keys)
        raw_meta = _meta(first, "raw_jsonl")
        assert raw_meta["dagster/row_count"].value > 0 and raw_meta["bytes"].value > 0

        second = dg.materialize(assets, resources=_resources(config_file), instance=instance)
        assert second.success
        assert _meta(second, "tokenized_parquet")["tokenized_inputs"].value == 0
        for key in ("raw_jsonl", "tokenizer", "tokenized_parquet"):  # same content, same version
            assert _version(second, key) == _version(first, key), key
        assert instance.get_dynamic_partitions("data_shards") == keys


def test_missing_upstream_names_the_asset_and_the_selection(config_file):
    result = dg.materialize([data.tokenized_parquet], resources=_resources(config_file), raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "raw_jsonl" in failure and "--select '*tokenized_parquet'" in failure
