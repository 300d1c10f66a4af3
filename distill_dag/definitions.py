"""The Dagster code location: every asset, check, resource, job, schedule and sensor.

Kept free of torch/transformers imports at module level: the multiprocess executor re-imports this
module for every step, and the heavy libraries are imported inside the assets that need them.
"""

import os

import dagster as dg
from dagster_duckdb import DuckDBResource

from distill_dag.defs.assets import data, evaluation, student, teacher
from distill_dag.defs.assets.common import location_config_file
from distill_dag.defs.jobs import (
    eval_job, logit_cache_job, new_raw_data_sensor, retokenize_job, retokenize_schedule, student_job, teacher_job,
)
from distill_dag.defs.resources import PipelineConfigResource, TeacherEndpointResource, WandbSettingsResource

MODULES = [data, teacher, student, evaluation]


def _secret(name: str):
    """A secret stays an ``EnvVar`` (resolved at run time, never shown in the UI); None when unset."""
    return dg.EnvVar(name) if os.environ.get(name) else None


defs = dg.Definitions(
    assets=dg.load_assets_from_modules(MODULES),
    asset_checks=dg.load_asset_checks_from_modules(MODULES),
    jobs=[retokenize_job, teacher_job, logit_cache_job, student_job, eval_job],
    schedules=[retokenize_schedule()],
    sensors=[new_raw_data_sensor],
    resources={
        "pipeline": PipelineConfigResource(config_file=location_config_file()),
        "duckdb": DuckDBResource(database=dg.EnvVar("DISTILL_DAG_DUCKDB").get_value(":memory:"),
                                 connection_config={"threads": 2}),
        "teacher_endpoint": TeacherEndpointResource(
            url=dg.EnvVar("DISTILL_TEACHER_URL").get_value(), token=_secret("DISTILL_TEACHER_TOKEN")
        ),
        "wandb": WandbSettingsResource(
            api_key=_secret("WANDB_API_KEY"), project=dg.EnvVar("WANDB_PROJECT").get_value(),
            entity=dg.EnvVar("WANDB_ENTITY").get_value(),
        ),
    },
)
