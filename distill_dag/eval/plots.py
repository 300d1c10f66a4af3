"""Plots as PNG bytes (matplotlib, headless): the one plotting helper of the reports and the Dagster layer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from distill_dag.io import atomic_path

Series = dict[str, list[tuple[float, float]]]


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the figures are at most ~1000 px wide (MAX_WIDTH_IN): at matplotlib's default 12/10 pt, neighbouring
    # panels' titles and x labels ran into each other in the UI (the long-context figure); these sizes fit
    matplotlib.rcParams.update({"axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7,
                                "ytick.labelsize": 7, "legend.fontsize": 7, "figure.titlesize": 10})
    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` atomically as PNG and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return path


MAX_WIDTH_IN = 9.8  # at 100 dpi: under 1000 px, so the Dagster UI's metadata pop-up never cuts a figure off
DPI = 100
# line styles and markers cycled together with the colours, so lines that overlap stay told apart
STYLES = [dict(ls="-", marker="o"), dict(ls="--", marker="s"), dict(ls="-.", marker="^"), dict(ls=":", marker="D")]


def figsize(width: float, height: float) -> tuple[float, float]:
    """``(width, height)`` in inches, scaled down together so the PNG is at most ~1000 px wide."""
    if width <= MAX_WIDTH_IN:
        return width, height
    return MAX_WIDTH_IN, height * MAX_WIDTH_IN / width


def text_color(value: float, vmin: float, vmax: float, cmap: Any) -> str:
    """White on dark cells, black on light ones (the colour's luminance), so heat-map numbers stay readable."""
    if value != value:  # NaN: the empty cell is light
        return "black"
    x = 0.0 if vmax == vmin else min(max((value - vmin) / (vmax - vmin), 0.0), 1.0)
    r, g, b, _ = cmap(x)
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 else "black"


def plot_lines(ax: Any, series: Series) -> None:
    """Each series with its own colour, line style and (sparse) markers, and a legend entry per line;
    a marker every ~10 points keeps two equal lines visible (the markers of the second sit beside)."""
    for i, (name, pts) in enumerate(series.items()):
        if not pts:
            continue
        xs, ys = zip(*pts)
        style = STYLES[i % len(STYLES)]
        every = max(1, len(pts) // 10)
        ax.plot(xs, ys, label=name, color=f"C{i}", ls=style["ls"], marker=style["marker"],
                markevery=(i * every // max(len(series), 1) % every, every), markersize=4, lw=1.4)


def panels_png(panels: Sequence[tuple[str, str, Series]], *, xlabel: str = "step", width: float = 5.0,
               height: float = 3.6) -> bytes:
    """One row of line-plot panels, ``(title, ylabel, {name: [(x, y), ...]})`` each; panels never share a
    y axis, so quantities of different meaning (CE vs KL) are never drawn on one scale. At most ~1000 px wide."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=figsize(width * len(panels), height), dpi=DPI, squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], panels):
        plot_lines(ax, series)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if any(series.values()):
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def training_panels(runs: dict[str, list[dict]]) -> list[tuple[str, str, Series]]:
    """Like beside like for training runs ``{name: metrics.jsonl rows}``: train CE of every run on one axis,
    held-out CE on another, and the KD term (KL to the teacher) alone on a third. The KD objective
    (a mix of CE and KL) is never drawn beside a plain CE."""
    return [
        ("train cross-entropy", "nats/token", {n: series(h, "train", "ce") for n, h in runs.items()}),
        ("held-out cross-entropy", "nats/token", {n: series(h, "val", "val_loss") for n, h in runs.items()}),
        ("KD term (KL to the teacher)", "nats/token",
         {n: pts for n, h in runs.items() if (pts := measured_kl(series(h, "train", "kl")))}),
    ]


def measured_kl(kl: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The steps whose ``kl`` was measured. The trainer logs ``kl: 0.0`` where no teacher ran (a CE-only run,
    a KD run's CE warm-up): drawn, a CE-only run was a flat line at 0 in the UI, read as "matches the teacher
    perfectly". A measured KL between two softmaxes is never exactly 0.0."""
    return [(x, y) for x, y in kl if y != 0]


def read_history(metrics_jsonl: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (a line cut by a crash is skipped; none when missing)."""
    import json

    p = Path(metrics_jsonl)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def series(history: list[dict], kind: str, key: str) -> list[tuple[float, float]]:
    """``[(step, row[key])]`` of the ``metrics.jsonl`` rows of one kind (train / val)."""
    return [(h["step"], h[key]) for h in history if h.get("kind") == kind and key in h and h[key] is not None]
