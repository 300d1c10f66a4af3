"""Dagster run config = the pydantic config tree the CLI uses.

``DistillRunConfig`` is generated from :class:`distill_dag.config.PipelineConfig`: every section and
field is there (so the launchpad and ``--config-json`` can set any knob), each optional, and a field
left unset keeps the value of the YAML file (``config_file``, default from the resource). The
result is validated by the very same pydantic models, so an unknown key or a wrong type fails with
the key's name, exactly as on the CLI.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Optional

import dagster as dg
from pydantic import BaseModel, create_model

from distill_dag.config import PipelineConfig, Section


def _dagster_type(annotation: Any) -> Any:
    """Map a pydantic annotation to one Dagster's config system accepts."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return _section_config(annotation)
    if origin is tuple:
        return list[_dagster_type(args[0])]
    if origin is list:
        inner = args[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return list[dict]
        return list[_dagster_type(inner)]
    if origin is dict:
        return dict
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _dagster_type(non_none[0]) if len(non_none) == 1 else Any
    if origin is Literal:  # Dagster config has no Literal: the pydantic model checks the choice
        return type(args[0])
    return annotation


_CACHE: dict[type, type] = {}


def _section_config(section: type[Section]) -> type[dg.Config]:
    if section not in _CACHE:
        fields = {
            name: (Optional[_dagster_type(f.annotation)], None)
            for name, f in section.model_fields.items()
        }
        _CACHE[section] = create_model(f"{section.__name__}Run", __base__=dg.Config, **fields)
    return _CACHE[section]


_SECTIONS = {name: (Optional[_section_config(f.annotation)], None) for name, f in PipelineConfig.model_fields.items()}

DistillRunConfigBase = create_model("DistillRunConfigBase", __base__=dg.Config, **_SECTIONS)


class DistillRunConfig(DistillRunConfigBase):  # type: ignore[misc, valid-type]
    """Run config of every asset: ``config_file`` plus any section fields to override."""

    config_file: Optional[str] = None

    def overrides(self) -> dict[str, Any]:
        """The fields that were set, as a nested dict for :func:`distill_dag.config.load_config`."""
        out: dict[str, Any] = {}
        for name in PipelineConfig.model_fields:
            section = getattr(self, name)
            if section is None:
                continue
            values = {k: v for k, v in section.model_dump().items() if v is not None}
            if values:
                out[name] = values
        return out
