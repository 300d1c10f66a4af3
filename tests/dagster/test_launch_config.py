"""Config errors at launch, through the Launchpad's own GraphQL: choices are enums (refused by
``isPipelineConfigValid`` itself, the message listing the choices), and bounds, which Dagster's schema
cannot express, are refused by ``launchRun`` before a run exists (the code server's post-processing of
the run config), naming the run-config key; no run is created, so no asset is shown as failed."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

VALID = """query($selector: PipelineSelector!, $runConfigData: RunConfigData) {
  isPipelineConfigValid(pipeline: $selector, runConfigData: $runConfigData, mode: "default") {
    __typename ... on RunConfigValidationInvalid { errors { message } } } }"""
LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
    __typename ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } }
    ... on LaunchRunSuccess { run { runId } } } }"""


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from dagster_graphql.test.utils import define_out_of_process_context

    import distill_dag.definitions as d

    from dagster._core.test_utils import instance_for_test

    with instance_for_test(temp_dir=str(tmp_path_factory.mktemp("home"))) as instance, \
            define_out_of_process_context(str(Path(d.__file__)), None, instance) as c:
        yield c, instance


def _selector(ctx, asset: str) -> dict:
    """What the Launchpad of one asset sends: the implicit asset job with that asset selected."""
    from dagster_graphql.test.utils import infer_job_selector

    sel = infer_job_selector(ctx, "__ASSET_JOB", asset_selection=[{"path": [asset]}])
    return {k: v for k, v in sel.items() if v is not None}


def _valid(ctx, asset: str, config: dict) -> dict:
    from dagster_graphql.test.utils import execute_dagster_graphql

    rc = {"ops": {asset: {"config": config}}}
    return execute_dagster_graphql(ctx, VALID, {"selector": _selector(ctx, asset), "runConfigData": rc}).data[
        "isPipelineConfigValid"]


def _launch(ctx, asset: str, config: dict) -> dict:
    from dagster_graphql.test.utils import execute_dagster_graphql

    sel = _selector(ctx, asset)
    params = {"selector": {**{k: v for k, v in sel.items() if k != "pipelineName"}, "jobName": sel["pipelineName"]},
              "runConfigData": {"ops": {asset: {"config": config}}}, "mode": "default"}
    return execute_dagster_graphql(ctx, LAUNCH, {"p": params}).data["launchRun"]


@pytest.mark.parametrize("asset, config, value, choices", [
    ("student_ckpt", {"train": {"teacher_mode": "bogus"}}, "bogus", "direct, cached, network"),
    ("student_ckpt", {"student": {"variant": "999M"}}, "999M", "tiny, 350M, 500M"),  # was a free string
    ("tokenized_parquet", {"logit_cache": {"dtype": "int4"}}, "int4", "compact, q8, fp16, fp32"),
])
def test_a_value_outside_a_choice_is_refused_by_the_launchpad_naming_the_choices(ctx, asset, config, value, choices):
    c, _ = ctx
    res = _valid(c, asset, config)
    assert res["__typename"] == "RunConfigValidationInvalid", res
    (msg,) = [e["message"] for e in res["errors"]]
    key = next(iter(next(iter(config.values()))))
    assert value in msg and key in msg and choices in msg, msg


def test_every_choice_is_an_enum_and_350M_is_offered():
    from distill_dag.defs.assets.run_config import RUN_CONFIG

    student = RUN_CONFIG.config_type.fields["student"].config_type.inner_type.fields
    variant = student["variant"].config_type.inner_type
    assert variant.kind == dg._config.ConfigTypeKind.ENUM
    assert [v.config_value for v in variant.enum_values] == ["tiny", "350M", "500M"]


@pytest.mark.parametrize("asset, config, key, allowed", [
    ("student_ckpt", {"train": {"learning_rate": -1.0}}, "train.learning_rate", "> 0.0, <= 10.0"),
    ("tokenized_parquet", {"tokenize": {"max_seq_length": 0}}, "tokenize.max_seq_length", ">= 8"),
    ("tokenized_parquet", {"tokenize": {"val_fraction": 1.5}}, "tokenize.val_fraction", "< 1.0"),
    ("student_ckpt", {"align": {"value_factor": 3}}, "align.value_factor", "one of: 1, 2"),
])
def test_a_value_out_of_bounds_is_refused_at_launch_naming_the_key_and_creates_no_run(ctx, asset, config, key, allowed):
    c, instance = ctx
    assert _valid(c, asset, config)["__typename"] == "PipelineConfigValidationValid"  # the schema has no bounds
    res = _launch(c, asset, config)
    assert res["__typename"] in ("PythonError", "RunConfigValidationInvalid"), res
    msg = res.get("message") or " ".join(e["message"] for e in res["errors"])
    assert f"run config key {key}" in msg and "allowed: " in msg and allowed in msg, msg
    assert "demo.yaml" not in msg  # the value came from the run config, not from the file
    assert instance.get_runs_count() == 0  # refused before any run (and so before any planned materialization)


def test_the_launchpad_describes_each_bound(ctx):
    from distill_dag.defs.assets.run_config import RUN_CONFIG

    train = RUN_CONFIG.config_type.fields["train"].config_type.inner_type.fields
    assert "[> 0.0, <= 10.0]" in train["learning_rate"].description
    tok = RUN_CONFIG.config_type.fields["tokenize"].config_type.inner_type.fields
    assert "[>= 0.0, < 1.0]" in tok["val_fraction"].description


def test_a_valid_value_passes_the_same_validation():
    from distill_dag.defs.assets.run_config import launch_errors

    assert launch_errors({"train": {"learning_rate": 0.01}, "student": {"variant": "tiny"}}, "demo.yaml") == []
    errs = launch_errors({"train": {"learning_rate": float("nan")}}, "demo.yaml")
    assert len(errs) == 1 and "train.learning_rate" in errs[0]
