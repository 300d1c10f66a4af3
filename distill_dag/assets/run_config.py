"""Dagster run config = the pydantic config tree the CLI uses.

``DistillRunConfig`` is generated from :class:`distill_dag.config.PipelineConfig`: every section and
field is there (so the launchpad and ``--config-json`` can set any knob), each optional, and a field
left unset keeps the value of the YAML file (``config_file``, default from the resource). Each field
carries the pydantic field's description and built-in default (the Launchpad shows them), and each
choice (a ``Literal``) is a Dagster enum, so ``teacher_mode: bogus`` is refused when the run is
launched. The result is validated by the very same pydantic models (bounds, cross-field rules), so
any other bad value fails with the key's name before the asset computes anything, as on the CLI.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any, Literal, Optional

import dagster as dg
from pydantic import BaseModel, Field, create_model

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
    if origin is Literal:  # a Dagster enum: the Launchpad offers the choices and refuses others at launch
        if all(isinstance(a, str) and a.isidentifier() for a in args):
            return _enum(args)
        return type(args[0])
    if origin is typing.Annotated:
        return _dagster_type(args[0])
    return annotation


_ENUMS: dict[tuple, type[enum.Enum]] = {}


def _enum(choices: tuple) -> type[enum.Enum]:
    if choices not in _ENUMS:
        _ENUMS[choices] = enum.Enum("Choice_" + "_".join(choices), {c: c for c in choices})
    return _ENUMS[choices]


def _describe(f: Any) -> str:
    text = (f.description or "").strip()
    default = f.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return text
    return f"{text} (unset: the config file's value; built-in default: {default!r})".strip()


_CACHE: dict[type, type] = {}


def _section_config(section: type[Section]) -> type[dg.Config]:
    if section not in _CACHE:
        fields = {
            name: (Optional[_dagster_type(f.annotation)], Field(None, description=_describe(f)))
            for name, f in section.model_fields.items()
        }
        _CACHE[section] = create_model(f"{section.__name__}Run", __base__=dg.Config, **fields)
    return _CACHE[section]


_SECTIONS = {name: (Optional[_section_config(f.annotation)], Field(None, description=f.description or name))
             for name, f in PipelineConfig.model_fields.items()}

DistillRunConfigBase = create_model("DistillRunConfigBase", __base__=dg.Config, **_SECTIONS)


class DistillRunConfig(DistillRunConfigBase):  # type: ignore[misc, valid-type]
    """Run config of every asset: ``config_file`` plus any section fields to override."""

    config_file: Optional[str] = Field(
        None, description="The YAML config file (a bundled name such as demo.yaml, or a path); unset: the code "
                          "location's (DISTILL_DAG_CONFIG). The section fields below override its values.")

    def overrides(self) -> dict[str, Any]:
        """The fields that were set, as a nested dict for :func:`distill_dag.config.load_config`."""
        out: dict[str, Any] = {}
        for name in PipelineConfig.model_fields:
            section = getattr(self, name)
            if section is None:
                continue
            values = {k: _plain(v) for k, v in section.model_dump().items() if v is not None}
            if values:
                out[name] = values
        return out


def _plain(v: Any) -> Any:
    """Enum members back to their values (the pydantic models take the Literal's strings)."""
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
