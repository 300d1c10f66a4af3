"""The Dagster code location: every asset, check, resource, job, schedule and sensor.

Kept free of torch/transformers imports at module level: the multiprocess executor re-imports this
module for every step, and the heavy libraries are imported inside the assets that need them.
"""

import os

import dagster as dg

from distill_dag.assets import data, evaluation, student, teacher
from distill_dag.jobs import new_raw_data_sensor, retokenize_job, retokenize_schedule, student_job
from distill_dag.resources import (
    DuckDBResource,
    PipelineConfigResource,
    TeacherEndpointResource,
    WandbSettingsResource,
)


def _secret(name: str):
    """A secret stays an ``EnvVar`` (resolved at run time, never shown in the UI); None when unset."""
    return dg.EnvVar(name) if os.environ.get(name) else None


defs = dg.Definitions(
    assets=dg.load_assets_from_modules([data, teacher, student, evaluation]),
    asset_checks=dg.load_asset_checks_from_modules([data, teacher, student, evaluation]),
    jobs=[retokenize_job, student_job],
    schedules=[retokenize_schedule()],
    sensors=[new_raw_data_sensor],
    resources={
        "pipeline": PipelineConfigResource(config_file=dg.EnvVar("DISTILL_DAG_CONFIG").get_value("demo.yaml")),
        "duckdb": DuckDBResource(database=dg.EnvVar("DISTILL_DAG_DUCKDB").get_value(":memory:")),
        "teacher_endpoint": TeacherEndpointResource(
            url=dg.EnvVar("DISTILL_TEACHER_URL").get_value(), token=_secret("DISTILL_TEACHER_TOKEN")
        ),
        "wandb": WandbSettingsResource(
            api_key=_secret("WANDB_API_KEY"), project=dg.EnvVar("WANDB_PROJECT").get_value(),
            entity=dg.EnvVar("WANDB_ENTITY").get_value(),
        ),
    },
)
