"""One ``student_ckpt`` run as the CLI and the asset both do it: KD student (+ CE-only baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from distill_dag.config import PipelineConfig
from distill_dag.distill.teacher_model import finetuned_teacher
from distill_dag.distill.trainer import TrainResult, train


def teacher_overrides(cfg: PipelineConfig) -> tuple[PipelineConfig, Path | None]:
    """The config with the finetuned adapter filled in, and the finetuned full model dir if any."""
    model_dir, adapter_dir = finetuned_teacher(cfg)
    if adapter_dir is not None:
        cfg = cfg.model_copy(deep=True)
        cfg.teacher.adapter_path = str(adapter_dir)
    if model_dir is None and cfg.teacher.model_name_or_path is None and cfg.train.teacher_mode == "direct" \
            and not cfg.train.pretrain_ce_only:
        raise FileNotFoundError(
            f"teacher.model_name_or_path is null (a tiny demo teacher) and {cfg.teacher_ft_dir / 'final_model'} "
            "does not exist: finetune the teacher first (distill finetune-teacher, or the teacher_adapters asset)"
        )
    return cfg, model_dir


def run_student(cfg: PipelineConfig, *, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the configured student; with ``train.ce_only_baseline`` also a CE-only one on the same data.

    With ``student.init: from_teacher`` stage 1 (retention alignment) runs first.

    Returns ``{"student": TrainResult, "baseline": TrainResult | None, "alignment": AlignResult | None}``.
    """
    cfg, teacher_model = teacher_overrides(cfg)
    result: dict[str, Any] = {"baseline": None, "alignment": None}
    if cfg.student.init == "from_teacher" and not cfg.train.resume_from:
        # stage 1 (retention alignment) before KD; reused when already done for this teacher and config
        from distill_dag.distill.align import align_student

        result["alignment"] = align_student(cfg, data_dir=cfg.tokenized_dir, teacher_model_path=teacher_model,
                                            echo=echo)
    result["student"] = train(cfg, data_dir=cfg.tokenized_dir, tokenizer_dir=cfg.tokenizer_dir,
                              teacher_model_path=teacher_model, echo=echo)
    if cfg.train.ce_only_baseline and not cfg.train.pretrain_ce_only:
        base = cfg.model_copy(deep=True)
        base.train.pretrain_ce_only = True
        base.train.resume_from = None
        base.train.cache_logits = False
        base.train.output_dir = str(cfg.run_dir) + "_ce_only"
        result["baseline"] = train(base, data_dir=cfg.tokenized_dir, tokenizer_dir=cfg.tokenizer_dir, echo=echo)
    _card_facts(result)
    return result


def _card_facts(result: dict[str, Any]) -> None:
    """The losses of each run (and the KD student's CE-only comparison) into its final folder's model card."""
    from distill_dag.model.hub import update_model_card

    baseline = result["baseline"]
    for run in (result["student"], baseline):
        if run is None or not (run.final_dir / "model_card.json").exists():
            continue
        names = {"loss": "train loss, last logged step (nats/token)", "ce": "train cross-entropy, last logged step",
                 "kl": "train KD term (KL), last logged step", "val_loss": "held-out loss (nats/token)",
                 "val_ppl": "held-out perplexity"}
        losses = {names[k]: v for src in (run.final, run.val) for k, v in src.items() if k in names}
        if run is result["student"] and baseline is not None and "val_loss" in baseline.val:
            losses["held-out loss of the CE-only baseline, same steps and tokens"] = baseline.val["val_loss"]
        update_model_card(run.final_dir, training={"tokens": run.tokens, "steps": run.steps, "losses": losses,
                                                   "wandb_url": run.wandb_url})
