"""Evaluation of the student checkpoint: perplexity table, needle-in-a-haystack, a report."""

from pathlib import Path

import dagster as dg

from distill_dag.assets.common import md_image, md_table, pipeline_config, require_upstream
from distill_dag.assets.run_config import DistillRunConfig
from distill_dag.assets.student import student_ckpt
from distill_dag.resources import PipelineConfigResource

GROUP = "eval"


@dg.asset(
    deps=[student_ckpt],
    group_name=GROUP,
    kinds={"pytorch", "markdown"},
    owners=["team:modeling"],
    code_version="eval-1",
    pool="gpu",
    description="Perplexity (student, teacher, CE-only baseline), needle-in-a-haystack heat-map, samples, report.",
)
def eval_report(context: dg.AssetExecutionContext, config: DistillRunConfig, pipeline: PipelineConfigResource) -> dg.MaterializeResult:
    from distill_dag.eval.report import evaluate_run

    cfg = pipeline_config(config, pipeline)
    require_upstream(cfg.run_dir / "final", "student_ckpt", "eval_report")
    r = evaluate_run(cfg, log=context.log.info)
    metadata = {
        "report": dg.MetadataValue.path(str(r["report_path"])),
        "perplexity": md_table(r["perplexity_rows"]),
    }
    if r.get("niah_png"):
        metadata["niah_heatmap"] = md_image(Path(r["niah_png"]).read_bytes(), "needle-in-a-haystack")
        metadata["niah_accuracy"] = r.get("niah_accuracy")
    if r.get("loss_png"):
        metadata["loss_curves"] = md_image(Path(r["loss_png"]).read_bytes(), "loss curves")
    if r.get("samples"):
        metadata["samples"] = md_table(r["samples"])
    return dg.MaterializeResult(metadata=metadata)
