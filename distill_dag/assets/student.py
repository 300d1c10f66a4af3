"""The student: a RetNet trained by sparse top-k KD from the teacher (direct, cached or network).

``train.launcher: in_process`` trains inside the Dagster step (CPU demo, one GPU); ``torchrun`` launches
``torchrun --standalone --local-addr 127.0.0.1 --nproc-per-node N -m distill_dag.assets.student_pipes`` through Dagster Pipes, which streams
the logs and reports the same metadata back. Same core code path either way (``run_student``).
"""

import sys
from pathlib import Path

import dagster as dg

from distill_dag.assets.common import loss_curve_png, md_table, pipeline_config, require_upstream
from distill_dag.assets.data import tokenized_parquet, tokenizer
from distill_dag.assets.run_config import DistillRunConfig
from distill_dag.assets.teacher import logit_cache, teacher_adapters
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
        "with train.ce_only_baseline a CE-only student with the same steps and tokens is trained beside it."
    ),
)
def student_ckpt(
    context: dg.AssetExecutionContext,
    config: DistillRunConfig,
    pipeline: PipelineConfigResource,
    teacher_endpoint: TeacherEndpointResource,
    wandb: WandbSettingsResource,
):
    cfg = pipeline_config(config, pipeline, teacher_endpoint.overrides(), wandb.overrides())
    require_upstream(cfg.tokenized_dir / "manifest.json", "tokenized_parquet", "student_ckpt")
    if cfg.train.teacher_mode == "cached" and not cfg.train.pretrain_ce_only:
        require_upstream(cfg.cache_dir, "logit_cache", "student_ckpt")
    teacher_endpoint.export_token(cfg.teacher.token_env)
    if cfg.train.launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
                   "--nproc-per-node", str(cfg.train.nproc_per_node),
                   "-m", "distill_dag.assets.student_pipes"]
        invocation = dg.PipesSubprocessClient().run(
            context=context, command=command, extras={"config": cfg.model_dump(mode="json")}
        )
        return invocation.get_materialize_result()

    from distill_dag.distill.student_run import run_student

    out = run_student(cfg, echo=context.log.info)
    raw = student_metadata(out)
    url = wandb.log_checkpoint(out["student"].wandb_id, Path(out["student"].final_dir), "student_ckpt")
    if url:
        raw["wandb"] = ("url", url)
    return dg.MaterializeResult(metadata={k: _metadata_value(kind, v) for k, (kind, v) in raw.items()})


def student_metadata(out: dict) -> dict[str, tuple[str, object]]:
    """``{name: (pipes metadata type, raw value)}`` of a student run; the in-process and the Pipes
    paths both report exactly this."""
    import base64

    kd, baseline = out["student"], out.get("baseline")
    meta: dict[str, tuple[str, object]] = {
        "checkpoint": ("path", str(kd.final_dir)),
        "run_dir": ("path", str(kd.run_dir)),
        "steps": ("int", kd.steps),
        "tokens": ("int", kd.tokens),
        "seconds": ("float", round(kd.seconds, 1)),
        "tokens_per_s": ("float", round(kd.tokens / max(kd.seconds, 1e-9), 1)),
        "final_train": ("json", kd.final),
        "val_loss": ("float", kd.val.get("val_loss")),
        "lineage": ("json", kd.lineage),
        "checkpoint_bytes": ("int", sum(f.stat().st_size for f in Path(kd.final_dir).iterdir() if f.is_file())),
        "events": ("int", len(kd.events)),
    }
    series = {"KD train": _series(kd.history, "train", "loss"), "KD val": _series(kd.history, "val", "val_loss")}
    if baseline is not None:
        meta["ce_only_val_loss"] = ("float", baseline.val.get("val_loss"))
        meta["kd_beats_ce_only"] = ("bool", bool(kd.val["val_loss"] < baseline.val["val_loss"]))
        meta["comparison"] = ("md", md_table([
            {"student": "KD", "steps": kd.steps, "tokens": kd.tokens, "val_loss": kd.val["val_loss"]},
            {"student": "CE only", "steps": baseline.steps, "tokens": baseline.tokens, "val_loss": baseline.val["val_loss"]},
        ]).value)
        series["CE-only train"] = _series(baseline.history, "train", "ce")
        series["CE-only val"] = _series(baseline.history, "val", "val_loss")
    if (al := out.get("alignment")) is not None:  # stage 1 of student.init: from_teacher
        meta["alignment"] = ("json", {
            "steps": al.steps, "tokens": al.tokens, "reused": al.reused, "student": str(al.final_dir),
            "val_mse_before": al.mse_before, "val_mse_after": al.mse_after,
            "val_rel_mse_before": al.rel_mse_before, "val_rel_mse_after": al.rel_mse_after,
            "tensors_copied": len(al.conversion["mapping"]), "tensors_new": len(al.conversion["new_params"]),
        })
    png = loss_curve_png(series, "student loss")
    meta["loss_curve"] = ("md", f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})")
    if kd.wandb_url:
        meta["wandb"] = ("url", kd.wandb_url)
    elif kd.wandb_dir:
        meta["wandb_offline_dir"] = ("path", kd.wandb_dir)
    return {k: v for k, v in meta.items() if v[1] is not None}


def _metadata_value(kind: str, value: object) -> dg.MetadataValue:
    return {
        "path": dg.MetadataValue.path, "url": dg.MetadataValue.url, "json": dg.MetadataValue.json,
        "md": dg.MetadataValue.md, "int": dg.MetadataValue.int, "float": dg.MetadataValue.float,
        "bool": dg.MetadataValue.bool,
    }[kind](value)


def _series(history, kind, key):
    return [(h["step"], h[key]) for h in history if h.get("kind") == kind and key in h]
