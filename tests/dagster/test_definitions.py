"""The code location loads, shows the whole graph, and its run config is the CLI's config."""

from __future__ import annotations

import dagster as dg
import pytest

from distill_dag.definitions import defs

ASSETS = {"raw_jsonl", "tokenizer", "tokenized_parquet", "teacher_adapters", "logit_cache",
          "student_ce_baseline", "student_ckpt", "eval_report"}  # student_aligned: only with student.init from_teacher
EDGES = {  # the demo config: cached KD student
    ("raw_jsonl", "tokenizer"), ("raw_jsonl", "tokenized_parquet"), ("tokenizer", "tokenized_parquet"),
    ("tokenized_parquet", "teacher_adapters"), ("tokenized_parquet", "logit_cache"), ("teacher_adapters", "logit_cache"),
    ("tokenized_parquet", "student_ckpt"), ("teacher_adapters", "student_ckpt"), ("logit_cache", "student_ckpt"),
    ("tokenized_parquet", "student_ce_baseline"),
    ("student_ckpt", "eval_report"), ("student_ce_baseline", "eval_report"),
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
    assert "student_aligned" not in keys  # the demo trains from scratch: "Materialize all" must not align a student
    assert not {p for p, c in edges if c == "student_ce_baseline"} & {"teacher_adapters", "logit_cache"}  # no teacher


def test_logit_cache_is_partitioned_by_data_shard_and_nothing_else_is():
    graph = defs.resolve_asset_graph()
    parts = {k.to_user_string(): graph.get(k).partitions_def for k in graph.get_all_asset_keys()}
    assert isinstance(parts["logit_cache"], dg.DynamicPartitionsDefinition) and parts["logit_cache"].name == "data_shards"
    assert all(p is None for k, p in parts.items() if k != "logit_cache")


def test_every_asset_has_checks_with_descriptions():
    graph = defs.resolve_asset_graph()
    checks = {}
    for ck in graph.asset_check_keys:
        checks.setdefault(ck.asset_key.to_user_string(), []).append(graph.get_check_spec(ck))
    for asset in ("tokenized_parquet", "teacher_adapters", "logit_cache", "student_ce_baseline", "student_ckpt",
                  "eval_report"):
        assert checks.get(asset), asset
        assert all(spec.description for spec in checks[asset]), asset
    names = {(a, s.name) for a, specs in checks.items() for s in specs}
    assert {("student_ckpt", "kd_beats_ce_only"), ("teacher_adapters", "teacher_beats_base"),
            ("logit_cache", "cache_matches_data_shard"), ("eval_report", "teacher_retrieves")} <= names



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
    from distill_dag.defs.assets.run_config import DistillRunConfig
    from distill_dag.config import PipelineConfig

    schema = DistillRunConfig.to_config_schema().as_field().config_type.fields
    for section, field in PipelineConfig.model_fields.items():
        assert section in schema
        inner = schema[section].config_type.inner_type.fields  # Noneable(Shape)
        assert set(field.annotation.model_fields) == set(inner), section


def test_run_config_errors_name_the_key():
    from distill_dag.defs.assets.common import pipeline_config
    from distill_dag.defs.assets.run_config import DistillRunConfig
    from distill_dag.defs.resources import PipelineConfigResource

    with pytest.raises(Exception, match="telepathy"):  # a choice outside the enum: refused by the schema itself
        DistillRunConfig(train={"teacher_mode": "telepathy"})
    for bad, key in (({"learning_rate": -1.0}, "train.learning_rate"), ({"grad_accum": 0}, "train.grad_accum")):
        with pytest.raises(dg.Failure, match=key.replace(".", r"\.")):  # a bound: refused before any compute
            pipeline_config(DistillRunConfig(train=bad), PipelineConfigResource(config_file="demo.yaml"))


def test_launchpad_fields_have_descriptions_and_choices_are_enums():
    from distill_dag.defs.assets.run_config import DistillRunConfig

    schema = DistillRunConfig.to_config_schema().as_field().config_type.fields
    fields = [f for s, sec in schema.items() if s != "config_file" for f in sec.config_type.inner_type.fields.values()]
    assert len(fields) > 100 and all(f.description for f in fields)
    mode = schema["train"].config_type.inner_type.fields["teacher_mode"]
    assert mode.config_type.inner_type.kind == dg._config.ConfigTypeKind.ENUM
    assert "built-in default: 'direct'" in mode.description


def test_definitions_import_does_not_need_torch_at_module_level():
    import ast
    from pathlib import Path

    import distill_dag

    pkg = Path(distill_dag.__file__).parent
    for path in [pkg / "definitions.py", *sorted((pkg / "defs").rglob("*.py"))]:
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: imports inside functions are fine
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    assert not n.startswith(("torch", "transformers", "peft")), f"{path.name} imports {n} at module level"
