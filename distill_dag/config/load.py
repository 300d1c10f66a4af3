"""Loading a config: a hardened YAML reader (size, binary, UTF-8, duplicate keys, alias bombs), ``base:``
chains, overrides on top, and validation by :class:`~distill_dag.config.schema.PipelineConfig`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from distill_dag.config.errors import ConfigError, format_validation_error, short_repr
from distill_dag.config.paths import is_bundled, resolve_config_path, resolve_paths
from distill_dag.config.schema import PipelineConfig
from distill_dag.safe_read import UnsafeFileError, read_bounded

MAX_CONFIG_BYTES = 1 << 20  # a config file above 1 MiB is refused (it is not a config)
MAX_YAML_NODES = 100_000  # values after expanding YAML aliases (an "alias bomb" expands to billions)
MAX_BASE_DEPTH = 16


def config_from_dict(data: dict[str, Any] | None, source: str = "<dict>", base_dir: str | os.PathLike | None = None,
                     context: dict[str, Any] | None = None) -> PipelineConfig:
    """Validate a config dict; relative paths in it resolve against ``base_dir`` (default: the current
    directory). ``context``: the validation context of the schema's derived rules (e.g.
    :data:`~distill_dag.config.schema.MUON_FOLLOWS_LR`)."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}:\n  key '<root>': the top level must be a mapping of "
                          f"sections, got {type(data).__name__}")
    data = resolve_paths(data or {}, Path(base_dir) if base_dir is not None else Path.cwd())
    try:
        return PipelineConfig.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _Loader(yaml.SafeLoader):
    """Safe YAML with duplicate mapping keys refused (with the line) and aliases bounded."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not None:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                  f"(first at line {first}): keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_yaml_map)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Values in ``node`` once aliases are expanded (memoized over the node graph, so a bomb is cheap to
    measure); stops counting past ``limit``."""
    memo: dict[int, int] = {}

    def size(n: yaml.Node, depth: int) -> int:
        if id(n) in memo:
            return memo[id(n)]
        if depth > 200:
            raise ConfigError("YAML nested more than 200 levels deep")
        memo[id(n)] = 0  # a recursive alias counts once
        s = 1
        if isinstance(n, yaml.SequenceNode):
            for c in n.value:
                s += size(c, depth + 1)
                if s > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                s += size(k, depth + 1) + size(v, depth + 1)
                if s > limit:
                    break
        memo[id(n)] = s
        return s

    return size(node, 0)


def read_yaml(path: Path) -> Any:
    """One YAML file, refused with a clear :class:`ConfigError` (naming the file) when it is a folder,
    too large, binary, not UTF-8, invalid YAML, has duplicate keys or expands past
    :data:`MAX_YAML_NODES` values through aliases."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a YAML config file")
    try:  # st_size lies for /dev/zero and FIFOs: the read itself is bounded and refuses non-regular files
        data = read_bounded(path, MAX_CONFIG_BYTES, "YAML config file")
    except UnsafeFileError as err:
        raise ConfigError(str(err)) from None
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file, not a YAML config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}): not a YAML config file") from None
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
                raise ConfigError(f"{path}: YAML aliases expand to more than {MAX_YAML_NODES:,} values "
                                  "(an alias bomb?); write the values out")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None


def _load_chain(path: Path, chain: list[Path]) -> dict[str, Any]:
    """The raw dict of ``path`` merged over its ``base:`` chain, paths already absolute."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in [*chain[chain.index(path):], path])
        raise ConfigError(f"base: cycle {cycle}: remove one of the base: lines")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: base: chain deeper than {MAX_BASE_DEPTH} files ({chain[0]} -> ...)")
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    raw = resolve_paths(raw, Path.cwd() if is_bundled(path) else path.parent)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: key 'base' must be one file name (e.g. base: train_direct.yaml), "
                          f"got {type(base).__name__} {short_repr(base)}")
    try:
        parent_path = resolve_config_path(base, relative_to=path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: key 'base': {err}") from None
    return deep_merge(_load_chain(parent_path, [*chain, path]), raw)


def load_config(name: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                context: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML config; ``overrides`` is a nested dict merged on top (CLI flags, Dagster run config),
    its relative paths relative to the current directory; ``context`` goes to validation (the schema's
    derived rules, e.g. the Muon LR rule of ``distill train --learning-rate``).

    A YAML file may start with ``base: other.yaml`` to inherit from another file (relative to its folder,
    or a bundled config by name).
    """
    path = resolve_config_path(name)
    raw = _load_chain(path, [])
    if overrides:
        if not isinstance(overrides, dict):
            raise ConfigError(f"overrides must be a mapping of sections, got {type(overrides).__name__}")
        raw = deep_merge(raw, resolve_paths(overrides, Path.cwd()))
    # every path is absolute by now: validation resolves nothing more
    return config_from_dict(raw, str(path), base_dir=Path.cwd(), context=context)
