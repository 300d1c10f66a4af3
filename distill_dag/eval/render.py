"""The rendering of a checkpoint evaluation (:func:`distill_dag.eval.report.evaluate_checkpoint`): the
measurements of :mod:`distill_dag.eval.measure` as files (JSON, PNG) and as the sections of ``report.md``.
Nothing here runs a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from distill_dag.eval.long_context import markdown, plot_long_context
from distill_dag.eval.niah import comparison_markdown, plot_heatmaps, ratio_grid
from distill_dag.eval.plots import panels_png, read_history, training_panels
from distill_dag.io import write_bytes_atomic, write_json_atomic
from distill_dag.loss.perplexity import table_markdown


def one_line(s: str, limit: int = 160) -> str:
    """A sample's text as one table-safe line of at most ``limit`` characters."""
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def loss_curves_png(metrics_jsonl: Path, path: Path) -> Path | None:
    """Loss curves from a run's metrics.jsonl, like beside like: train CE, held-out CE and the KD term (KL)
    each on its own axis. ``train/loss`` (the KD objective, a mix of CE and KL) is never drawn beside a CE:
    on one axis it suggested a train/val gap that does not exist."""
    history = read_history(metrics_jsonl)
    panels = [p for p in training_panels({"student": history}) if any(p[2].values())]
    if not panels:
        return None
    write_bytes_atomic(Path(path), panels_png(panels, width=3.3, height=3.0))
    return Path(path)


def find_metrics(checkpoint: Path) -> Path | None:
    """The ``metrics.jsonl`` of the run a checkpoint belongs to (in it, or one or two folders up)."""
    for d in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (d / "metrics.jsonl").exists():
            return d / "metrics.jsonl"
    return None


def niah_summary_markdown(per_model: dict[str, dict[str, Any]], train_len: int) -> str:
    """Each model's NIAH accuracy: overall, at, within and beyond the training length."""
    summary = ["| model | overall | at the training length (" + str(train_len) + ") | within | beyond |",
               "|---|---:|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for n, v in per_model.items():
        summary.append(f"| {n} | {v['accuracy']:.2f} | {fmt(v['accuracy_at_train_len'])} | "
                       f"{fmt(v['accuracy_within_train_len'])} | {fmt(v['accuracy_beyond_train_len'])} |")
    return "\n".join(summary)


def render_niah(raw: dict[str, Any], per_model: dict[str, dict[str, Any]], teacher_name: str | None,
                lengths: list[int], depths: list[float], train_len: int, out: Path,
                result: dict[str, Any]) -> list[str]:
    """``niah_heatmap.png`` and ``niah.json`` into ``out``, the NIAH keys into ``result``; returns the report's
    NIAH section."""
    grids = {n: v["grid"] for n, v in per_model.items()}
    png = plot_heatmaps(grids, depths, lengths, out / "niah_heatmap.png", reference=teacher_name,
                        train_len=train_len, title="NIAH pass-key accuracy; bottom: ratio to the teacher per cell")
    ratios = {n: ratio_grid(g, grids[teacher_name]) for n, g in grids.items()
              if teacher_name is not None and n != teacher_name}
    r = raw["student"]
    result.update(niah_png=str(png), niah_accuracy=r["accuracy"], niah_grid=r["grid"],
                  niah_table=r["table_markdown"], niah_models=per_model, niah_ratio_grids=ratios,
                  niah_context_lengths=lengths, niah_depths=depths, niah_train_len=train_len,
                  niah_comparison_table=comparison_markdown(grids, depths, lengths, teacher_name))
    result.update(niah_accuracy_at_train_len=per_model["student"]["accuracy_at_train_len"])
    if teacher_name is not None:
        result.update(niah_teacher_accuracy=per_model[teacher_name]["accuracy"],
                      niah_teacher_accuracy_at_train_len=per_model[teacher_name]["accuracy_at_train_len"])
    sections = [niah_summary_markdown(per_model, train_len), "", "![NIAH heat-maps](niah_heatmap.png)", "",
                "Per cell: accuracy (ratio to the teacher's cell):", "", result["niah_comparison_table"], ""]
    write_json_atomic(out / "niah.json", raw)
    return sections


def render_long_context(lc: dict[str, Any], cost: dict[str, list[dict[str, Any]]], out: Path,
                        result: dict[str, Any]) -> list[str]:
    """``long_context.png`` and ``long_context.json`` into ``out``, the long-context keys into ``result``;
    returns the report's long-context section."""
    png = plot_long_context(lc, cost, out / "long_context.png")
    table = markdown(lc, cost)
    write_json_atomic(out / "long_context.json", {"perplexity": lc, "generation": cost})
    result.update(long_context_png=str(png), long_context_table=table, long_context_ppl=lc, generation_cost=cost)
    return [table, "", "![long context](long_context.png)", ""]


def report_markdown(result: dict[str, Any], *, data_dir: str | Path, split: str, train_len: int,
                    niah_haystack: str | None, niah_sections: list[str], long_context_multiples: Sequence[int],
                    lc_sections: list[str], lm_eval_lines: list[str], samples: list[dict[str, str]]) -> str:
    """``report.md``: the perplexity table, then each section that was measured, the loss curves and the
    sample generations."""
    ppl_rows = result["perplexity_rows"]
    lines = [
        "# Evaluation report",
        "",
        f"- checkpoint: `{result['checkpoint'] or 'in-memory model'}`",
        f"- data: `{data_dir}` split `{split}`, {ppl_rows[0]['tokens']} scored tokens "
        "(labels unshifted; position t scored against label t+1)",
        "",
        "## Perplexity",
        "",
        table_markdown(ppl_rows),
        "",
    ]
    if niah_sections:
        lines += ["## Needle in a haystack", "",
                  f"Needle \"The pass key is NNNNN.\" in {niah_haystack}; greedy generation, exact match of "
                  f"the digits. Rows: depth of the needle; columns: context length in tokens (training length "
                  f"{train_len}; `*` marks lengths beyond it).", ""]
        lines += niah_sections
    if lc_sections:
        lines += ["## Long context", "",
                  f"Contexts of 1x-{long_context_multiples[-1]}x the training length ({train_len}) cut from "
                  "held-out text (documents concatenated, positions 0..L-1). The student's recurrent state has "
                  "a fixed size; the teacher's KV cache grows with the context.", ""]
        lines += lc_sections
    lines += lm_eval_lines
    if result["loss_png"]:
        lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    lines += ["## Sample generations (greedy, held-out prompts)", ""]
    for i, s in enumerate(samples, 1):
        lines += [f"### sample {i}", "", "prompt:", "```", s["prompt"], "```", "generated:", "```", s["generated"],
                  "```"]
        if "hybrid generated" in s:
            lines += ["generated by the hybrid student:", "```", s["hybrid generated"], "```"]
        lines += ["reference:", "```", s["reference"], "```", ""]
    return "\n".join(lines)
