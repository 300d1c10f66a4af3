"""Materializing the data assets through Dagster: results, checks, skip-existing, missing upstream."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from distill_dag.assets import data
from distill_dag.resources import DuckDBResource, PipelineConfigResource


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
    return {"pipeline": PipelineConfigResource(config_file=str(config_file)), "duckdb": DuckDBResource()}


def _meta(result, key):
    mats = [m for m in result.asset_materializations_for_node(key)]
    return mats[-1].metadata


def test_data_assets_materialize_then_skip_existing_retokenizes_nothing(config_file):
    assets = [data.raw_jsonl, data.tokenizer, data.tokenized_parquet]
    first = dg.materialize(assets, resources=_resources(config_file))
    assert first.success
    meta = _meta(first, "tokenized_parquet")
    assert meta["rows"].value > 0 and meta["tokens"].value > 0
    assert meta["tokenized_inputs"].value >= 1
    checks = first.get_asset_check_evaluations()
    assert {c.check_name for c in checks} == {"rows_fit_max_seq_length", "labels_aligned_with_input_ids", "manifest_matches_files"}
    assert all(c.passed for c in checks)
    raw_meta = _meta(first, "raw_jsonl")
    assert raw_meta["rows"].value > 0 and raw_meta["bytes"].value > 0

    second = dg.materialize(assets, resources=_resources(config_file))
    assert second.success
    meta2 = _meta(second, "tokenized_parquet")
    assert meta2["tokenized_inputs"].value == 0
    assert meta2["tokenizer_hash"].value == meta["tokenizer_hash"].value


def test_missing_upstream_names_the_asset_and_the_selection(config_file):
    result = dg.materialize([data.tokenized_parquet], resources=_resources(config_file), raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "raw_jsonl" in failure and "--select '*tokenized_parquet'" in failure
