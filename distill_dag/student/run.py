"""The student stages as the CLI and the assets both run them: stage-1 alignment (``student_aligned``),
the KD student (``student_ckpt``) and the CE-only baseline (``student_ce_baseline``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from distill_dag.config import PipelineConfig
from distill_dag.teacher.model import finetuned_teacher
from distill_dag.student.trainer import TrainResult, train


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


def run_alignment(cfg: PipelineConfig, *, echo: Callable[[str], None] | None = None) -> Any:
    """Stage 1 of ``student.init: from_teacher`` (the ``student_aligned`` asset): the RetNet built from the
    teacher's weights, its retention aligned to the teacher's attention. Reused when already done for
    this teacher and config."""
    from distill_dag.student.align import align_student

    cfg, teacher_model = teacher_overrides(cfg)
    return align_student(cfg, data_dir=cfg.tokenized_dir, teacher_model_path=teacher_model, echo=echo)


def run_kd_student(cfg: PipelineConfig, *, echo: Callable[[str], None] | None = None) -> TrainResult:
    """The KD student (the ``student_ckpt`` asset): sparse top-k KL + CE from the configured teacher mode;
    with ``student.init: from_teacher`` it starts from stage 1's aligned student."""
    cfg, teacher_model = teacher_overrides(cfg)
    result = train(cfg, data_dir=cfg.tokenized_dir, tokenizer_dir=cfg.tokenizer_dir, teacher_model_path=teacher_model,
                   echo=echo)
    _card_facts(result, None)
    return result


def ce_baseline_config(cfg: PipelineConfig) -> PipelineConfig:
    """The CE-only baseline's config: the KD student's, without a teacher, in ``<run_dir>_ce_only``."""
    base = cfg.model_copy(deep=True)
    base.train.pretrain_ce_only = True
    base.train.resume_from = None
    base.train.output_dir = str(cfg.run_dir) + "_ce_only"
    if base.student.init == "from_teacher":  # the baseline is the same architecture trained from scratch
        base.student.init = "scratch"
    return base


def run_ce_baseline(cfg: PipelineConfig, *, echo: Callable[[str], None] | None = None) -> TrainResult:
    """The CE-only student (the ``student_ce_baseline`` asset): same steps, tokens and data, no teacher."""
    base = ce_baseline_config(cfg)
    result = train(base, data_dir=base.tokenized_dir, tokenizer_dir=base.tokenizer_dir, echo=echo)
    _card_facts(result, None)
    return result


def hybrid_config(cfg: PipelineConfig) -> PipelineConfig:
    """The hybrid student's config (``hybrid.*``): the KD student's training settings, a student converted from
    the teacher with ``hybrid``'s attention layers, in ``<run_dir>_hybrid`` (stage 1 in ``..._hybrid_aligned``).

    Equal tokens: stage 1 reads ``align.steps x align.batch_size`` rows, so the hybrid's KD gets that many
    fewer rows (``ceil(align rows / train.batch_size)`` fewer steps) than the KD student; both see the same
    number of training rows in all."""
    h = cfg.hybrid
    base = cfg.model_copy(deep=True)
    align_steps_as_kd = -(-cfg.align.steps * cfg.align.batch_size // (cfg.train.batch_size * cfg.train.grad_accum))
    base.train.max_steps = max(1, cfg.train.max_steps - align_steps_as_kd)
    if h.learning_rate is not None:
        base.train.learning_rate = h.learning_rate
    if h.muon_learning_rate is not None:
        base.train.muon_learning_rate = h.muon_learning_rate
    base.student = base.student.model_copy(update={
        "init": "from_teacher", "attention_layers": h.attention_layers,
        "num_attention_layers": h.num_attention_layers, "attention_window": h.attention_window,
        "retention_window": h.retention_window, "overrides": {}})
    base.train.resume_from = None
    base.train.pretrain_ce_only = False
    base.train.output_dir = str(cfg.run_dir) + "_hybrid"
    base.align.output_dir = str(cfg.run_dir) + "_hybrid_aligned"
    return base


def run_hybrid_student(cfg: PipelineConfig, *, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The hybrid student (the ``student_hybrid`` asset): stage 1 (conversion, alignment and, with
    ``attention_layers: auto``, the KL-guided choice), then KD like the KD student, at equal steps and tokens.
    Returns ``{"student": TrainResult, "alignment": AlignResult}``."""
    hcfg = hybrid_config(cfg)
    alignment = run_alignment(hcfg, echo=echo)
    student = run_kd_student(hcfg, echo=echo)
    card_hybrid_facts(student.final_dir, hcfg, alignment)
    return {"student": student, "alignment": alignment}


def card_hybrid_facts(final_dir: Path, hcfg: PipelineConfig, alignment: Any) -> None:
    """The hybrid's layers (and the KL table of an ``auto`` choice) into its model card."""
    from distill_dag.model.hub import update_model_card

    if (Path(final_dir) / "model_card.json").exists():
        update_model_card(final_dir, hybrid={"attention_layers": alignment.attention_layers,
                                             "layer_gains": alignment.layer_gains,
                                             "retention_window": hcfg.student.retention_window})


def run_student(cfg: PipelineConfig, *, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``distill train``: the student stages in order, as the assets run them one by one: stage 1 with
    ``student.init: from_teacher``, the KD student, with ``train.ce_only_baseline`` the CE-only one, and with
    ``hybrid.enabled`` the hybrid (its own stage 1, then KD).

    Returns ``{"student": TrainResult, "baseline": TrainResult | None, "alignment": AlignResult | None}`` and,
    with the hybrid, ``"hybrid": {"student", "alignment"}``.
    """
    result: dict[str, Any] = {"baseline": None, "alignment": None}
    if cfg.student.init == "from_teacher" and not cfg.train.resume_from:
        result["alignment"] = run_alignment(cfg, echo=echo)
    result["student"] = run_kd_student(cfg, echo=echo)
    if cfg.train.ce_only_baseline and not cfg.train.pretrain_ce_only:
        result["baseline"] = run_ce_baseline(cfg, echo=echo)
        _card_facts(result["student"], result["baseline"])
    if cfg.hybrid.enabled and not cfg.train.pretrain_ce_only:
        result["hybrid"] = run_hybrid_student(cfg, echo=echo)
    return result


def _card_facts(run: TrainResult, baseline: TrainResult | None) -> None:
    """The run's losses (and, when known, the CE-only baseline's) into its final folder's model card."""
    from distill_dag.model.hub import update_model_card

    if not (run.final_dir / "model_card.json").exists():
        return
    names = {"loss": "train loss, last logged step (nats/token)", "ce": "train cross-entropy, last logged step",
             "kl": "train KD term (KL), last logged step", "val_loss": "held-out loss (nats/token)",
             "val_ppl": "held-out perplexity"}
    losses = {names[k]: v for src in (run.final, run.val) for k, v in src.items() if k in names}
    if baseline is not None and "val_loss" in baseline.val:
        losses["held-out loss of the CE-only baseline, same steps and tokens"] = baseline.val["val_loss"]
    update_model_card(run.final_dir, training={"tokens": run.tokens, "steps": run.steps, "losses": losses,
                                               "wandb_url": run.wandb_url})
