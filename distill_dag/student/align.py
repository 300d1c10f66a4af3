"""Stage 1 of ``student.init: from_teacher``: retention alignment (the LoLCATs / MOHAWK "attention transfer").

The student is first built from the teacher (:func:`distill_dag.model.convert.convert_teacher`: same shape,
every teacher weight copied, Q/K/V/O included). Then, with the teacher frozen, each student layer's
retention is trained to reproduce the teacher layer's attention output on the teacher's own hidden states:

    x_l = the input of teacher layer l's attention (its input_layernorm output)   [B, T, d]
    y_l = teacher layer l's attention output (after o_proj, before the residual)   [B, T, d]
    r_l = student layer l's retention(x_l)  (the student's retention_norm equals the teacher's norm)
    MSE_l = sum_{b,t : attention_mask[b,t] = 1} ||r_l[b,t] - y_l[b,t]||^2 / (n_tokens * d)
    loss  = sum_l MSE_l

Every layer sees the teacher's inputs, so the layers do not depend on each other and all of them are
trained at once in one step ("per layer, in parallel"). Only retention parameters (q, k, v, gate, o, group
norm) are trainable. Relative MSE (``MSE_l / mean(y_l^2)``) is logged beside it: 1.0 is what predicting 0
would score. Stage 2 is the usual KD training (:func:`distill_dag.student.trainer.train`), which loads the
aligned student from ``<aligned_dir>/final`` when ``student.init == "from_teacher"``.

Runs on the shared training skeleton (:mod:`distill_dag.training.loop`). Resumable exactly: checkpoints
(``distill_dag.training.checkpoint``) hold the student, optimizer, scheduler, RNG and step; the data
loader restarts at the saved step. Logged with :class:`Telemetry` (``train.log``, ``metrics.jsonl``,
W&B job_type ``align``) under the aligned dir. ``align.eval_interval`` 0 still measures before and after
(they are the stage's result); a non-finite loss stops the stage at once. A finished stage is reused when its
lineage (teacher weights, data manifest, align config, student overrides) matches, and refused with a
message when it does not.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from distill_dag.config import PipelineConfig
from distill_dag.data.dataset import make_loader
from distill_dag.data.manifest import Manifest, check_manifest
from distill_dag.device import autocast, pick_device
from distill_dag.training import checkpoint as ckpt
from distill_dag.training.loop import Checkpointer, CheckpointContents, OptimizerStep, StepOutput, TrainLoop
from distill_dag.training.loop import TrainingInterrupted  # noqa: F401  (what a stopped align_student raises)
from distill_dag.training.optim import make_lr_lambda
from distill_dag.training.stability import NanGuard
from distill_dag.training.telemetry import Telemetry, wandb_group
from distill_dag.teacher.model import ResolvedTeacher, distillation_teacher, load_teacher
from distill_dag.teacher.providers.direct import state_dict_sha256
from distill_dag.io import atomic_dir, sha256_dir, sha256_json, write_json_atomic
from distill_dag.model.convert import convert_teacher, hybrid_layer_types, hybridize, unwrap_teacher
from distill_dag.model.retnet import RetNetConfig, RetNetForCausalLM
from distill_dag.safe_read import MAX_JSON_BYTES, read_text_bounded
from distill_dag.student.layer_choice import attention_layer_gains, choose_attention_layers

# align fields that change the resulting weights (the rest is bookkeeping)
_WEIGHT_FIELDS = ("steps", "value_factor", "learning_rate", "weight_decay", "warmup_steps", "min_lr_ratio",
                  "grad_clip", "batch_size", "seed")


@dataclass
class AlignResult:
    out_dir: Path
    final_dir: Path
    steps: int
    tokens: int
    mse_before: list[float]  # per layer, held-out (val split), before any alignment step
    mse_after: list[float]
    rel_mse_before: list[float]
    rel_mse_after: list[float]
    conversion: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False
    seconds: float = 0.0
    attention_layers: list[int] = field(default_factory=list)  # the layers kept as the teacher's attention
    layer_gains: list[dict[str, Any]] = field(default_factory=list)  # student.attention_layers auto: per layer

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "final_dir": str(self.final_dir), "steps": self.steps,
                "tokens": self.tokens, "mse_before": self.mse_before, "mse_after": self.mse_after,
                "rel_mse_before": self.rel_mse_before, "rel_mse_after": self.rel_mse_after,
                "conversion": self.conversion, "seconds": self.seconds, "attention_layers": self.attention_layers,
                "layer_gains": self.layer_gains}


def aligned_dir(cfg: PipelineConfig) -> Path:
    """Where stage 1 writes: ``align.output_dir``, default ``<train run dir>_aligned``."""
    return cfg.path(cfg.align.output_dir) if cfg.align.output_dir else Path(str(cfg.run_dir) + "_aligned")


def align_key(cfg: PipelineConfig) -> dict[str, Any]:
    """The config that decides the aligned weights (besides the teacher and data)."""
    a = cfg.align.model_dump(mode="json")
    return {
        "align": {k: a[k] for k in _WEIGHT_FIELDS},
        "student": {"chunk_size": cfg.student.chunk_size, "retention_backend": cfg.student.retention_backend,
                    "overrides": cfg.student.overrides, **hybrid_key(cfg)},
    }


def hybrid_key(cfg: PipelineConfig) -> dict[str, Any]:
    """The hybrid fields of the student section (only when set, so pure students keep their old lineage)."""
    st = cfg.student
    if not st.is_hybrid:
        return {}
    return {"attention_layers": st.attention_layers, "num_attention_layers": st.num_attention_layers,
            "attention_window": st.attention_window, "retention_window": st.retention_window}


def conversion_overrides(cfg: PipelineConfig) -> dict[str, Any]:
    """RetNetConfig fields the student section sets on a converted student (shape comes from the teacher)."""
    extra = {"retention_window": cfg.student.retention_window} if cfg.student.retention_window else {}
    return {"chunk_size": cfg.student.chunk_size, "retention_backend": cfg.student.retention_backend,
            **extra, **cfg.student.overrides}


def retention_parameters(student: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters stage 1 trains: those of every block's ``retention`` module (a hybrid's attention
    layers are the teacher's own and stay frozen)."""
    return [p for blk in student.model.layers if hasattr(blk, "retention") for p in blk.retention.parameters()]


def freeze_all_but_retention(student: torch.nn.Module) -> list[torch.nn.Parameter]:
    for p in student.parameters():
        p.requires_grad_(False)
    params = retention_parameters(student)
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def teacher_attention_io(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the teacher body once; per layer the attention input x_l and output y_l, each [B, T, d].

    ``teacher`` is an unwrapped causal LM (``.model.layers[i].self_attn``). It is called as the direct
    teacher calls it (``position_ids``, no attention mask), so its per-document causal mask is the one KD
    distils from.
    """
    body = teacher.model
    xs: list[torch.Tensor | None] = [None] * len(body.layers)
    ys: list[torch.Tensor | None] = [None] * len(body.layers)

    def hook(i: int) -> Callable[..., None]:
        def fn(_mod: Any, args: tuple, kwargs: dict, output: Any) -> None:
            xs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            ys[i] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(body.layers)]
    try:
        body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return xs, ys  # type: ignore[return-value]


def student_retention_outputs(student: torch.nn.Module, xs: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each student block's retention applied to the teacher's x_l ([B, T, d] each), with the student's own
    document resets and padding handling (as in ``RetNetModel.forward``)."""
    pos = batch["position_ids"]
    reset = pos == 0
    if not bool(reset[:, 1:].any()):
        reset = None
    am = batch.get("attention_mask")
    pad_mask = am if am is not None and not bool(am.all()) else None
    dtype = next(student.parameters()).dtype
    doc = (pos == 0).long().cumsum(-1)  # a hybrid's attention layers: the document id per token
    valid = pad_mask.bool() if pad_mask is not None else None
    return [blk.retention(x.to(dtype), pos, reset, pad_mask, None) if hasattr(blk, "retention")
            else blk.attention(x.to(dtype), pos, doc, valid, None) for blk, x in zip(student.model.layers, xs)]


def layer_mse(outs: list[torch.Tensor], targets: list[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer MSE over unpadded tokens and the target power: ([L], [L]).

    outs, targets: L tensors [B, T, d]; mask [B, T] (1 = token).
    ``MSE_l = sum_{mask} (o - y)^2 / (n * d)``, ``power_l = sum_{mask} y^2 / (n * d)``.
    """
    m = mask.to(torch.float32)[..., None]
    n = m.sum().clamp(min=1) * outs[0].shape[-1]
    mse = torch.stack([((o.float() - y.float()) ** 2 * m).sum() / n for o, y in zip(outs, targets)])
    power = torch.stack([(y.float() ** 2 * m).sum() / n for y in targets])
    return mse, power


@torch.no_grad()
def evaluate_alignment(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                       device: torch.device, precision: str = "auto") -> dict[str, list[float]]:
    """Token-weighted per-layer MSE and relative MSE over ``batches``: {"mse": [L], "rel_mse": [L]}."""
    was = student.training
    student.eval()
    mse_sum = pow_sum = None
    n_sum = 0.0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        xs, ys = teacher_attention_io(teacher, b)
        with autocast(device, precision):  # train.autocast, as in training
            outs = student_retention_outputs(student, xs, b)
        mse, power = layer_mse(outs, ys, b["attention_mask"])
        n = float(b["attention_mask"].sum())
        mse_sum = mse * n if mse_sum is None else mse_sum + mse * n
        pow_sum = power * n if pow_sum is None else pow_sum + power * n
        n_sum += n
    student.train(was)
    mse = (mse_sum / max(n_sum, 1)).tolist()
    rel = (mse_sum / pow_sum.clamp(min=1e-30)).tolist()
    return {"mse": mse, "rel_mse": rel}


def _teacher_identity(paths: ResolvedTeacher, teacher: torch.nn.Module) -> dict[str, Any]:
    name = str(paths.model)
    p = Path(name)
    weights = sha256_dir(p) if p.is_dir() else state_dict_sha256(teacher)
    adapter = paths.adapter
    return {"model": name, "weights_sha256": weights, "adapter": adapter,
            "adapter_sha256": sha256_dir(adapter) if adapter and Path(adapter).is_dir() else None}


def _load_teacher(cfg: PipelineConfig, device: torch.device, paths: ResolvedTeacher) -> torch.nn.Module:
    teacher = unwrap_teacher(load_teacher(cfg.teacher, device, model_path=paths.model, adapter_path=paths.adapter))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _check_lineage(found: dict[str, Any], want: dict[str, Any], where: Path) -> None:
    if found != want:
        diff = sorted(k for k in set(found) | set(want) if found.get(k) != want.get(k))
        raise RuntimeError(
            f"{where} holds an alignment made for a different {', '.join(diff)}; delete {where.parent if where.name == 'final' else where} "
            "to redo stage 1, or point align.output_dir elsewhere"
        )


def align_student(
    cfg: PipelineConfig,
    *,
    echo: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> AlignResult:
    """Stage 1: convert the teacher into a RetNet and align its retention layers; writes ``<aligned_dir>/final``.

    Data from ``data.tokenized_dir`` (train batches; val batches for the held-out MSE); the teacher of
    :func:`~distill_dag.teacher.model.distillation_teacher` (``teacher_adapters``' output when it ran).
    ``stop_after``: stop (with a checkpoint, raising :class:`TrainingInterrupted`) after that
    many steps of this call, as an interruption would. Returns the per-layer held-out MSE before and after.
    """
    teacher_paths = distillation_teacher(cfg)
    ac = cfg.align
    t0 = time.time()
    out = aligned_dir(cfg)
    data_dir = cfg.tokenized_dir
    device = pick_device(cfg.train.device)
    manifest = Manifest.load(data_dir)
    check_manifest(manifest, max_seq_length=cfg.tokenize.max_seq_length)
    teacher = _load_teacher(cfg, device, teacher_paths)
    check_manifest(manifest, vocab_size=teacher.get_input_embeddings().num_embeddings)
    lin = {"teacher": _teacher_identity(teacher_paths, teacher),
           "manifest_hash": sha256_json(manifest.to_dict()), **align_key(cfg)}

    final = out / "final"
    if (final / "align.json").exists():
        info = json.loads(read_text_bounded(final / "run.json", MAX_JSON_BYTES, "stage-1 run.json"))
        _check_lineage(info["lineage"], lin, final)
        done = json.loads(read_text_bounded(final / "align.json", MAX_JSON_BYTES, "stage-1 align.json"))
        log = echo or print
        log(f"align: {final} is up to date (same teacher, data and align config); stage 1 skipped")
        return AlignResult(out_dir=out, final_dir=final, steps=done["steps"], tokens=done["tokens"],
                           mse_before=done["mse_before"], mse_after=done["mse_after"],
                           rel_mse_before=done["rel_mse_before"], rel_mse_after=done["rel_mse_after"],
                           conversion=done["conversion"], reused=True, seconds=time.time() - t0,
                           attention_layers=done.get("attention_layers", []), layer_gains=done.get("layer_gains", []))

    resume_state = None
    if (out / ckpt.LATEST).exists():
        ckpt_dir, resume_state, info = ckpt.load_trainer_state(out)
        _check_lineage(info["lineage"], lin, ckpt_dir)
        student = RetNetForCausalLM.from_pretrained(ckpt_dir)
        conversion = info["conversion"]
    else:
        overrides = conversion_overrides(cfg)
        st = cfg.student
        if st.is_hybrid and st.attention_layers != "auto":  # listed layers: converted as the teacher's attention
            overrides.update(layer_types=hybrid_layer_types(int(teacher.config.num_hidden_layers),
                                                            list(st.attention_layers), st.attention_window),
                             attention_window=st.attention_window)
        student, conv = convert_teacher(teacher, value_factor=ac.value_factor, seed=ac.seed, **overrides)
        conversion = conv.to_dict()
    student.to(device).train()
    params = freeze_all_but_retention(student)
    opt = torch.optim.AdamW(params, lr=ac.learning_rate, weight_decay=ac.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(SimpleNamespace(
        warmup_steps=ac.warmup_steps, max_steps=max(ac.steps, 1), min_lr_ratio=ac.min_lr_ratio)))

    val_batches: list[dict[str, torch.Tensor]] = []
    if manifest.split_shards("val"):
        it = iter(make_loader(data_dir, "val", ac.batch_size, shuffle=False, infinite=False))
        val_batches = [b for _, b in zip(range(ac.eval_batches), it)]
    step, tokens = 0, 0
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        step, tokens = int(resume_state["step"]), int(resume_state["tokens"])
    run_config = cfg.model_dump(mode="json")
    tel = Telemetry(out, cfg.wandb, run_config, total_steps=ac.steps, echo=echo,
                    resume_id=(resume_state or {}).get("wandb_id") or None, name=out.name, group=wandb_group(cfg),
                    job_type="align", tags=["align", conversion["family"]], start_step=step, progress_desc="align")

    def evaluate(at: int | None = None) -> dict[str, list[float]]:
        """Held-out per-layer MSE; logged (kind val) when ``at`` is a step."""
        ev = (evaluate_alignment(student, teacher, val_batches, device, cfg.train.autocast) if val_batches
              else {"mse": [], "rel_mse": []})
        if at is not None and ev["mse"]:
            tel.log(at, {f"{k}_l{i}": v for k, vals in ev.items() for i, v in enumerate(vals)}, kind="val")
        return ev

    if resume_state is not None:
        before = json.loads(resume_state["before"])
        tel.event(step, "resumed", from_checkpoint=str(out))
    else:
        before = evaluate(0)
        if not val_batches:
            tel.info(f"warning: {data_dir} has no 'val' shards; held-out alignment MSE is not measured")
    n_new = len(conversion["new_params"])
    tel.info(f"align: {conversion['family']} teacher -> RetNet, {len(conversion['mapping'])} tensors copied, "
             f"{n_new} new; {sum(p.numel() for p in params) / 1e6:.2f}M retention params trainable; "
             f"{ac.steps} steps on {device}; out={out}")
    for note in conversion["notes"]:
        tel.info(f"align: note: {note}")

    def contents(at: int) -> CheckpointContents:
        state = {"step": at, "tokens": loop.tokens, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": ckpt.rng_state(), "before": json.dumps(before), "wandb_id": tel.wandb_id or ""}
        info = {"kind": "align", "step": at, "tokens": loop.tokens, "lineage": lin, "conversion": conversion,
                "config": run_config}
        return CheckpointContents(student, state, info)

    loader = make_loader(data_dir, "train", ac.batch_size, seed=ac.seed, start_step=step)
    if resume_state is not None:
        ckpt.set_rng_state(resume_state["rng"])
    batches = iter(loader)

    def train_step(_step: int) -> StepOutput:
        """loss = sum_l MSE_l of one batch (module docstring), backward."""
        b = {k: v.to(device) for k, v in next(batches).items()}
        xs, ys = teacher_attention_io(teacher, b)
        with autocast(device, cfg.train.autocast):
            outs = student_retention_outputs(student, xs, b)
        mse, _ = layer_mse(outs, ys, b["attention_mask"])
        loss = mse.sum()
        loss.backward()
        return StepOutput(loss=loss.item(), tokens=int(b["attention_mask"].sum()), rows=len(b["input_ids"]),
                          metrics={f"mse_l{i}": v for i, v in enumerate(mse.detach().tolist())})

    checkpointer = Checkpointer(out, contents, keep=ac.keep_checkpoints, tel=tel)
    guard = NanGuard(1, fix="Lower align.learning_rate")  # no skipping here: stage 1 is short, redo it instead
    loop = TrainLoop("alignment", tel, optimizer_step=OptimizerStep(opt, sched, params, ac.grad_clip, guard),
                     max_steps=ac.steps, log_interval=ac.log_interval, eval_interval=ac.eval_interval,
                     save_interval=ac.save_interval, checkpointer=checkpointer, step=step, tokens=tokens,
                     stop_after=stop_after, device=device, resume_hint=f"run again to resume from {out}")
    with loop:
        loop.run(train_step, evaluate=evaluate)
        after = loop.final_eval(evaluate)  # also with eval_interval 0: stage 1 reports before and after
        last = checkpointer.ensure(loop.step)
    for p in student.parameters():
        p.requires_grad_(True)
    gains: list[dict[str, Any]] = []
    if cfg.student.attention_layers == "auto":  # the KL-guided choice, on the aligned pure student
        last, gains = _choose_and_hybridize(cfg, student, teacher, val_batches or _first_batches(data_dir, ac),
                                            device, out, last, tel)
    final_dir = ckpt.write_final(out, last)
    result = AlignResult(out_dir=out, final_dir=final_dir, steps=loop.step, tokens=loop.tokens,
                         mse_before=before["mse"], mse_after=after["mse"], rel_mse_before=before["rel_mse"],
                         rel_mse_after=after["rel_mse"], conversion=conversion, history=list(tel.history),
                         seconds=time.time() - t0, layer_gains=gains,
                         attention_layers=RetNetConfig.from_pretrained(last).attention_layers)
    # last: its presence marks the stage as finished
    write_json_atomic(final_dir / "align.json", result.to_dict())
    return result


def _first_batches(data_dir: Path, ac: Any) -> list[dict[str, torch.Tensor]]:
    it = iter(make_loader(data_dir, "train", ac.batch_size, shuffle=False, infinite=False))
    return [b for _, b in zip(range(ac.eval_batches), it)]


def _choose_and_hybridize(cfg: PipelineConfig, student: torch.nn.Module, teacher: torch.nn.Module,
                          batches: list[dict[str, torch.Tensor]], device: torch.device, out: Path, last: Path,
                          tel: Any) -> tuple[Path, list[dict[str, Any]]]:
    """``student.attention_layers: auto``: measure each layer's KL gain (distill_dag/student/layer_choice.py),
    keep the best ``num_attention_layers`` as the teacher's attention, and save that hybrid as a checkpoint
    beside ``last`` (same tokenizer and info files). Returns its folder and the per-layer table."""
    st = cfg.student
    rows = attention_layer_gains(student, teacher, batches, device, st.attention_window)
    layers = choose_attention_layers(rows, st.num_attention_layers)
    for r in rows:
        r["kept"] = r["layer"] in layers
        tel.info(f"align: layer {r['layer']}: KL to the teacher {r['kl_pure']:.4f} -> {r['kl']:.4f} with its "
                 f"attention restored (gain {r['gain']:.4f}){'  <- kept' if r['kept'] else ''}")
    hybrid, _ = hybridize(student, teacher, layers, st.attention_window)
    dest = out / f"{last.name}-hybrid"
    with atomic_dir(dest) as tmp:
        for f in last.iterdir():
            if f.is_file() and not f.name.startswith("model") and f.name not in ("config.json", "trainer_state.pt"):
                shutil.copy2(f, tmp / f.name)
        hybrid.save_pretrained(tmp)
    tel.info(f"align: kept layers {layers} as softmax attention (student.num_attention_layers "
             f"{st.num_attention_layers}); hybrid in {dest}")
    return dest, rows


def load_aligned_student(cfg: PipelineConfig) -> torch.nn.Module:
    """The stage-1 student for KD (``student.init == "from_teacher"``), from ``<aligned_dir>/final``."""
    final = aligned_dir(cfg) / "final"
    if not (final / "align.json").exists():
        raise FileNotFoundError(
            f"student.init is from_teacher but {final} holds no finished alignment: run stage 1 first "
            "(`distill train` and the student_ckpt asset run it; or distill_dag.student.align.align_student(cfg))"
        )
    info = json.loads(read_text_bounded(final / "run.json", MAX_JSON_BYTES, "stage-1 run.json"))
    want = align_key(cfg)
    _check_lineage({k: info["lineage"][k] for k in want}, want, final)
    model = RetNetForCausalLM.from_pretrained(final)
    if cfg.student.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
