"""Plots sized for the Dagster UI and comparing like with like (real matplotlib, PNGs decoded)."""

from __future__ import annotations

import io

import pytest

from distill_dag.eval import plots


def _size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size


def _history(n: int = 12) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        rows.append({"kind": "train", "step": s, "loss": 2.5 - 0.01 * s, "ce": 4.3 - 0.02 * s, "kl": 0.7 - 0.01 * s})
        if s % 4 == 0:
            rows.append({"kind": "val", "step": s, "val_loss": 4.4 - 0.02 * s})
    return rows


def test_training_panels_never_put_the_kd_objective_beside_a_ce():
    panels = plots.training_panels({"KD": _history(), "CE only": _history()})
    titles = [t for t, _, _ in panels]
    assert titles == ["train cross-entropy", "held-out cross-entropy", "KD term (KL to the teacher)"]
    ce = dict(panels[0][2]["KD"])
    assert ce[1] == pytest.approx(4.28)  # the train CE column, not the KD objective `loss` (2.49)
    assert dict(panels[1][2]["KD"])[4] == pytest.approx(4.32)


@pytest.mark.parametrize("n_panels", [1, 3, 5])
def test_panels_are_at_most_1000_px_wide(n_panels):
    panels = plots.training_panels({"KD": _history()}) * 2
    w, _ = _size(plots.panels_png(panels[:n_panels]))
    assert w <= 1000


def test_heatmap_numbers_are_white_on_dark_cells():
    cmap = plots.pyplot().get_cmap("RdYlGn")
    assert plots.text_color(0.0, 0.0, 1.0, cmap) == "white"  # dark red
    assert plots.text_color(0.5, 0.0, 1.0, cmap) == "black"  # light yellow
    assert plots.text_color(float("nan"), 0.0, 1.0, cmap) == "black"


def test_niah_and_long_context_figures_fit_the_ui(tmp_path):
    from PIL import Image

    from distill_dag.eval.long_context import plot_long_context
    from distill_dag.eval.niah import plot_heatmaps

    grid = [[1.0, 0.0, 0.5, 1.0, 0.0, 1.0]] * 5
    names = {"teacher": grid, "student": grid, "CE-only": grid, "converted": grid}
    p = plot_heatmaps(names, [0.0, 0.25, 0.5, 0.75, 1.0], [256, 512, 1024, 2048, 4096, 8192], tmp_path / "n.png",
                      reference="teacher", train_len=1024)
    assert Image.open(p).size[0] <= 1000
    ppl = {"train_len": 256, "bucket_edges": [0, 64, 256, 1024], "lengths": [256, 512, 1024],
           "by_position": {"a": [3.0, 2.5, 2.4], "b": [3.1, 2.6, 2.5]}, "by_length": {"a": [2.5, 2.6, 2.7], "b": [2.6, 2.7, 2.9]}}
    cost = {m: [{"context_length": L, "cache_bytes": 1 << 20, "ms_per_token": 3.0} for L in (256, 512, 1024)]
            for m in ("student", "CE-only")}  # equal caches: the lines must not coincide
    p = plot_long_context(ppl, cost, tmp_path / "lc.png")
    assert Image.open(p).size[0] <= 1000


def test_metadata_floats_are_rounded_at_the_boundary():
    import dagster as dg

    from distill_dag.defs.assets.common import rounded

    out = rounded({"kd": 4.265239399657832, "v": dg.MetadataValue.float(0.30000000000000004),
                   "j": dg.MetadataValue.json({"a": [1.0000001234]}), "n": 7, "s": "x"})
    assert out["kd"] == 4.2652 and out["v"].value == 0.3 and out["j"].value == {"a": [1.0]}
    assert out["n"] == 7 and out["s"] == "x"
