"""What every asset module shares: the run's config, lineage read from Dagster, code versions, metadata."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any, Iterable

import dagster as dg

from distill_dag.defs.assets.run_config import RUN_CONFIG, DistillRunConfig, location_config_file  # noqa: F401 (re-exported)
from distill_dag.config import ConfigError, PipelineConfig, deep_merge, load_config
from distill_dag.io import sha256_json
from distill_dag.defs.resources import PipelineConfigResource

MODULE = "distill_dag.definitions"
PACKAGE = Path(__file__).resolve().parents[2]  # distill_dag/ (this file is defs/assets/common.py)


# ---- config ----------------------------------------------------------------------------------
def location_config() -> PipelineConfig:
    """The code location's config: what the graph's shape (edges, schedule) follows."""
    return load_config(location_config_file())


def pipeline_config(
    config: DistillRunConfig, pipeline: PipelineConfigResource, *extra: dict[str, Any]
) -> PipelineConfig:
    """The run's config: the YAML file (run config's ``config_file`` or the resource's) + overrides."""
    overrides: dict[str, Any] = {}
    for o in (*extra, config.overrides()):
        overrides = deep_merge(overrides, o)
    source = config.config_file or pipeline.config_file
    try:
        return load_config(source, overrides)
    except ConfigError as err:
        keys = sorted(f"{s}.{k}" for s, v in config.overrides().items() for k in v)
        # name where the values came from: the run config's keys over the file, not the file alone
        raise dg.Failure(description=(f"the run config's values ({', '.join(keys)}) over {source} are refused: {err}"
                                      if keys else str(err))) from None


def resolve_config(context: dg.AssetExecutionContext, config: DistillRunConfig, pipeline: PipelineConfigResource,
                   *extra: dict[str, Any]) -> PipelineConfig:
    """:func:`pipeline_config`, recorded on the run: tags with the file and the resolved config's hash,
    and the whole resolved config in the run's log (the materialization metadata repeats it)."""
    cfg = pipeline_config(config, pipeline, *extra)
    tree = cfg.model_dump(mode="json")
    digest = sha256_json(tree)
    # the whole hash: a prefix cannot be compared with the sha256 that `distill` prints or a model card records
    tags = {"distill/config_file": str(config.config_file or pipeline.config_file), "distill/config_sha256": digest}
    run = context.instance.get_run_by_id(context.run_id)
    if run is not None and any(run.tags.get(k) != v for k, v in tags.items()):
        context.instance.add_run_tags(context.run_id, tags)
    context.log.debug(f"resolved config {digest[:16]}: {tree}")
    return cfg


def config_metadata(cfg: PipelineConfig, *sections: str) -> dict[str, dg.MetadataValue]:
    """The resolved config of the sections that shape this asset, as materialization metadata."""
    tree = cfg.model_dump(mode="json")
    return {"config": dg.MetadataValue.json({s: tree[s] for s in sections} if sections else tree)}


# ---- lineage ---------------------------------------------------------------------------------
def _latest(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> Any:
    if partition is None:
        return instance.get_latest_materialization_event(dg.AssetKey(asset))
    recs = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return recs[0].event_log_entry if recs else None


def upstream_path(context: dg.AssetExecutionContext, asset: str, expected: Path, this: str,
                  partition: str | None = None) -> Path:
    """Where ``asset`` (partition) last wrote, from its latest materialization's ``path``.

    The run's config must point at the same place: else the run fails naming both, so the edge in the
    UI is the data this run reads. Without any materialization in this instance (files written by the
    CLI, or by another Dagster instance), the config's path is used when it exists, with a warning.
    """
    event = _latest(context.instance, asset, partition)
    what = f"'{asset}'" + (f" partition '{partition}'" if partition else "")
    if event is None or event.asset_materialization is None or "path" not in event.asset_materialization.metadata:
        if expected.exists():
            context.log.warning(f"{what} has no materialization in this Dagster instance; reading {expected} "
                                "(written outside Dagster) as the config says")
            return expected
        raise dg.Failure(description=(
            f"{this} needs {what}, which has not been materialized ({expected} is missing). Materialize it with its "
            f"ancestors first: dagster asset materialize --select '*{asset}' -m {MODULE}"
            + (f" --partition {partition}" if partition else f", or this asset with them: --select '*{this}'")
            + " (`make demo` runs the whole graph)"
        ))
    wrote = Path(str(event.asset_materialization.metadata["path"].value))
    if wrote.resolve() != expected.resolve():
        raise dg.Failure(description=(
            f"{this}: this run's config reads {what} from {expected}, but its latest materialization "
            f"(run {event.run_id[:8]}) wrote {wrote}. Run with the config the upstream was built with "
            f"(same data.root / output dirs), or re-materialize {asset} with this config first"
        ))
    if not wrote.exists():
        raise dg.Failure(description=(
            f"{this}: {what} was materialized at {wrote} (run {event.run_id[:8]}), but it is gone from disk; "
            f"re-materialize it: dagster asset materialize --select {asset} -m {MODULE}"
        ))
    return wrote


# Modules that cannot change what an asset writes: progress, W&B and log plumbing. A change there must
# not mark every model stale. Anything else an entry point reaches counts, because it may shape the output.
CODE_VERSION_EXCLUDE = frozenset({
    "distill_dag.training.telemetry",
})
# Imports that only validate, never shape an output: the config checks student.overrides against the model
# (a refusal, not a different result). The Dagster layer itself (assets, resources) counts only as an entry
# point, not when reached.
CODE_VERSION_SKIP_EDGES = frozenset({
    ("distill_dag.config.schema", "distill_dag.model.variants"),
})
_DAGSTER_LAYER = ("distill_dag.defs.assets.", "distill_dag.defs.resources")

# The core entry points each asset calls (the plain-Python functions under the Dagster layer); its code
# version covers every distill_dag module they import, transitively, so nobody keeps a file list by hand.
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "raw_jsonl": ("distill_dag.data.sources",),
    "tokenizer": ("distill_dag.data.tokenizer",),
    "tokenized_parquet": ("distill_dag.data.pack", "distill_dag.data.manifest", "distill_dag.data.stats",
                          "distill_dag.data.tokenizer"),
    "teacher_adapters": ("distill_dag.teacher.finetune",),
    "logit_cache": ("distill_dag.teacher.cache_stage", "distill_dag.teacher.cache.reader",
                    "distill_dag.teacher.cache.stats", "distill_dag.teacher.cache.layout"),
    "student_aligned": ("distill_dag.student.run",),
    "student_ce_baseline": ("distill_dag.student.run", "distill_dag.defs.pipes_worker"),
    "student_ckpt": ("distill_dag.student.run", "distill_dag.defs.pipes_worker"),
    "student_hybrid": ("distill_dag.student.run", "distill_dag.defs.pipes_worker",
                       "distill_dag.model.hub"),
    "eval_report": ("distill_dag.eval.report",),
}


def _module_file(root: Path, module: str) -> Path | None:
    """The source file of ``distill_dag.x.y`` under ``root`` (the package folder), or None if not ours."""
    parts = module.split(".")
    if parts[0] != root.name:
        return None
    base = root.joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(root: Path, module: str, path: Path) -> set[str]:
    """Every ``distill_dag`` module that ``module``'s source imports, at any depth of its body (this
    package imports torch-heavy code inside functions, so module-level imports alone would miss most)."""
    import ast

    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            # `from pkg import mod` imports the submodule when there is one
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return {m for m in out if m.split(".")[0] == root.name}


def module_closure(entries: Iterable[str], root: Path = PACKAGE) -> dict[str, Path]:
    """``{module: source file}`` of the entries and every package module they import, transitively,
    minus :data:`CODE_VERSION_EXCLUDE`. ``root`` is the package folder (a copy of it in tests)."""
    entries = list(entries)
    seen: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        mod = todo.pop()
        if mod in seen or mod in CODE_VERSION_EXCLUDE:
            continue
        if mod.startswith(_DAGSTER_LAYER) and mod not in entries:
            continue
        f = _module_file(root, mod)
        if f is None:
            continue  # a name imported from a module (``from x import func``), not a module
        seen[mod] = f
        todo.extend(m for m in _imports(root, mod, f) if (mod, m) not in CODE_VERSION_SKIP_EDGES)
    return dict(sorted(seen.items()))


def code_version(*entries: str, root: Path = PACKAGE) -> str:
    """A code version that changes when the code that shapes an output changes: the sha256 of the source
    of ``entries`` (module names) and of every package module they import, read without importing them."""
    h = hashlib.sha256()
    for mod, f in module_closure(entries, root).items():
        h.update(mod.encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def asset_code_version(asset: str, root: Path = PACKAGE) -> str:
    """The code version of ``asset``: :func:`code_version` of its :data:`ENTRY_POINTS`."""
    return code_version(*ENTRY_POINTS[asset], root=root)


# ---- metadata --------------------------------------------------------------------------------
def stage_asset(name: str, *, group: str, owner: str, kinds: set[str], gpu: bool = False, **kwargs: Any):
    """``@dg.asset`` with what every stage shares: its name, group, owner and kinds; the run config (validated at
    launch); the code version of its core entry point's import closure; and, for steps that hold the
    accelerator, the ``gpu`` pool. ``kwargs`` (deps, description, check_specs, partitions) pass through."""
    return dg.asset(name=name, group_name=group, owners=[owner], kinds=kinds, config_schema=RUN_CONFIG,
                    code_version=asset_code_version(name), pool="gpu" if gpu else None, **kwargs)


def md_image(png: bytes, alt: str = "plot") -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI (markdown with a data URI)."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def table(rows: Iterable[dict[str, Any]]) -> dg.MetadataValue:
    """Row dicts as a typed ``MetadataValue.table`` (column types inferred from the first row)."""
    rows = list(rows)
    if not rows:
        return dg.MetadataValue.md("_(empty)_")
    cols = list(rows[0])
    kinds = {bool: "bool", int: "int", float: "float"}

    def kind(c: str) -> str:
        v = next((r.get(c) for r in rows if r.get(c) is not None), None)
        return kinds.get(type(v), "string")

    schema = dg.TableSchema(columns=[dg.TableColumn(c, kind(c)) for c in cols])
    records = [dg.TableRecord({c: _cell(r.get(c), kind(c)) for c in cols}) for r in rows]
    return dg.MetadataValue.table(records, schema=schema)


def _cell(v: Any, kind: str) -> Any:
    if v is None:
        return None
    if kind == "float":  # 4 significant digits: ppl 69.82 vs 82.14 reads at a glance, 69.8206 did not
        return float(f"{float(v):.4g}")
    if kind == "string":
        return str(v)
    return v


def _round(v: Any, digits: int) -> Any:
    if isinstance(v, float) and v == v and abs(v) not in (float("inf"),):
        return float(f"{v:.{digits}g}")
    if isinstance(v, dict):
        return {k: _round(x, digits) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_round(x, digits) for x in v]
    return v


def rounded(metadata: dict[str, Any], digits: int = 5) -> dict[str, Any]:
    """Metadata with floats at ``digits`` significant digits (plain floats, float and JSON metadata values):
    a loss read off the UI as 4.2652, not 4.265239399657832. Rounded here, at the metadata boundary, so the
    files on disk keep full precision."""
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        if isinstance(v, float):
            out[k] = _round(v, digits)
        elif isinstance(v, dg.FloatMetadataValue) and v.value is not None:
            out[k] = dg.MetadataValue.float(_round(float(v.value), digits))
        elif isinstance(v, dg.JsonMetadataValue):
            out[k] = dg.MetadataValue.json(_round(v.value, digits))
        elif isinstance(v, dict) and not isinstance(v, dg.MetadataValue):
            out[k] = dg.MetadataValue.json(_round(v, digits))
        else:
            out[k] = v
    return out

