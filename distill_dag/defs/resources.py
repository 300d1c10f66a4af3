"""Dagster resources: where things live and the services the assets talk to.

Environment-specific values come from ``EnvVar`` (bound in :func:`resources` below); nothing here
hard-codes a path or a secret.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import dagster as dg
from pydantic import Field

from dagster_duckdb import DuckDBResource

from distill_dag.defs.assets.run_config import location_config_file


class PipelineConfigResource(dg.ConfigurableResource):
    """Which YAML config the code location runs (``DISTILL_DAG_CONFIG``, default configs/demo.yaml)."""

    config_file: str = Field(default="demo.yaml", description="a file of configs/ or a path")


class TeacherEndpointResource(dg.ConfigurableResource):
    """The network teacher: URL and bearer token (the token only ever comes from the environment)."""

    url: Optional[str] = None
    token: Optional[str] = None

    def overrides(self) -> dict[str, Any]:
        return {"teacher": {"url": self.url}} if self.url else {}

    def export_token(self, env_name: str) -> None:
        if self.token:
            os.environ[env_name] = self.token


class WandbSettingsResource(dg.ConfigurableResource):
    """W&B: offline unless an API key is set; with a key, dagster-wandb logs in and the run is online.

    dagster-wandb's ``wandb_resource`` requires a key, so the offline path is this resource alone.
    """

    api_key: Optional[str] = None
    project: Optional[str] = None
    entity: Optional[str] = None

    def overrides(self) -> dict[str, Any]:
        w: dict[str, Any] = {}
        if self.project:
            w["project"] = self.project
        if self.entity:
            w["entity"] = self.entity
        if self.api_key:
            w["mode"] = "online"
        return {"wandb": w} if w else {}

    @contextmanager
    def sdk(self) -> Iterator[Any]:
        """The logged-in ``wandb`` module, through dagster-wandb's ``wandb_resource`` (needs the key)."""
        from dagster_wandb import wandb_resource

        with dg.build_resources(
            {"wandb": wandb_resource}, resource_config={"wandb": {"config": {"api_key": self.api_key}}}
        ) as res:
            yield res.wandb["sdk"]

    def log_checkpoint(self, run_id: Optional[str], path: Path, name: str) -> Optional[str]:
        """Upload the checkpoint dir as a W&B model artifact of the training run (online only)."""
        if not self.api_key or not run_id:
            return None
        with self.sdk() as wandb:
            run = wandb.init(project=self.project or "distill-dag", entity=self.entity, id=run_id, resume="allow")
            art = wandb.Artifact(name, type="model")
            art.add_dir(str(path))
            run.log_artifact(art)
            url = run.url
            run.finish()
        return url


def _secret(name: str):
    """A secret stays an ``EnvVar`` (resolved at run time, never shown in the UI); None when unset."""
    return dg.EnvVar(name) if os.environ.get(name) else None


@dg.definitions
def resources() -> dg.Definitions:
    """The code location's resources, bound to its environment (``DISTILL_DAG_CONFIG``, ``DISTILL_TEACHER_URL``,
    ``WANDB_*``, ``DISTILL_DAG_DUCKDB``). ``pipes_subprocess_client`` launches torchrun under
    ``train.launcher: torchrun`` (:mod:`distill_dag.defs.pipes_worker` is the external side)."""
    return dg.Definitions(resources={
        "pipeline": PipelineConfigResource(config_file=location_config_file()),
        "duckdb": DuckDBResource(database=dg.EnvVar("DISTILL_DAG_DUCKDB").get_value(":memory:"),
                                 connection_config={"threads": 2}),
        "teacher_endpoint": TeacherEndpointResource(
            url=dg.EnvVar("DISTILL_TEACHER_URL").get_value(), token=_secret("DISTILL_TEACHER_TOKEN")),
        "wandb": WandbSettingsResource(
            api_key=_secret("WANDB_API_KEY"), project=dg.EnvVar("WANDB_PROJECT").get_value(),
            entity=dg.EnvVar("WANDB_ENTITY").get_value()),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    })
