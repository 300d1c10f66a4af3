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
import os
import types
import typing
from typing import Any, Literal, Optional

import dagster as dg
from pydantic import BaseModel, Field, create_model

from distill_dag.config import ConfigError, PipelineConfig, Section, load_config


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
        if all(isinstance(a, str) for a in args):
            return _enum(args)
        return type(args[0])  # int choices (align.value_factor): refused at launch by RUN_CONFIG's validation
    if origin is typing.Annotated:
        return _dagster_type(args[0])
    return annotation


_ENUMS: dict[tuple, type[enum.Enum]] = {}


def _enum(choices: tuple) -> type[enum.Enum]:
    # the type's name is what Dagster's refusal prints ("not in enum type <name> got bogus"): the choices
    # themselves, so the message says what is allowed. Member names may be any string ("350M").
    if choices not in _ENUMS:
        _ENUMS[choices] = enum.Enum("one of: " + ", ".join(choices), [(c, c) for c in choices])
    return _ENUMS[choices]


_OPS = (("ge", ">= {}"), ("gt", "> {}"), ("le", "<= {}"), ("lt", "< {}"), ("min_length", "length >= {}"),
        ("max_length", "length <= {}"))


def _constraints(metadata: Any) -> list[str]:
    out = []
    for m in metadata:
        for attr, fmt in _OPS:
            v = getattr(m, attr, None)
            if v is not None:
                out.append(fmt.format(v))
    return out


def bounds(annotation: Any, metadata: Any = ()) -> str:
    """The bounds and choices of a pydantic field as text ("> 0", "one of: 1, 2", "items >= 16, <= 65536"),
    read from the Field constraints so the Launchpad's description cannot drift from the validation."""
    parts = _constraints(metadata)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        # Annotated[int, Field(ge=0)] carries a FieldInfo (its .metadata) or bare annotated_types markers
        return bounds(args[0], [*metadata, *[x for a in args[1:] for x in getattr(a, "metadata", [a])]])
    if origin is Literal:
        parts.append("one of: " + ", ".join(str(a) for a in args))
    elif origin in (list, tuple):
        inner = bounds(args[0]) if args else ""
        if inner:
            parts.append(f"each item {inner}")
    elif origin in (typing.Union, types.UnionType):
        alts = [bounds(a) for a in args if a is not type(None)]
        alts = [a for a in alts if a]
        if alts:
            parts.append(" or ".join(alts))
    return ", ".join(parts)


def _describe(f: Any) -> str:
    text = (f.description or "").strip()
    b = bounds(f.annotation, f.metadata)
    if b:
        text = f"{text} [{b}]"
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


# ---- validation at launch ------------------------------------------------------------------------
# Dagster's config schema has types and enums but no bounds, so `learning_rate: -1` passes the schema.
# The assets take RUN_CONFIG (below) instead of the plain DistillRunConfig schema: the same fields, plus a
# post-processing step that Dagster runs when it builds the execution plan, in the code server, when the
# run is launched (and in `materialize`/`execute_in_process` before any step). A refusal there creates no
# run at all: the Launchpad shows the error naming the run-config key, and no asset is left shown as a
# failed materialization.
from pydantic import ConfigDict, TypeAdapter, ValidationError  # noqa: E402

from dagster._config import ConfigTypeKind, PostProcessingError  # noqa: E402
from dagster._config.field_utils import _ConfigHasFields  # noqa: E402

_ADAPTERS: dict[tuple[str, str], TypeAdapter] = {}
_STRICT = ConfigDict(allow_inf_nan=False)


def _adapter(section: str, name: str) -> TypeAdapter:
    if (section, name) not in _ADAPTERS:
        f = PipelineConfig.model_fields[section].annotation.model_fields[name]
        ann = typing.Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        _ADAPTERS[section, name] = TypeAdapter(ann, config=_STRICT)
    return _ADAPTERS[section, name]


def field_errors(overrides: dict[str, Any]) -> list[str]:
    """Each set run-config value checked alone against its pydantic field (bounds, choices, NaN): one line
    per refused key, naming it, the value, what is allowed and the pydantic reason."""
    errs = []
    for section, values in overrides.items():
        for name, value in values.items():
            try:
                _adapter(section, name).validate_python(value)
            except ValidationError as err:
                f = PipelineConfig.model_fields[section].annotation.model_fields[name]
                allowed = bounds(f.annotation, f.metadata)
                reason = "; ".join(e["msg"] for e in err.errors())
                errs.append(f"run config key {section}.{name} = {value!r}: {reason}"
                            + (f" (allowed: {allowed})" if allowed else ""))
    return errs


def launch_errors(value: dict[str, Any], default_file: str) -> list[str]:
    """Why the op config ``value`` cannot run: field by field first, then the whole config (cross-field
    rules) as the run would load it: ``config_file`` (or the code location's) with these values over it."""

    overrides = DistillRunConfig(**{k: v for k, v in value.items() if v is not None}).overrides()
    errs = field_errors(overrides)
    if errs or not overrides:
        return errs
    source = value.get("config_file") or default_file
    try:
        load_config(source, overrides)
    except ConfigError as err:
        return [f"run config values {sorted(f'{s}.{k}' for s, v in overrides.items() for k in v)} over {source}: {err}"]
    return []


class _ValidatedShape(_ConfigHasFields):
    """DistillRunConfig's shape with :func:`launch_errors` as Dagster post-processing. Not a ``Shape``
    subclass: Shape memoizes instances by field hash and would hand back the plain shape."""

    def __init__(self, base: Any, default_file: Any):
        super().__init__(fields=base.fields, key=f"DistillRunConfig.{base.key}", kind=ConfigTypeKind.STRICT_SHAPE,
                         description=base.description)
        self.field_aliases: dict[str, str] = {}
        self._default_file = default_file

    def post_process(self, value: Any) -> Any:
        errs = launch_errors(dict(value or {}), self._default_file())
        if errs:
            raise PostProcessingError("refused before the run starts:\n" + "\n".join(errs))
        return value


def location_config_file() -> str:
    """The code location's config file (``DISTILL_DAG_CONFIG``; default: the bundled demo.yaml)."""
    return os.environ.get("DISTILL_DAG_CONFIG") or "demo.yaml"


RUN_CONFIG = dg.Field(_ValidatedShape(DistillRunConfig.to_config_schema().as_field().config_type,
                                      location_config_file),
                      description=DistillRunConfig.__doc__, is_required=False)


def run_config(context: Any) -> "DistillRunConfig":
    """The asset's run config (already validated at launch) as a :class:`DistillRunConfig`."""
    value = context.op_execution_context.op_config or {}
    return DistillRunConfig(**{k: v for k, v in value.items() if v is not None})
