"""The student trainer: sparse top-k KD (+ CE), or CE-only pretraining, resumable exactly.

``train(cfg)`` is the whole run, free of any launcher: the CLI, the Dagster asset and torchrun all call
it. What is the student's own lives here (its model, teacher and
optimizer set-up, the loss of one step); the step loop, logging, checkpoints, stops, NaN handling and
eval scheduling are the shared skeleton of :mod:`distill_dag.training.loop` (which also refuses to publish
a run whose every step was skipped, that trained 0 tokens, or whose weights an update left NaN/Inf).
``train`` reads as its steps: set up (teacher, run folder, device, manifest), read the resume state, build
the student, open the teacher, build the optimizers, record the lineage, open the telemetry, run the loop,
finish (final evaluation, checkpoint, ``final/``). Before any compute, a resumed checkpoint must be of the
student this config builds and of the configured teacher, and in cached mode the cache must have been
written by the configured teacher. One optimizer step =
``grad_accum`` micro-batches; the logged loss is the token-weighted mean over them, with CE, KL (and
the diversity term when ``train.diversity_weight`` > 0) shown apart.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from distill_dag.config import ConfigError, PipelineConfig
from distill_dag.data.dataset import make_loader
from distill_dag.data.manifest import Manifest, check_manifest
from distill_dag.data.tokenizer import tokenizer_hash
from distill_dag.device import autocast, pick_device
from distill_dag.training import checkpoint as ckpt
from distill_dag.student.align import aligned_dir, load_aligned_student
from distill_dag.training.distributed import (
    DistInfo,
    StudentLoss,
    all_reduce_sum,
    barrier,
    cleanup,
    full_model_state,
    init_distributed,
    local_rows,
    no_sync,
    wrap,
)
from distill_dag.training.loop import Checkpointer, CheckpointContents, OptimizerStep, StepOutput, TrainLoop
from distill_dag.training.loop import TrainingInterrupted  # noqa: F401  (what a stopped train() raises)
from distill_dag.training.optim import build_optimizers, build_schedulers
from distill_dag.training.stability import NanGuard, SaddleDetector
from distill_dag.loss.topk import TeacherTopK
from distill_dag.teacher.model import ResolvedTeacher, distillation_teacher, identity_fingerprint
from distill_dag.teacher.providers.factory import make_teacher
from distill_dag.training.telemetry import Telemetry, wandb_group
from distill_dag.io import sha256_json
from distill_dag.model.retnet import RetNetForCausalLM
from distill_dag.model.variants import build_student, student_model_config

# RetNetConfig fields that decide the weights' shapes, and which token mixer each layer is: a checkpoint that
# differs in one of them is another model than the config describes
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "value_factor", "layer_types", "num_key_value_heads", "tie_word_embeddings", "attention_window",
               "retention_window")
_MAX_CONFIG_JSON = 16 << 20  # a model's config.json is a few KiB


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path  # last checkpoint directory
    final_dir: Path  # <run_dir>/final: the student for from_pretrained
    steps: int
    tokens: int
    final: dict[str, float]  # last logged train metrics
    val: dict[str, float]  # last held-out evaluation
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    wandb_url: str | None = None
    wandb_id: str | None = None
    wandb_dir: str | None = None
    seconds: float = 0.0


def lineage(cfg: PipelineConfig, manifest: Manifest, teacher: Any | None) -> dict[str, Any]:
    """Hashes of everything the student depends on (recorded in checkpoints and asset metadata)."""
    return {
        "manifest_hash": sha256_json(manifest.to_dict()),
        "tokenizer_hash": manifest.tokenizer_hash,
        "teacher": teacher.identity() if teacher is not None else None,
        "teacher_mode": None if cfg.train.pretrain_ce_only else cfg.train.teacher_mode,
        "config_hash": sha256_json(cfg.model_dump(mode="json")),
    }


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, loader: Any, max_batches: int, device: torch.device, chunk_tokens: int,
    dist_info: DistInfo | None = None, batch_size: int | None = None,
) -> dict[str, float]:
    """Held-out next-token CE (nats/token) with the same chunked loss as training (no full logits).

    ``model``: the student, or the trainer's wrapped :class:`StudentLoss`. With several ranks every rank
    calls this with the same loader of ``batch_size * world_size`` rows and scores its own slice.
    Returns {} when nothing was scored."""
    dist_info = dist_info or DistInfo()
    module = model if isinstance(getattr(model, "module", model), StudentLoss) else StudentLoss(model)
    was_training = module.training
    module.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in local_rows(batch, dist_info, batch_size or 0).items()}
        out = module(batch, None, temperature=1.0, distill_alpha=0.0, chunk_tokens=chunk_tokens)
        total += out.ce.item() * out.n_tokens
        n += out.n_tokens
    module.train(was_training)
    total, n = all_reduce_sum(total, dist_info, device), int(all_reduce_sum(float(n), dist_info, device))
    if n == 0:  # e.g. fewer val rows than one global batch under torchrun (whole batches only there)
        return {}
    ce = total / n
    return {"val_loss": ce, "val_ppl": math.exp(min(ce, 50.0)), "val_tokens": n}


def _tokenizer_hash(tokenizer_dir: str | Path) -> str:
    d = Path(tokenizer_dir)
    if not ((d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists()):
        raise FileNotFoundError(
            f"{d} holds no tokenizer (no tokenizer.json / tokenizer_config.json): pass the tokenizer the shards were "
            "built with (`distill train --tokenizer DIR`, the folder given to `distill preprocess --tokenizer`; or "
            "tokenizer.dir / tokenizer.name_or_path in the config)"
        )
    return tokenizer_hash(d)


def train(
    cfg: PipelineConfig,
    *,
    echo: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the student as ``cfg`` says: data from ``data.tokenized_dir``, the tokenizer of ``cfg.tokenizer_dir``
    (checked against the manifest, shipped with every checkpoint), outputs in ``cfg.run_dir``, the teacher
    of :func:`~distill_dag.teacher.model.distillation_teacher` (``teacher_adapters``' output when it ran).

    ``stop_after`` ends the run (with a checkpoint, raising :class:`TrainingInterrupted`) after that many
    steps of this process: tests use it to simulate an interruption.

    ``train.max_steps`` counts every step of the run, those before a resume included. Resuming a
    ``pretrain_ce_only`` checkpoint without it (CE -> KD) continues that run: its step count, LR
    schedule (no second warm-up), optimizer state and data position, with the teacher switched on.
    ``train.eval_interval`` 0 means no held-out evaluation at all, not even a final one.
    """
    t_start = time.time()
    run = _set_up(cfg)
    resume = _read_resume(cfg, run.manifest)  # first: it decides the model's starting weights
    model = _build_student(run, resume)
    vocab = _vocab_size(model)
    teacher, cache_note = _open_teacher(run, vocab)
    student = wrap(model, run.dist_info, run.device)  # before the optimizers: FSDP replaces the parameters
    opt = _build_optimization(model, cfg.train, resume)
    lin = _run_lineage(run, teacher, resume)
    tel = _open_telemetry(run, teacher, resume, opt.step, echo)
    _log_start(run, tel, model, teacher, lin, resume, opt.step, cache_note, vocab)
    steps = _StudentSteps(run, model, student, teacher, opt, lin, tel)
    checkpointer = Checkpointer(run.dir, steps.checkpoint_contents, keep=cfg.train.keep_checkpoints, tel=tel,
                                dist_info=run.dist_info)
    loop = steps.loop = _build_loop(run, tel, student, opt, checkpointer, stop_after)
    with loop:
        try:
            loop.run(steps.train_step, evaluate=steps.evaluate)
        finally:
            if teacher is not None:
                teacher.close()
        result = _finish(run, loop, steps, checkpointer, tel, lin, t_start)
    cleanup(run.dist_info)
    return result


# ---- the steps of train(), in order ------------------------------------------------------------------------
@dataclass
class _Setup:
    """Where a run happens: its config, folder, device and process group, data manifest and teacher."""
    cfg: PipelineConfig
    dir: Path
    device: torch.device
    dist_info: DistInfo
    manifest: Manifest
    teacher: ResolvedTeacher


def _set_up(cfg: PipelineConfig) -> _Setup:
    """Resolve the teacher (a direct-mode run with none at all is refused first), create the run folder, pick
    the device (under torchrun: the process group, one GPU per local rank), read the manifest once."""
    teacher = distillation_teacher(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    device = pick_device(tc.device)
    dist_info = init_distributed(device.type, tc.parallel, tc.dist_timeout_s)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    return _Setup(cfg, run_dir, device, dist_info, _load_manifest(cfg), teacher)


def _load_manifest(cfg: PipelineConfig) -> Manifest:
    """The packed data's manifest, checked against the config's row length and the tokenizer that ships with
    the student (it must be the one the shards were built with)."""
    manifest = Manifest.load(cfg.tokenized_dir)
    check_manifest(manifest, max_seq_length=cfg.tokenize.max_seq_length)
    check_manifest(manifest, tokenizer_hash=_tokenizer_hash(cfg.tokenizer_dir))
    return manifest


@dataclass
class _Resume:
    """What ``train.resume_from`` continues: nothing (``dir`` None), a run, or a CE-only run switched to KD
    (``transition``)."""
    dir: Path | None = None
    state: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    transition: bool = False


def _read_resume(cfg: PipelineConfig, manifest: Manifest) -> _Resume:
    """The checkpoint of ``train.resume_from``, refused (ConfigError) before any weight is loaded when it is of
    another student, or a CE-only run already at ``train.max_steps``."""
    tc = cfg.train
    if not tc.resume_from:
        return _Resume()
    resume_dir, state, info = ckpt.load_trainer_state(cfg.path(tc.resume_from))
    transition = bool(info.get("pretrain_ce_only")) and not tc.pretrain_ce_only
    if transition and int(state["step"]) >= tc.max_steps:
        raise ConfigError(
            f"train.max_steps is {tc.max_steps}, but {resume_dir} (CE-only pretraining) is already at step "
            f"{state['step']}: max_steps counts every step, CE ones included; set it above "
            f"{state['step']} to train with KD"
        )
    _check_resume_architecture(cfg, manifest, resume_dir)
    return _Resume(resume_dir, state, info, transition)


def _build_student(run: _Setup, resume: _Resume) -> torch.nn.Module:
    """The student on its device, seeded by ``train.seed``; its vocabulary must be the manifest's."""
    torch.manual_seed(run.cfg.train.seed)
    model = _build_model(run.cfg, run.manifest, resume.dir, run.device)
    check_manifest(run.manifest, vocab_size=_vocab_size(model))
    return model


def _vocab_size(model: torch.nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _open_teacher(run: _Setup, vocab: int) -> tuple[Any | None, str | None]:
    """The teacher provider (None for CE-only) and, in cached mode, the cache's note on its teacher. A cached
    teacher must hold every train shard before step 1 and have been written by the configured teacher."""
    cfg, paths = run.cfg, run.teacher
    if cfg.train.pretrain_ce_only:
        return None, None
    teacher = make_teacher(cfg, run.device, vocab, model_path=paths.model, adapter_path=paths.adapter)
    cache_note = None
    try:
        if hasattr(teacher, "require_shards"):
            teacher.require_shards([i for i, _ in run.manifest.split_shards("train")])
        if hasattr(teacher, "check_teacher"):
            cache_note = teacher.check_teacher(paths.model, paths.adapter, key=paths.key)
    except BaseException:
        teacher.close()
        raise
    return teacher, cache_note


@dataclass
class _Optimization:
    """Optimizers, LR schedulers, NaN guard and plateau detector, and the step/token counts they start at."""
    optimizer: Any
    scheduler: Any
    guard: NanGuard
    saddle: SaddleDetector
    step: int = 0
    tokens: int = 0


def _build_optimization(model: torch.nn.Module, tc: Any, resume: _Resume) -> _Optimization:
    """The optimizers of the (wrapped) model, with a resumed run's states and RNG loaded. After CE -> KD the
    loss is another one: the guard and the plateau detector start afresh."""
    optimizer = build_optimizers(model, tc)
    guard = NanGuard(tc.max_nan_streak)
    saddle = SaddleDetector.from_config(tc)
    scheduler = build_schedulers(optimizer, tc, multiplier=saddle.lr_multiplier)
    opt = _Optimization(optimizer, scheduler, guard, saddle)
    state = resume.state
    if state is not None:
        optimizer.load_state_dict(state["optimizer"], model)
        scheduler.load_state_dict(state["scheduler"])
        if not resume.transition:
            guard.load_state_dict(state["nan_guard"])
            saddle.load_state_dict(state["saddle"])
        ckpt.set_rng_state(state["rng"])
        opt.step, opt.tokens = int(state["step"]), int(state["tokens"])
    return opt


def _run_lineage(run: _Setup, teacher: Any | None, resume: _Resume) -> dict[str, Any]:
    """:func:`lineage` plus the teacher's fingerprint; a resumed KD run must have the checkpoint's teacher
    (after CE -> KD the checkpoint had none)."""
    lin = lineage(run.cfg, run.manifest, teacher)
    if teacher is not None:
        ident = lin["teacher"] or {}
        lin["teacher_fingerprint"] = (ident.get("teacher_fingerprint") if ident.get("provider") == "cached"
                                      else (identity_fingerprint(ident) or {}).get("hash"))
    if resume.state is not None and not resume.transition:
        _check_resume_teacher(resume.dir, resume.info.get("lineage") or {}, lin)
    return lin


def _open_telemetry(run: _Setup, teacher: Any | None, resume: _Resume, step: int,
                    echo: Callable[[str], None] | None) -> Telemetry:
    """``<run_dir>/config.yaml``, then the run's log, metrics.jsonl and W&B run (the resumed one's, unless
    CE -> KD)."""
    cfg, tc = run.cfg, run.cfg.train
    run_config = cfg.model_dump(mode="json")
    (run.dir / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    job = "ce_only" if teacher is None else "kd"
    return Telemetry(
        run.dir, cfg.wandb, run_config, total_steps=tc.max_steps, echo=echo,
        resume_id=(resume.state or {}).get("wandb_id") if not resume.transition else None,
        enabled=run.dist_info.is_main, name=run.dir.name, group=wandb_group(cfg), job_type=job,
        tags=[job, tc.teacher_mode if teacher is not None else "no_teacher", cfg.student.variant, cfg.student.init],
        start_step=step,
    )


def _log_start(run: _Setup, tel: Telemetry, model: torch.nn.Module, teacher: Any | None, lin: dict[str, Any],
               resume: _Resume, step: int, cache_note: str | None, vocab: int) -> None:
    """The run's opening events and lines: which teacher (and adapter), a resume or CE -> KD switch, the
    cache's note, the student's size."""
    cfg, tc, dist_info = run.cfg, run.cfg.train, run.dist_info
    if teacher is not None:  # which teacher (and adapter) this run distils from, in the log and metrics.jsonl
        paths = run.teacher
        tel.event(step, "teacher", mode=tc.teacher_mode, provider=(lin["teacher"] or {}).get("provider"),
                  model=str(paths.model), adapter=str(paths.adapter) if paths.adapter else "none")
    if resume.transition:
        tel.event(step, "transition_ce_to_kd", from_checkpoint=str(resume.dir), teacher_mode=tc.teacher_mode,
                  max_steps=tc.max_steps)
        tel.info(f"CE -> KD: continuing {resume.dir} at step {step} (its step count, LR schedule and optimizer "
                 f"state); train.max_steps {tc.max_steps} counts the CE steps too: {tc.max_steps - step} KD steps to go")
    elif resume.state is not None:
        tel.event(step, "resumed", from_checkpoint=str(resume.dir))
    if cache_note:
        tel.info(cache_note)
    n_params = sum(p.numel() for p in model.parameters())
    # under FSDP each rank holds only its shard (DTensor.to_local) of every parameter
    n_local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    tel.info(
        f"student {cfg.student.variant}: {n_params / 1e6:.2f}M params, vocab {vocab}; "
        f"mode={'ce_only' if teacher is None else tc.teacher_mode}; device={run.device}; run_dir={run.dir}; "
        f"world_size={dist_info.world_size}"
        + (f"; fsdp: {n_local / 1e6:.4f}M parameters on this rank" if dist_info.sharded else "")
    )


class _StudentSteps:
    """What the shared loop calls back: one optimizer step's forward and backward, the held-out evaluation and
    a checkpoint's contents. ``loop`` is set once the loop is built (a checkpoint records its token count)."""

    def __init__(self, run: _Setup, model: torch.nn.Module, student: torch.nn.Module, teacher: Any | None,
                 opt: _Optimization, lin: dict[str, Any], tel: Telemetry) -> None:
        tc = self.tc = run.cfg.train
        self.data_dir, self.tokenizer_dir = run.cfg.tokenized_dir, run.cfg.tokenizer_dir
        self.model, self.student, self.teacher, self.opt, self.lin, self.tel = model, student, teacher, opt, lin, tel
        self.device, self.dist_info = run.device, run.dist_info
        self.run_config = run.cfg.model_dump(mode="json")
        self.loop: TrainLoop | None = None
        # one global micro-batch of batch_size * world_size rows; each rank takes its slice
        self.batches = iter(make_loader(self.data_dir, "train", tc.batch_size * run.dist_info.world_size,
                                        seed=tc.seed, start_step=opt.step * tc.grad_accum))
        self.has_val = bool(run.manifest.split_shards("val"))
        if not self.has_val and tc.eval_interval:
            tel.info(f"warning: {self.data_dir} has no 'val' shards (tokenize.val_fraction); held-out evaluation "
                     "is skipped")

    def evaluate(self, at: int) -> dict[str, float]:
        if not self.has_val:
            return {}
        tc, dist_info = self.tc, self.dist_info
        # every rank scores its slice of each global batch (FSDP needs all ranks in every forward)
        val = make_loader(self.data_dir, "val", tc.batch_size * dist_info.world_size, seed=0, shuffle=False,
                          infinite=False, drop_last=dist_info.enabled)
        metrics = evaluate_loss(self.student, val, tc.eval_batches, self.device, tc.loss_chunk_tokens, dist_info,
                                tc.batch_size)
        if metrics:
            self.tel.log(at, metrics, kind="val")
        return metrics

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's rows of the next ``grad_accum`` global micro-batches."""
        micro = []
        for _ in range(self.tc.grad_accum):
            try:
                micro.append(local_rows(next(self.batches), self.dist_info, self.tc.batch_size))
            except StopIteration:
                raise RuntimeError("the train loader ended; it should cycle epochs") from None
        return micro

    def _teacher_topk(self, batch: dict[str, torch.Tensor]) -> TeacherTopK | None:
        """The teacher's top-k of a batch, cut to ``train.teacher_topk``; None without a teacher."""
        k = self.tc.teacher_topk
        topk = self.teacher.topk(batch) if self.teacher is not None else None
        if topk is not None and topk.k > k:
            topk = TeacherTopK(topk.indices[..., :k], topk.logprobs[..., :k])
        return topk

    def train_step(self, _step: int) -> StepOutput:
        """Forward + backward of grad_accum micro-batches; the token-weighted mean loss over them (and ranks)."""
        tc, dist_info, device, student = self.tc, self.dist_info, self.device, self.student
        micro = self._micro_batches()
        n_scored = [int((m["labels"][:, 1:] != -100).sum()) for m in micro]
        # the global token count: each rank's loss is weighted so that DDP's gradient mean equals
        # the token-weighted mean of one process running the whole global batch
        total_scored = max(all_reduce_sum(float(sum(n_scored)), dist_info, device), 1.0)
        scale = float(dist_info.world_size)
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, **({"diversity": 0.0} if tc.diversity_weight else {})}
        for i_micro, (batch, n) in enumerate(zip(micro, n_scored)):
            batch = {k: v.to(device) for k, v in batch.items()}
            topk = self._teacher_topk(batch)
            last = i_micro == len(micro) - 1
            # train.autocast: bf16 for the model AND the chunked LM head (the loss math stays fp32)
            with no_sync(student, last), autocast(device, tc.autocast):
                out = student(
                    batch, topk,
                    temperature=tc.temperature,
                    distill_alpha=tc.distill_alpha if topk is not None else 0.0,
                    tail=tc.tail, chunk_tokens=tc.loss_chunk_tokens, diversity_weight=tc.diversity_weight,
                )
            with no_sync(student, last):
                (out.loss * (n * scale / total_scored)).backward()
            for k in sums:
                sums[k] += getattr(out, k).item() * n
        n_tokens = float(sum(int(m["attention_mask"].sum()) for m in micro))
        *totals, n_tokens = (all_reduce_sum(x, dist_info, device) for x in (*sums.values(), n_tokens))
        means = {k: v / total_scored for k, v in zip(sums, totals)}
        return StepOutput(loss=means.pop("loss"), tokens=int(n_tokens), metrics=means,
                          rows=sum(len(m["input_ids"]) for m in micro) * dist_info.world_size)

    def checkpoint_contents(self, at: int) -> CheckpointContents:
        """Whole tensors keyed by name: loadable at any world size (under FSDP all ranks gather)."""
        model, opt, dist_info, tokens = self.model, self.opt, self.dist_info, self.loop.tokens
        model_state = full_model_state(model, dist_info)
        optim_state = opt.optimizer.state_dict(model) if dist_info.is_main or dist_info.sharded else None
        state = {
            "step": at,
            "tokens": tokens,
            "optimizer": optim_state,
            "scheduler": opt.scheduler.state_dict(),
            "nan_guard": opt.guard.state_dict(),
            "saddle": opt.saddle.state_dict(),
            "rng": ckpt.rng_state(),
            "wandb_id": self.tel.wandb_id or "",
        }
        info = {"step": at, "tokens": tokens, "pretrain_ce_only": self.tc.pretrain_ce_only,
                "lineage": self.lin, "config": self.run_config}
        return CheckpointContents(model, state, info, extra_files={"tokenizer": self.tokenizer_dir},
                                  model_state=model_state)


def _build_loop(run: _Setup, tel: Telemetry, student: torch.nn.Module, opt: _Optimization,
                checkpointer: Checkpointer, stop_after: int | None) -> TrainLoop:
    """The shared step loop (logging, checkpoints, stops, NaN handling, eval schedule), at the run's step."""
    tc = run.cfg.train
    return TrainLoop(
        "training", tel,
        optimizer_step=OptimizerStep(opt.optimizer, opt.scheduler, student, tc.grad_clip, opt.guard, opt.saddle),
        max_steps=tc.max_steps, log_interval=tc.log_interval, eval_interval=tc.eval_interval,
        save_interval=tc.save_interval, checkpointer=checkpointer, step=opt.step, tokens=opt.tokens,
        stop_after=stop_after, dist_info=run.dist_info, device=run.device,
        resume_hint=f"resume with --resume-from {run.dir}",
    )


def _finish(run: _Setup, loop: TrainLoop, steps: _StudentSteps, checkpointer: Checkpointer, tel: Telemetry,
            lin: dict[str, Any], t_start: float) -> TrainResult:
    """The final evaluation, the last checkpoint, ``<run_dir>/final`` (rank 0 writes it) and the run's result."""
    val_metrics = loop.final_eval(steps.evaluate) if run.cfg.train.eval_interval else {}
    last_ckpt = checkpointer.ensure(loop.step)
    final_dir = run.dir / "final"
    if run.dist_info.is_main:
        final_dir = ckpt.write_final(run.dir, last_ckpt)
    barrier(run.dist_info)
    train_rows = [h for h in tel.history if h["kind"] == "train"]
    last_logged = {k: v for k, v in train_rows[-1].items() if k not in ("step", "kind", "time_s")} if train_rows else {}
    result = TrainResult(
        run_dir=run.dir, checkpoint=last_ckpt, final_dir=final_dir, steps=loop.step, tokens=loop.tokens,
        final=last_logged, val=val_metrics, history=list(tel.history),
        events=list(tel.events), lineage=lin, wandb_url=tel.wandb_url, wandb_id=tel.wandb_id,
        wandb_dir=tel.wandb_dir, seconds=time.time() - t_start,
    )
    tel.summary({"steps": loop.step, "tokens": loop.tokens, **val_metrics})
    return result


def _read_config_json(path: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json``, read with a bound and only from a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"{path} is missing: not a student checkpoint (train.resume_from)") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ckpt.CheckpointError(f"{path} is not a regular file (train.resume_from)")
        raw = os.read(fd, _MAX_CONFIG_JSON + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_CONFIG_JSON:
        raise ckpt.CheckpointError(f"{path} is larger than {_MAX_CONFIG_JSON} bytes: not a model config (train.resume_from)")
    try:
        out = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ckpt.CheckpointError(f"{path} is not valid JSON ({err}) (train.resume_from)") from None
    if not isinstance(out, dict):
        raise ckpt.CheckpointError(f"{path} holds {type(out).__name__}, not a model config (train.resume_from)")
    return out


def _arch(c: dict[str, Any]) -> dict[str, Any]:
    out = {k: c.get(k) for k in ARCH_FIELDS}
    if out["layer_types"] is None and isinstance(out["num_hidden_layers"], int):  # None means all retention
        out["layer_types"] = ["linear_attention"] * out["num_hidden_layers"]
    return out


def _check_resume_architecture(cfg: PipelineConfig, manifest: Manifest, resume_dir: Path) -> None:
    """Refuse (ConfigError naming both values) a checkpoint whose student differs from the one this config
    builds in a field of :data:`ARCH_FIELDS`: loading it would train and publish the checkpoint's shape
    under this config's name."""
    found = _arch(_read_config_json(resume_dir / "config.json"))
    s = cfg.student
    if s.init == "from_teacher":  # the shape comes from the teacher, through stage 1's student
        aligned = aligned_dir(cfg) / "final" / "config.json"
        if not aligned.is_file():
            return  # nothing to compare with: stage 1 has not run here (its own lineage check guards it)
        want, source = _arch(_read_config_json(aligned)), f"the stage-1 student {aligned.parent} (student.init from_teacher)"
    else:
        built = student_model_config(s, manifest.vocab_size)  # as build_student builds it
        want = _arch(built.to_dict())
        source = f"student.variant {s.variant!r}" + (f" with student.overrides {s.overrides}" if s.overrides else "")
    diff = [k for k in ARCH_FIELDS if found[k] != want[k]]
    if diff:
        show = lambda v: f"{v[:3]}...({len(v)} layers)" if isinstance(v, list) and len(v) > 4 else repr(v)  # noqa: E731
        pairs = "; ".join(f"{k} {show(found[k])} in the checkpoint vs {show(want[k])} here" for k in diff)
        raise ConfigError(
            f"train.resume_from: {resume_dir / 'config.json'} is another student than this config builds from "
            f"{source}: {pairs}. Resume only a checkpoint of this architecture: point train.resume_from at one, "
            "set student.variant / student.overrides to the checkpoint's values, or drop train.resume_from to start afresh"
        )


def _teacher_weights(identity: dict[str, Any] | None) -> tuple[Any, Any] | None:
    """(weights sha256, adapter sha256) of the teacher an identity names, whatever the provider (a cache or
    a server names the one that wrote or serves it); None when it names none."""
    if not identity:
        return None
    inner = identity.get("teacher") if isinstance(identity.get("teacher"), dict) else identity
    w = inner.get("weights_sha256") or identity.get("weights_sha256")
    return (w, inner.get("adapter_sha256")) if w else None


def _check_resume_teacher(resume_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse resuming a KD checkpoint with another teacher than the one it was distilled from (ConfigError
    naming both): by the fingerprints when both runs recorded one, else by the teachers' weights sha256."""
    before, now = old.get("teacher"), new.get("teacher")
    if not before or not now:
        return
    name = lambda t: t.get("model") or (t.get("teacher") or {}).get("model") or t.get("url") or "?"  # noqa: E731
    fp_old, fp_new = old.get("teacher_fingerprint"), new.get("teacher_fingerprint")
    if fp_old and fp_new:
        differs, shown = fp_old != fp_new, (f"fingerprint {fp_old[:16]}", f"fingerprint {fp_new[:16]}")
    else:
        w_old, w_new = _teacher_weights(before), _teacher_weights(now)
        if not (w_old and w_new):
            return
        differs = w_old != w_new
        shown = (f"weights sha256 {str(w_old[0])[:16]}", f"weights sha256 {str(w_new[0])[:16]}")
    if differs:
        raise ConfigError(
            f"train.resume_from: {resume_dir} was distilled from teacher {name(before)} ({shown[0]}), but the "
            f"configured teacher is {name(now)} ({shown[1]}): resuming would mix two teachers' targets in one run. "
            "Set teacher.model_name_or_path / teacher.adapter_path (or, in cached mode, logit_cache.dir) back to "
            "the checkpoint's teacher, or drop train.resume_from to distill from this teacher afresh"
        )


def _build_model(cfg: PipelineConfig, manifest: Manifest, resume_dir: Path | None, device: torch.device) -> torch.nn.Module:
    """The student to train: a checkpoint's, the stage-1 (aligned) one, or a fresh one."""
    if resume_dir is not None:
        model = RetNetForCausalLM.from_pretrained(resume_dir)
        if cfg.student.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.student.init == "from_teacher":  # the stage-1 (aligned) student: distill_dag/student/align.py
        model = load_aligned_student(cfg)
    else:
        model = build_student(cfg.student, manifest.vocab_size)
    return model.to(device).train()
