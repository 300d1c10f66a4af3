"""The student stages as the CLI and the assets both run them: stage-1 alignment (``student_aligned``),
the KD student (``student_ckpt``) and the CE-only baseline (``student_ce_baseline``); and what a training run
reports (:func:`run_metadata`), in process and through Pipes alike. Each stage takes the config only: the
teacher it distils from is :func:`distill_dag.teacher.model.distillation_teacher`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from distill_dag.config import PipelineConfig
from distill_dag.model.model_card import update_model_card
from distill_dag.student.align import AlignResult, align_student
from distill_dag.student.trainer import TrainResult, train


def run_alignment(cfg: PipelineConfig, *, echo: Callable[[str], None] | None = None) -> AlignResult:
    """Stage 1 of ``student.init: from_teacher`` (the ``student_aligned`` asset): the RetNet built from the
    teacher's weights, its retention aligned to the teacher's attention. Reused when already done for
    this teacher and config."""
    return align_student(cfg, echo=echo)


def run_kd_student(cfg: PipelineConfig, *, echo: Callable[[str], None] | None = None) -> TrainResult:
    """The KD student (the ``student_ckpt`` asset): sparse top-k KL + CE from the configured teacher mode;
    with ``student.init: from_teacher`` it starts from stage 1's aligned student."""
    result = train(cfg, echo=echo)
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
    result = train(base, echo=echo)
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


def run_metadata(run: TrainResult) -> dict[str, tuple[str, Any]]:
    """``{name: (kind, raw value)}`` of one training run, kind one of path, url, json, int, float, text (Dagster
    Pipes' metadata types); the in-process asset and the torchrun Pipes worker both report exactly this."""
    final = Path(run.final_dir)
    meta: dict[str, tuple[str, Any]] = {
        "path": ("path", str(final)),
        "run_dir": ("path", str(run.run_dir)),
        "steps": ("int", run.steps),
        "tokens": ("int", run.tokens),
        "seconds": ("float", round(run.seconds, 1)),
        "tokens_per_s": ("float", round(run.tokens / max(run.seconds, 1e-9), 1)),
        "final_train": ("json", run.final),
        "val_loss": ("float", run.val.get("val_loss")),
        "val_ppl": ("float", run.val.get("val_ppl")),
        "lineage": ("json", run.lineage),
        "checkpoint_bytes": ("int", sum(f.stat().st_size for f in final.iterdir() if f.is_file())),
        "events": ("int", len(run.events)),
        "wandb_id": ("text", run.wandb_id),
    }
    if run.wandb_url:
        meta["wandb"] = ("url", run.wandb_url)
    elif run.wandb_dir:
        meta["wandb_offline_dir"] = ("path", run.wandb_dir)
    return {k: v for k, v in meta.items() if v[1] is not None}
