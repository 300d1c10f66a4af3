"""The student: a RetNet trained by sparse top-k KD from the teacher (direct, cached or network)."""

import json
from pathlib import Path

import dagster as dg

from distill_dag.assets.common import loss_curve_png, md_image, md_table, pipeline_config, require_upstream
from distill_dag.assets.run_config import DistillRunConfig
from distill_dag.assets.teacher import logit_cache, teacher_adapters
from distill_dag.assets.data import tokenized_parquet, tokenizer
from distill_dag.resources import PipelineConfigResource, TeacherEndpointResource, WandbSettingsResource

GROUP = "student"


@dg.asset(
    deps=[tokenized_parquet, tokenizer, teacher_adapters, logit_cache],
    group_name=GROUP,
    kinds={"pytorch", "wandb"},
    owners=["team:modeling"],
    code_version="trainer-1",
    pool="gpu",
    description=(
        "RetNet student checkpoint trained by sparse top-k KL (+ CE) from the teacher; "
        "on the demo config a CE-only baseline with the same steps and tokens is trained beside it."
    ),
)
def student_ckpt(
    context: dg.AssetExecutionContext,
    config: DistillRunConfig,
    pipeline: PipelineConfigResource,
    teacher_endpoint: TeacherEndpointResource,
    wandb: WandbSettingsResource,
) -> dg.MaterializeResult:
    from distill_dag.distill.student_run import run_student

    cfg = pipeline_config(config, pipeline, teacher_endpoint.overrides(), wandb.overrides())
    require_upstream(cfg.tokenized_dir / "manifest.json", "tokenized_parquet", "student_ckpt")
    if cfg.train.teacher_mode == "cached" and not cfg.train.pretrain_ce_only:
        require_upstream(cfg.cache_dir, "logit_cache", "student_ckpt")
    teacher_endpoint.export_token(cfg.teacher.token_env)
    out = run_student(cfg, echo=context.log.info)
    kd = out["student"]
    metadata = {
        "checkpoint": dg.MetadataValue.path(str(kd.final_dir)),
        "run_dir": dg.MetadataValue.path(str(kd.run_dir)),
        "steps": kd.steps,
        "tokens": kd.tokens,
        "seconds": round(kd.seconds, 1),
        "tokens_per_s": round(kd.tokens / max(kd.seconds, 1e-9), 1),
        "final_train": dg.MetadataValue.json(kd.final),
        "val_loss": kd.val.get("val_loss"),
        "lineage": dg.MetadataValue.json(kd.lineage),
        "checkpoint_bytes": sum(f.stat().st_size for f in Path(kd.final_dir).iterdir() if f.is_file()),
        "events": len(kd.events),
    }
    series = {"kd train": _series(kd.history, "train", "loss"), "kd val": _series(kd.history, "val", "val_loss")}
    baseline = out.get("baseline")
    if baseline is not None:
        metadata["ce_only_val_loss"] = baseline.val.get("val_loss")
        metadata["kd_beats_ce_only"] = bool(kd.val["val_loss"] < baseline.val["val_loss"])
        metadata["comparison"] = md_table(
            [
                {"student": "KD", "steps": kd.steps, "tokens": kd.tokens, "val_loss": kd.val["val_loss"]},
                {"student": "CE only", "steps": baseline.steps, "tokens": baseline.tokens, "val_loss": baseline.val["val_loss"]},
            ]
        )
        series["ce-only train"] = _series(baseline.history, "train", "ce")
        series["ce-only val"] = _series(baseline.history, "val", "val_loss")
    metadata["loss_curve"] = md_image(loss_curve_png(series, "student loss"), "loss curve")
    url = wandb.log_checkpoint(kd.wandb_id, Path(kd.final_dir), "student_ckpt")
    if kd.wandb_url or url:
        metadata["wandb"] = dg.MetadataValue.url(kd.wandb_url or url)
    elif kd.wandb_dir:
        metadata["wandb_offline_dir"] = dg.MetadataValue.path(kd.wandb_dir)
    (Path(kd.run_dir) / "asset_metadata.json").write_text(
        json.dumps({k: v for k, v in metadata.items() if isinstance(v, (int, float, str, bool, type(None)))}, indent=2)
    )
    return dg.MaterializeResult(metadata=metadata)


def _series(history, kind, key):
    return [(h["step"], h[key]) for h in history if h.get("kind") == kind and key in h]
