"""What every asset module shares: the run's config, lineage read from Dagster, code versions, metadata."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

import dagster as dg

from distill_dag.assets.run_config import DistillRunConfig
from distill_dag.config import ConfigError, PipelineConfig, deep_merge, load_config
from distill_dag.io import sha256_json
from distill_dag.resources import PipelineConfigResource

MODULE = "distill_dag.definitions"
PACKAGE = Path(__file__).resolve().parent.parent


# ---- config ----------------------------------------------------------------------------------
def location_config_file() -> str:
    """The code location's config file (``DISTILL_DAG_CONFIG``; default: the bundled demo.yaml)."""
    return os.environ.get("DISTILL_DAG_CONFIG") or "demo.yaml"


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
    try:
        return load_config(config.config_file or pipeline.config_file, overrides)
    except ConfigError as err:
        raise dg.Failure(description=str(err)) from None


def resolve_config(context: dg.AssetExecutionContext, config: DistillRunConfig, pipeline: PipelineConfigResource,
                   *extra: dict[str, Any]) -> PipelineConfig:
    """:func:`pipeline_config`, recorded on the run: tags with the file and the resolved config's hash,
    and the whole resolved config in the run's log (the materialization metadata repeats it)."""
    cfg = pipeline_config(config, pipeline, *extra)
    tree = cfg.model_dump(mode="json")
    digest = sha256_json(tree)
    tags = {"distill/config_file": str(config.config_file or pipeline.config_file), "distill/config_sha256": digest[:16]}
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


def code_version(*files: str) -> str:
    """A code version that changes when the code that shapes an asset's output changes: the sha256 of
    those source files (paths relative to the package), read as text without importing them."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        h.update((PACKAGE / f).read_bytes())
    return h.hexdigest()[:12]


# ---- metadata --------------------------------------------------------------------------------
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
    if kind == "float":
        return float(f"{float(v):.6g}")
    if kind == "string":
        return str(v)
    return v
