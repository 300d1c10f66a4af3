"""What every asset module shares: config resolution, upstream checks, metadata helpers."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Iterable

import dagster as dg

from distill_dag.assets.run_config import DistillRunConfig
from distill_dag.config import ConfigError, PipelineConfig, deep_merge, load_config
from distill_dag.resources import PipelineConfigResource

MODULE = "distill_dag.definitions"


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


def require_upstream(path: Path, upstream: str, this: str) -> None:
    """Fail with the selection to use when an upstream asset's files are not on disk."""
    if not path.exists():
        raise dg.Failure(
            description=(
                f"{this} needs the '{upstream}' asset, which has not been materialized ({path} is missing). "
                f"Materialize it with its ancestors first: dagster asset materialize --select '*{this}' -m {MODULE}"
            )
        )


def md_image(png: bytes, alt: str = "plot") -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI (markdown with a data URI)."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def md_table(rows: Iterable[dict[str, Any]]) -> dg.MetadataValue:
    rows = list(rows)
    if not rows:
        return dg.MetadataValue.md("_(empty)_")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def loss_curve_png(series: dict[str, list[tuple[int, float]]], title: str) -> bytes:
    """Line plot of named (step, value) series, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
