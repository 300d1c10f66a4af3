"""The student trainer: sparse top-k KD (+ CE), or CE-only pretraining, resumable exactly.

``train(cfg, data_dir=..., tokenizer_dir=...)`` is the whole loop, free of any launcher: the CLI, the
Dagster asset and torchrun all call it. One optimizer step = ``grad_accum`` micro-batches; the logged
loss is the token-weighted mean over them, with CE and KL shown apart.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from distill_dag.config import PipelineConfig
from distill_dag.data.dataset import make_loader
from distill_dag.data.manifest import Manifest, check_manifest
from distill_dag.device import pick_device
from distill_dag.distill import checkpoint as ckpt
from distill_dag.distill.distributed import (
    DistInfo,
    StudentLoss,
    all_reduce_sum,
    barrier,
    cleanup,
    clip_grad_norm,
    full_model_state,
    init_distributed,
    local_rows,
    no_sync,
    wrap,
)
from distill_dag.distill.optim import build_optimizers, build_schedulers
from distill_dag.distill.stability import NanGuard, SaddleDetector
from distill_dag.distill.stopping import StopSignals
from distill_dag.distill.teachers.base import TeacherTopK
from distill_dag.distill.telemetry import Telemetry
from distill_dag.io import sha256_json


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


class _StopRequested(Exception):
    pass


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
    from distill_dag.data.tokenizer import tokenizer_hash

    d = Path(tokenizer_dir)
    if not ((d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists()):
        raise FileNotFoundError(
            f"{d} holds no tokenizer (no tokenizer.json / tokenizer_config.json): pass the tokenizer the shards were "
            "built with (<data.root>/tokenizer, written by `distill preprocess`)"
        )
    return tokenizer_hash(d)


def train(
    cfg: PipelineConfig,
    *,
    data_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    teacher_model_path: str | Path | None = None,
    run_dir: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the student as ``cfg`` says. ``data_dir`` holds ``manifest.json`` + shards.

    ``teacher_model_path`` overrides ``teacher.model_name_or_path`` (e.g. the finetuned demo teacher).
    ``stop_after`` ends the run (with a checkpoint) after that many steps of this process: tests use it
    to simulate an interruption.
    """
    tc = cfg.train
    t_start = time.time()
    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(tc.device)
    dist_info = init_distributed(device.type, tc.parallel, tc.dist_timeout_s)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    manifest = Manifest.load(data_dir)
    check_manifest(manifest, max_seq_length=cfg.tokenize.max_seq_length)
    if tokenizer_dir is not None:  # it ships with the student: it must be the one the shards were built with
        check_manifest(manifest, tokenizer_hash=_tokenizer_hash(tokenizer_dir))

    # ---- resume state (read first: it decides the model's starting weights) -----------------
    resume_state: dict[str, Any] | None = None
    resume_dir: Path | None = None
    transition = False
    if tc.resume_from:
        resume_dir, resume_state, resume_info = ckpt.load_trainer_state(cfg.path(tc.resume_from))
        was_ce = bool(resume_info.get("pretrain_ce_only"))
        transition = was_ce and not tc.pretrain_ce_only

    torch.manual_seed(tc.seed)
    from distill_dag.model.variants import build_student

    if resume_dir is not None:
        from distill_dag.model.retnet import RetNetForCausalLM

        model = RetNetForCausalLM.from_pretrained(resume_dir)
        if cfg.student.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.student.init == "from_teacher":  # the stage-1 (aligned) student: distill_dag/distill/align.py
        from distill_dag.distill.align import load_aligned_student

        model = load_aligned_student(cfg)
    else:
        model = build_student(cfg.student, manifest.vocab_size)
    model.to(device).train()
    vocab = model.get_output_embeddings().weight.shape[0]
    check_manifest(manifest, vocab_size=vocab)

    teacher = None
    if not tc.pretrain_ce_only:
        from distill_dag.distill.teachers.factory import make_teacher

        warm_cache = tc.cache_logits and tc.teacher_mode == "direct"
        # warming the cache needs the cache's k, which may exceed the loss's: query max, slice for the loss
        tcfg = cfg.model_copy(update={"train": tc.model_copy(
            update={"teacher_topk": max(tc.teacher_topk, cfg.logit_cache.k if warm_cache else 0)})})
        teacher = make_teacher(tcfg, device, vocab, model_path=teacher_model_path)
        if hasattr(teacher, "require_shards"):  # a cached teacher must hold every train shard before step 1
            teacher.require_shards([i for i, _ in manifest.split_shards("train")])
    cache_writer = None
    if teacher is not None and tc.cache_logits and tc.teacher_mode == "direct":
        from distill_dag.distill.logit_cache import open_cache_writer

        cache_writer = open_cache_writer(cfg, teacher)

    student = wrap(model, dist_info, device)  # before the optimizers: FSDP replaces the parameters
    optimizer = build_optimizers(model, tc)
    guard = NanGuard(tc.max_nan_streak)
    saddle = SaddleDetector.from_config(tc)
    scheduler = build_schedulers(optimizer, tc, multiplier=saddle.lr_multiplier)
    step, tokens_seen = 0, 0
    if resume_state is not None and not transition:
        optimizer.load_state_dict(resume_state["optimizer"], model)
        scheduler.load_state_dict(resume_state["scheduler"])
        guard.load_state_dict(resume_state["nan_guard"])
        saddle.load_state_dict(resume_state["saddle"])
        ckpt.set_rng_state(resume_state["rng"])
        step = int(resume_state["step"])
        tokens_seen = int(resume_state["tokens"])

    lin = lineage(cfg, manifest, teacher)
    run_config = cfg.model_dump(mode="json")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    tel = Telemetry(
        run_dir, cfg.wandb, run_config, total_steps=tc.max_steps, echo=echo,
        resume_id=(resume_state or {}).get("wandb_id") if not transition else None,
        enabled=dist_info.is_main,
    )
    tel.advance(step)
    if transition:
        tel.event(step, "transition_ce_to_kd", from_checkpoint=str(resume_dir), teacher_mode=tc.teacher_mode)
    elif resume_state is not None:
        tel.event(step, "resumed", from_checkpoint=str(resume_dir))
    n_params = sum(p.numel() for p in model.parameters())
    # under FSDP each rank holds only its shard (DTensor.to_local) of every parameter
    n_local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    tel.info(
        f"student {cfg.student.variant}: {n_params / 1e6:.2f}M params, vocab {vocab}; "
        f"mode={'ce_only' if teacher is None else tc.teacher_mode}; device={device}; run_dir={run_dir}; "
        f"world_size={dist_info.world_size}"
        + (f"; fsdp: {n_local / 1e6:.4f}M parameters on this rank" if dist_info.sharded else "")
    )

    micro_per_step = tc.grad_accum
    # one global micro-batch of batch_size * world_size rows; each rank takes its slice
    loader = make_loader(data_dir, "train", tc.batch_size * dist_info.world_size, seed=tc.seed,
                         start_step=step * micro_per_step)
    has_val = bool(manifest.split_shards("val"))
    if not has_val:
        tel.info(f"warning: {data_dir} has no 'val' shards (tokenize.val_fraction); held-out evaluation is skipped")

    def evaluate() -> dict[str, float]:
        if not has_val:
            return {}
        # every rank scores its slice of each global batch (FSDP needs all ranks in every forward)
        loader = make_loader(data_dir, "val", tc.batch_size * dist_info.world_size, seed=0, shuffle=False,
                             infinite=False, drop_last=dist_info.enabled)
        return evaluate_loss(student, loader, tc.eval_batches, device, tc.loss_chunk_tokens, dist_info, tc.batch_size)
    batches = iter(loader)

    stop = StopSignals().install()  # restored by _shutdown, whatever ends the run

    def save() -> Path:
        path = run_dir / "checkpoints" / f"step-{step:07d}"
        # whole tensors keyed by name: loadable at any world size (under FSDP all ranks gather)
        model_state = full_model_state(model, dist_info)
        optim_state = optimizer.state_dict(model) if dist_info.is_main or dist_info.sharded else None
        if not dist_info.is_main:  # rank 0 writes; the others wait until it is on disk
            barrier(dist_info)
            return path
        state = {
            "step": step,
            "tokens": tokens_seen,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "nan_guard": guard.state_dict(),
            "saddle": saddle.state_dict(),
            "rng": ckpt.rng_state(),
            "wandb_id": tel.wandb_id or "",
        }
        info = {"step": step, "tokens": tokens_seen, "pretrain_ce_only": tc.pretrain_ce_only,
                "lineage": lin, "config": run_config}
        extra = {"tokenizer": Path(tokenizer_dir)} if tokenizer_dir else None
        if cache_writer is not None:
            cache_writer.flush()
        path = ckpt.save_checkpoint(run_dir, step, model, state, info, keep=tc.keep_checkpoints, extra_files=extra,
                                    model_state=model_state)
        tel.event(step, "checkpoint", path=str(path))
        barrier(dist_info)
        return path

    last_ckpt: Path | None = None
    last_metrics: dict[str, float] = {}
    val_metrics: dict[str, float] = {}
    window = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "n": 0, "tokens": 0, "t": time.time()}
    steps_this_process = 0
    try:
        while step < tc.max_steps:
            # ---- one optimizer step over grad_accum micro-batches ------------------------
            micro = []
            for _ in range(micro_per_step):
                try:
                    micro.append(local_rows(next(batches), dist_info, tc.batch_size))
                except StopIteration:
                    raise RuntimeError("the train loader ended; it should cycle epochs") from None
            n_scored = [int((m["labels"][:, 1:] != -100).sum()) for m in micro]
            # the global token count: each rank's loss is weighted so that DDP's gradient mean equals
            # the token-weighted mean of one process running the whole global batch
            total_scored = max(all_reduce_sum(float(sum(n_scored)), dist_info, device), 1.0)
            scale = float(dist_info.world_size)
            loss_sum = ce_sum = kl_sum = 0.0
            for i_micro, (batch, n) in enumerate(zip(micro, n_scored)):
                batch = {k: v.to(device) for k, v in batch.items()}
                topk = teacher.topk(batch) if teacher is not None else None
                if cache_writer is not None:
                    cache_writer.add(batch, topk)
                if topk is not None and topk.k > tc.teacher_topk:
                    topk = TeacherTopK(topk.indices[..., : tc.teacher_topk], topk.logprobs[..., : tc.teacher_topk])
                last = i_micro == len(micro) - 1
                # bf16 autocast on GPU for the model AND the chunked LM head (the loss math stays fp32)
                with no_sync(student, last), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = student(
                        batch, topk,
                        temperature=tc.temperature,
                        distill_alpha=tc.distill_alpha if topk is not None else 0.0,
                        tail=tc.tail, chunk_tokens=tc.loss_chunk_tokens, diversity_weight=tc.diversity_weight,
                    )
                # token-weighted mean over the accumulated micro-batches (and ranks)
                with no_sync(student, last):
                    (out.loss * (n * scale / total_scored)).backward()
                loss_sum += out.loss.item() * n
                ce_sum += out.ce.item() * n
                kl_sum += out.kl.item() * n
            loss_sum, ce_sum, kl_sum, step_tokens = (
                all_reduce_sum(x, dist_info, device)
                for x in (loss_sum, ce_sum, kl_sum, float(sum(int(m["attention_mask"].sum()) for m in micro)))
            )
            tokens_seen += int(step_tokens)
            loss = loss_sum / total_scored
            grad_norm = clip_grad_norm(student, tc.grad_clip)
            skipped = guard.check(step, loss, grad_norm)  # raises TrainingDivergedError after the streak
            if skipped is None:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for ev in [skipped] if skipped else saddle.update(step, loss, grad_norm):
                ev = dict(ev)
                tel.event(ev.pop("step", step), ev.pop("event"), **ev)
            scheduler.step()
            step += 1
            steps_this_process += 1
            tel.advance()

            window["loss"] += loss
            window["ce"] += ce_sum / total_scored
            window["kl"] += kl_sum / total_scored
            window["n"] += 1
            window["tokens"] += int(step_tokens)
            if tc.log_interval and (step % tc.log_interval == 0 or step == tc.max_steps):
                dt = max(time.time() - window["t"], 1e-9)
                last_metrics = {
                    "loss": window["loss"] / window["n"],
                    "ce": window["ce"] / window["n"],
                    "kl": window["kl"] / window["n"],
                    "grad_norm": grad_norm,
                    **{f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in zip(optimizer.names, optimizer)},
                    "tokens_per_s": window["tokens"] / dt,
                    "tokens": tokens_seen,
                }
                if device.type == "cuda":
                    last_metrics["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                tel.log(step, last_metrics)
                window = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "n": 0, "tokens": 0, "t": time.time()}
            if tc.eval_interval and step % tc.eval_interval == 0:
                val_metrics = evaluate()
                if val_metrics:
                    tel.log(step, val_metrics, kind="val")
            if tc.save_interval and step % tc.save_interval == 0:
                last_ckpt = save()
            # every rank stops at the same step, even if the signal reached only one of them
            signalled = all_reduce_sum(float(bool(stop)), dist_info, device) > 0
            if signalled or (stop_after is not None and steps_this_process >= stop_after):
                raise _StopRequested
    except _StopRequested:
        try:
            if last_ckpt is None or not last_ckpt.name.endswith(f"{step:07d}"):
                last_ckpt = save()
            tel.event(step, "stopped", reason="signal" if signalled else "stop_after")
            if cache_writer is not None:
                cache_writer.close()
        finally:
            _shutdown(tel, stop, teacher)
        raise KeyboardInterrupt(f"training stopped at step {step}; resume with --resume-from {run_dir}") from None
    except BaseException:
        _shutdown(tel, stop, teacher)
        raise

    val_metrics = evaluate()
    if val_metrics:
        tel.log(step, val_metrics, kind="val")
    if last_ckpt is None or not last_ckpt.name.endswith(f"{step:07d}"):
        last_ckpt = save()
    if cache_writer is not None:
        cache_writer.close()
    final_dir = run_dir / "final"
    if dist_info.is_main:
        final_dir = ckpt.write_final(run_dir, last_ckpt)
    barrier(dist_info)
    result = TrainResult(
        run_dir=run_dir, checkpoint=last_ckpt, final_dir=final_dir, steps=step, tokens=tokens_seen,
        final=last_metrics, val=val_metrics, history=list(tel.history), events=list(tel.events),
        lineage=lin, wandb_url=tel.wandb_url, wandb_id=tel.wandb_id, wandb_dir=tel.wandb_dir, seconds=time.time() - t_start,
    )
    _shutdown(tel, stop, teacher)
    cleanup(dist_info)
    return result


def _shutdown(tel: Telemetry, stop: StopSignals, teacher: Any) -> None:
    """Close what a run holds open, whatever ended it."""
    tel.close()
    stop.restore()
    if teacher is not None:
        teacher.close()
