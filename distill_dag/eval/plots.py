"""Plots as PNG bytes (matplotlib, headless): the one plotting helper of the reports and the Dagster layer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

Series = dict[str, list[tuple[float, float]]]


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` atomically as PNG and close it."""
    from distill_dag.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return path


def panels_png(panels: Sequence[tuple[str, str, Series]], *, xlabel: str = "step", width: float = 5.0,
               height: float = 3.6) -> bytes:
    """One row of line-plot panels, ``(title, ylabel, {name: [(x, y), ...]})`` each; panels never share a
    y axis, so quantities of different meaning (CE vs KL) are never drawn on one scale."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), dpi=100, squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], panels):
        for name, pts in series.items():
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(series.values()):
            ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def series(history: list[dict], kind: str, key: str) -> list[tuple[float, float]]:
    """``[(step, row[key])]`` of the ``metrics.jsonl`` rows of one kind (train / val)."""
    return [(h["step"], h[key]) for h in history if h.get("kind") == kind and key in h and h[key] is not None]
