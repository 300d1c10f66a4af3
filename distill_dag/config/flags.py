"""Command-line flags generated from the schema, as the Dagster run config is (``defs/assets/run_config.py``).

:func:`flag_kwargs` turns a config key (``"tokenize.max_seq_length"``) into the ``argparse`` arguments of
its flag: the type from the field's annotation, the choices of a ``Literal``, a ``--x/--no-x`` pair for a
bool, a comma-separated list for a list, and the help from the field's description, bounds and key.
``distill`` (``distill_dag/cli.py``) lists which keys each verb exposes; the value a flag gets goes into
the overrides that :func:`~distill_dag.config.load_config` validates, so a bad value is refused naming
its key, like the same value in a file.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Callable, Literal

from pydantic.fields import FieldInfo

from distill_dag.config.schema import PipelineConfig

_BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def field_of(key: str) -> FieldInfo:
    """The schema field of a dotted key ``section.name``."""
    section, name = key.split(".")
    return PipelineConfig.model_fields[section].annotation.model_fields[name]  # type: ignore[union-attr]


def _plain(annotation: Any) -> Any:
    """``X | None`` -> ``X``; ``Annotated[X, ...]`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [item(t.strip()) for t in text.split(",") if t.strip()]

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')} list"
    return parse


def _help(f: FieldInfo, key: str, text: str | None) -> str:
    bounds = ", ".join(f"{word} {getattr(m, attr)}" for m in f.metadata for attr, word in _BOUND_WORDS.items()
                       if getattr(m, attr, None) is not None)
    return f"{text or f.description} ({key}{'; ' + bounds if bounds else ''})".replace("%", "%%")


def flag_kwargs(key: str, help: str | None = None, **extra: Any) -> dict[str, Any]:
    """``argparse`` ``add_argument`` keywords of the flag that sets ``key`` (every default None: a flag not
    given leaves the config's value). ``help``: the flag's own wording instead of the field's description;
    ``extra``: more keywords (``metavar``), which win."""
    f = field_of(key)
    ann = _plain(f.annotation)
    kw: dict[str, Any] = {"default": None, "help": _help(f, key, help)}
    if ann is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(ann) is Literal:
        kw.update(type=type(typing.get_args(ann)[0]), choices=list(typing.get_args(ann)))
    elif typing.get_origin(ann) is list:
        kw.update(type=_comma_list(_plain(typing.get_args(ann)[0])), metavar="A,B")
    else:
        kw["type"] = ann
    return {**kw, **extra}
