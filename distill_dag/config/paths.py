"""Where configs live and how their paths resolve (the rule, also in the README):

- on the command line, a relative path is relative to the current directory;
- inside a config file, relative to the folder of that file (each file of a ``base:`` chain for its
  own keys); the bundled configs (``configs/``, reachable by name: ``--config demo.yaml``) are
  templates, so theirs are relative to the current directory;
- in a dict (Dagster run config, ``config_from_dict``), relative to the current directory.

A ``*name_or_path`` value (tokenizer, teacher, hf dataset) is a local folder when it starts with
``/ ./ ../ ~`` or exists there; otherwise it is a hub id and stays as written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from distill_dag.config.errors import ConfigError
from distill_dag.config.schema import PipelineConfig, SourceConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: distill_dag/config/paths.py -> ../../..
CONFIG_DIR = Path(os.environ.get("DISTILL_DAG_CONFIG_DIR", PROJECT_ROOT / "configs"))
DEFAULT_CONFIG = "demo.yaml"


def _path_kind(section: type[BaseModel], name: str) -> str | None:
    f = section.model_fields.get(name)
    extra = f.json_schema_extra if f is not None else None
    return extra.get("path") if isinstance(extra, dict) else None  # type: ignore[return-value]


def _resolve_one(value: str, kind: str, base: Path) -> str:
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if kind == "name_or_path":
        explicit = value.startswith(("./", "../", ".\\", "..\\")) or value in (".", "..")
        if not explicit and not (base / p).exists():
            return value  # a hub id
    return os.path.normpath(base / p)


def resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of the config dict ``raw`` with its relative path values made absolute against ``base``
    (fields marked :data:`PATH` / :data:`NAME_OR_PATH`); anything not understood is left to validation."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for sec, f in PipelineConfig.model_fields.items():
        d = out.get(sec)
        if not isinstance(d, dict):
            continue
        model = f.annotation
        d = dict(d)
        for name, v in d.items():
            kind = _path_kind(model, name)  # type: ignore[arg-type]
            if kind and isinstance(v, str) and v:
                d[name] = _resolve_one(v, kind, base)
            elif kind and isinstance(v, list):  # eval.lm_eval_tasks: names stay, task YAML paths resolve
                d[name] = [_resolve_one(x, kind, base) if isinstance(x, str) and x else x for x in v]
        if sec == "data" and isinstance(d.get("sources"), list):
            d["sources"] = [
                {k: (_resolve_one(v, _path_kind(SourceConfig, k), base)  # type: ignore[arg-type]
                     if _path_kind(SourceConfig, k) and isinstance(v, str) and v else v) for k, v in s.items()}
                if isinstance(s, dict) else s
                for s in d["sources"]
            ]
        out[sec] = d
    return out


def bundled_configs() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def resolve_config_path(name: str | os.PathLike | None, relative_to: str | os.PathLike | None = None) -> Path:
    """The config file ``name`` names, absolute: ``None`` -> the bundled demo.yaml; a path that exists
    (relative to ``relative_to``, default the current directory) -> it; else a bundled config by name."""
    if name is None:
        return (CONFIG_DIR / DEFAULT_CONFIG).resolve()
    p = Path(name).expanduser()
    here = p if p.is_absolute() else Path(relative_to or Path.cwd()) / p
    if here.exists():
        return here.resolve()
    if not p.is_absolute() and (CONFIG_DIR / p).exists():
        return (CONFIG_DIR / p).resolve()
    known = ", ".join(bundled_configs()) or "none"
    raise ConfigError(f"config file not found: {name} (looked in {Path(relative_to or Path.cwd())} and in the "
                      f"bundled configs: {known})")


def is_bundled(path: Path) -> bool:
    try:
        return path.resolve().parent == CONFIG_DIR.resolve()
    except OSError:
        return False
