"""The code location loads, shows the whole graph, and its run config is the CLI's config."""

from __future__ import annotations

import dagster as dg
import pytest

from distill_dag.definitions import defs

ASSETS = {"raw_jsonl", "tokenizer", "tokenized_parquet", "teacher_adapters", "logit_cache", "student_ckpt", "eval_report"}
EDGES = {
    ("raw_jsonl", "tokenizer"), ("raw_jsonl", "tokenized_parquet"), ("tokenizer", "tokenized_parquet"),
    ("tokenized_parquet", "teacher_adapters"), ("tokenized_parquet", "logit_cache"), ("teacher_adapters", "logit_cache"),
    ("tokenized_parquet", "student_ckpt"), ("teacher_adapters", "student_ckpt"), ("logit_cache", "student_ckpt"),
    ("student_ckpt", "eval_report"),
}


def test_code_location_is_loadable():
    dg.Definitions.validate_loadable(defs)


def test_graph_has_every_asset_and_lineage_edge():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert ASSETS <= keys
    edges = {
        (dep.to_user_string(), k.to_user_string())
        for k in graph.get_all_asset_keys()
        for dep in graph.get(k).parent_keys
    }
    assert EDGES <= edges


def test_assets_carry_groups_kinds_and_code_versions():
    for spec in defs.resolve_all_asset_specs():
        assert spec.group_name in {"data", "teacher", "student", "eval"}, spec.key
        assert spec.code_version, spec.key
        assert spec.kinds, spec.key
        assert spec.owners, spec.key


def test_jobs_schedule_and_sensor_are_defined():
    assert defs.resolve_job_def("retokenize")
    assert defs.resolve_schedule_def("retokenize_schedule").cron_schedule == "0 3 * * *"
    assert defs.resolve_sensor_def("new_raw_data_sensor")


def test_run_config_reaches_every_pipeline_knob():
    from distill_dag.assets.run_config import DistillRunConfig
    from distill_dag.config import PipelineConfig

    schema = DistillRunConfig.to_config_schema().as_field().config_type.fields
    for section, field in PipelineConfig.model_fields.items():
        assert section in schema
        inner = schema[section].config_type.inner_type.fields  # Noneable(Shape)
        assert set(field.annotation.model_fields) == set(inner), section


def test_run_config_errors_name_the_key():
    from distill_dag.assets.common import pipeline_config
    from distill_dag.assets.run_config import DistillRunConfig
    from distill_dag.resources import PipelineConfigResource

    rc = DistillRunConfig(train={"teacher_mode": "telepathy"})
    with pytest.raises(dg.Failure, match="train.teacher_mode"):
        pipeline_config(rc, PipelineConfigResource(config_file="demo.yaml"))


def test_definitions_import_does_not_need_torch_at_module_level():
    import ast
    from pathlib import Path

    import distill_dag

    pkg = Path(distill_dag.__file__).parent
    for path in [pkg / "definitions.py", pkg / "jobs.py", *sorted((pkg / "assets").glob("*.py")), *sorted((pkg / "resources").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: imports inside functions are fine
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    assert not n.startswith(("torch", "transformers", "peft")), f"{path.name} imports {n} at module level"
