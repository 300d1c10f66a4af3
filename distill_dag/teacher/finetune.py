"""Teacher finetuning (the ``teacher_adapters`` asset, ``distill finetune-teacher``).

Two modes (``teacher_ft.mode``):

- ``lora``: peft LoRA adapters (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``) on
  a hub/local causal LM (``teacher.model_name_or_path``); only adapter weights train.
- ``full``: every weight trains; for tiny teachers, e.g. the demo's random-init tiny Llama
  (``teacher.model_name_or_path: null`` + ``teacher.init_tiny``, vocab = the manifest's). A random-init
  teacher can first train ``copy_warmup_steps`` steps on synthetic copy rows
  (:mod:`distill_dag.data.copy_rows`: without them the demo teacher never learns to retrieve), and
  ``copy_rows_per_batch`` copy rows can ride along with every corpus micro-batch after that, and
  ``pass_key_rows_per_batch`` rows of each corpus micro-batch can carry a pass key at a random depth
  with its question and answer at the end (:func:`distill_dag.data.copy_rows.pass_key_rows`).

Label convention (the project's one): ``labels[b, t]`` is ``input_ids[b, t]`` or -100, NOT shifted;
they go to the Hugging Face model unchanged, which shifts them exactly once. The loss of one
optimizer step over its ``grad_accum`` micro-batches is the token mean::

    L = - sum_{micro-batches} sum_{b, t : labels[b, t+1] != -100} log p(labels[b, t+1] | tokens <= t) / N

with ``N`` the number of scored tokens of the whole step (``num_items_in_batch``), so every token
weighs the same whatever micro-batch it is in. Packed documents are kept apart as in evaluation
(:func:`distill_dag.loss.perplexity.lm_inputs`: ``position_ids``, no attention mask).

The tokenizer's vocabulary is never extended: no pad token is added (batches are full rows;
padding is masked by labels = -100), so the teacher's vocab size is the student's.

Written under ``output_dir``:

- ``checkpoints/step-NNNNNNN/`` + ``checkpoint_latest`` (the project's checkpoint format,
  :mod:`distill_dag.training.checkpoint`): weights (adapter or model), optimizer, scheduler, RNG
  states, step and the early-stopping state; saved every ``save_interval`` steps and on
  SIGINT/SIGTERM before the process stops (:class:`TrainingInterrupted`);
- ``best/``: the weights of the best validation perplexity (early stopping restores them);
- ``final_adapter/`` (lora) or ``final_model/`` (full; ``save_pretrained`` + the tokenizer), and
  ``merged_model/`` with ``merge: true`` (lora ``merge_and_unload``);
- ``metrics.json``: validation perplexity before/after, relative improvement, the check of the
  expected improvement, steps, tokens, paths;
- ``train.log``, ``metrics.jsonl`` and the W&B run (job_type ``teacher_ft``) of
  :class:`~distill_dag.training.telemetry.Telemetry`.

The step loop, logging, checkpoints and stops are the shared skeleton of :mod:`distill_dag.training.loop`;
a non-finite loss stops the run at once (lower ``teacher_ft.learning_rate``).
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch

from distill_dag.config import ConfigError, PipelineConfig, TeacherFinetuneConfig
from distill_dag.data.copy_rows import copy_batch, pass_key_row_min_len, pass_key_rows
from distill_dag.data.dataset import make_loader
from distill_dag.data.manifest import MANIFEST, Manifest, check_manifest
from distill_dag.data.tokenizer import load_tokenizer, tokenizer_hash
from distill_dag.device import autocast, pick_device
from distill_dag.training import checkpoint as ckpt
from distill_dag.training.loop import Checkpointer, CheckpointContents, OptimizerStep, StepOutput, TrainLoop
from distill_dag.training.loop import TrainingInterrupted  # noqa: F401  (what a stopped finetune_teacher raises)
from distill_dag.training.optim import make_lr_lambda
from distill_dag.training.stability import NanGuard
from distill_dag.teacher.model import build_tiny_teacher, load_teacher
from distill_dag.training.telemetry import Telemetry, wandb_group
from distill_dag.loss.perplexity import lm_inputs, perplexity
from distill_dag.io import atomic_dir, sha256_dir, sha256_file, write_json_atomic

# copy warm-up rows (distill_dag/data/copy_rows.py): 64-token rows, periods 6-30, for the first 2/3 of the warm-up,
# then full rows. Measured on the demo's tiny Llama (lr 3e-3, 4k tokens/step, standalone runs): copy accuracy 0.94
# after 300 steps of 64 x 64-token rows; 32 x 128 needs ~450 steps; 16 x 128 (700 steps) and 32 x 128 drawn from
# 256 token ids (450 steps) stay at chance
COPY_ROW_LEN, COPY_SHORT_SHARE = 64, 2 / 3
MIXED_ROWS_INDEX = 1 << 40  # the copy rows mixed into corpus steps: an index range apart from the warm-up's
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")


def check_finetune_config(cfg: PipelineConfig) -> None:
    """Every teacher_ft key is used by the chosen mode or rejected here, with the key's name."""
    ft, defaults = cfg.teacher_ft, TeacherFinetuneConfig()
    errs: list[str] = []
    if ft.mode == "full":
        for k in LORA_KEYS:
            if getattr(ft, k) != getattr(defaults, k):
                errs.append(f"teacher_ft.{k} = {getattr(ft, k)!r} has no effect with teacher_ft.mode 'full' "
                            f"(remove it, or set mode: lora)")
        if ft.merge:
            errs.append("teacher_ft.merge applies to LoRA adapters; mode 'full' already writes a whole model "
                        "(final_model/): set merge: false")
        if ft.copy_warmup_steps >= ft.max_steps:
            errs.append(f"teacher_ft.copy_warmup_steps ({ft.copy_warmup_steps}) must be below teacher_ft.max_steps "
                        f"({ft.max_steps}): the corpus steps come after the copy warm-up")
        if ft.pass_key_rows_per_batch > ft.batch_size:
            errs.append(f"teacher_ft.pass_key_rows_per_batch ({ft.pass_key_rows_per_batch}) must be at most "
                        f"teacher_ft.batch_size ({ft.batch_size}): they are rows of the corpus micro-batch")
        if cfg.teacher.dtype in ("bfloat16", "float16"):
            errs.append(f"teacher.dtype {cfg.teacher.dtype!r}: full finetuning keeps float32 weights "
                        "(set teacher.dtype: auto or float32)")
    else:
        if ft.copy_warmup_steps or ft.copy_rows_per_batch or ft.pass_key_rows_per_batch:
            errs.append("teacher_ft.copy_warmup_steps / copy_rows_per_batch / pass_key_rows_per_batch are for a "
                        "random-init teacher (mode 'full'); a pretrained teacher's LoRA finetune already has its "
                        "copying circuits: set them to 0")
        if ft.lora_r < 1:
            errs.append(f"teacher_ft.lora_r must be >= 1 (got {ft.lora_r})")
        if not 0.0 <= ft.lora_dropout < 1.0:
            errs.append(f"teacher_ft.lora_dropout must be in [0, 1) (got {ft.lora_dropout})")
        if not ft.target_modules:
            errs.append("teacher_ft.target_modules is empty: name the linear layers to adapt, e.g. [q_proj, v_proj]")
    if cfg.teacher.adapter_path:
        errs.append("teacher.adapter_path is set: finetuning starts from the base teacher and writes a new adapter; "
                    "set it to null (continue an interrupted run with --resume-from)")
    for k, lo in (("batch_size", 1), ("grad_accum", 1), ("max_steps", 1), ("warmup_steps", 0), ("eval_interval", 0),
                  ("eval_batches", 0), ("early_stopping_patience", 0), ("save_interval", 0)):
        if getattr(ft, k) < lo:
            errs.append(f"teacher_ft.{k} must be >= {lo} (got {getattr(ft, k)})")
    if ft.learning_rate <= 0:
        errs.append(f"teacher_ft.learning_rate must be > 0 (got {ft.learning_rate})")
    if errs:
        raise ConfigError("invalid teacher finetuning config:\n  " + "\n  ".join(errs))


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(
            f"teacher_ft.target_modules: {missing} match no linear layer of the teacher "
            f"(its linear layers: {sorted(names)})"
        )


def check_teacher_base(cfg: PipelineConfig) -> None:
    """Refuse a random-init teacher (``teacher.model_name_or_path: null`` + ``init_tiny``) finetuned in ``lora``
    mode: it would write only ``final_adapter/`` on a base that is never saved, so the cache and the students
    could not load the teacher (they failed later with "finetune the teacher first")."""
    if cfg.teacher.model_name_or_path is None and cfg.teacher_ft.mode == "lora":
        raise ConfigError(
            "teacher.model_name_or_path is null (a random-init teacher from teacher.init_tiny) and teacher_ft.mode is "
            "lora: the adapter would sit on a base that is never saved, so logit_cache and the students could not "
            "load the teacher. Set teacher_ft.mode: full (as configs/demo.yaml does), or name a base model in "
            "teacher.model_name_or_path.")


def build_model(cfg: PipelineConfig, vocab_size: int, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trainable teacher (peft-wrapped for lora) on ``device``, and what identifies its base."""
    check_teacher_base(cfg)
    ft = cfg.teacher_ft
    torch.manual_seed(ft.seed)  # tiny init and LoRA A matrices: the same on every (re)start
    if cfg.teacher.model_name_or_path is None:
        if not cfg.teacher.init_tiny:
            raise ConfigError("teacher.model_name_or_path is null and teacher.init_tiny is not set: name a teacher "
                              "(hub id or local dir) or give init_tiny (LlamaConfig fields) for a tiny demo teacher")
        model = build_tiny_teacher(vocab_size, cfg.teacher.init_tiny, seed=ft.seed).to(device)
        base = {"init_tiny": cfg.teacher.init_tiny, "vocab_size": vocab_size, "seed": ft.seed}
    else:
        model = load_teacher(cfg.teacher, device, trainable=True)
        base = {"model_name_or_path": cfg.teacher.model_name_or_path}
    if ft.mode == "full":
        model = model.float()  # fp32 master weights; no optimizer state in half precision
        model.train()
        return model, base
    from peft import LoraConfig, get_peft_model

    _check_targets(model, ft.target_modules)
    lora = LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                      target_modules=list(ft.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model, base


def _save_weights(model: torch.nn.Module, out: Path, tokenizer: Any | None = None) -> None:
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def load_weights(model: torch.nn.Module, src: Path) -> None:
    """Load what :func:`_save_weights` wrote (an adapter for a peft model, else the whole model)."""
    from safetensors.torch import load_file

    if (src / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(model, load_file(src / "adapter_model.safetensors"))
        bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
        if bad:
            raise RuntimeError(f"{src}/adapter_model.safetensors does not fit this adapter (unexpected {bad[:3]})")
        return
    f = src / "model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{src} holds neither adapter_model.safetensors nor model.safetensors")
    missing, unexpected = model.load_state_dict(load_file(f), strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{f} does not fit the teacher: missing {sorted(set(missing) - tied)[:3]}, "
                           f"unexpected {unexpected[:3]}")


def finetune_teacher(
    cfg: PipelineConfig,
    data_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    tokenizer_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], Any] = print,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Finetune the teacher on ``data_dir``'s train split; returns (and writes) the metrics.

    Everything comes from ``cfg``; ``data_dir`` (a tokenized_parquet folder with a ``val`` split) and
    ``output_dir`` default to ``cfg.tokenized_dir`` / ``cfg.teacher_ft_dir`` and are given only to point a
    test or a bench elsewhere; ``tokenizer_dir``: the resolved tokenizer, default ``cfg.tokenizer_dir``; ``resume_from``: a checkpoint dir or a run dir
    with ``checkpoint_latest``; ``device``: default ``cfg.train.device`` (CUDA when present);
    ``stop_after``: stop (with a checkpoint, raising :class:`TrainingInterrupted`) after that many steps.
    """
    check_finetune_config(cfg)
    ft = cfg.teacher_ft
    data_dir = Path(data_dir) if data_dir is not None else cfg.tokenized_dir
    out = Path(output_dir) if output_dir is not None else cfg.teacher_ft_dir
    dev = torch.device(device) if isinstance(device, torch.device) else pick_device(device or cfg.train.device)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else cfg.tokenizer_dir
    tokenizer = load_tokenizer(tok_dir)
    tok_hash = tokenizer_hash(tok_dir)
    manifest = Manifest.load(data_dir)
    check_manifest(manifest, tok_hash, cfg.tokenize.max_seq_length)
    if not manifest.split_shards("val"):
        raise ValueError(f"{data_dir / MANIFEST}: no 'val' split; teacher finetuning measures held-out perplexity "
                         "before and after (set tokenize.val_fraction > 0 and re-run preprocessing with force)")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    need = pass_key_row_min_len(encode) if ft.pass_key_rows_per_batch else 0
    if manifest.max_seq_length < need:
        raise ConfigError(f"teacher_ft.pass_key_rows_per_batch needs rows of at least {need} tokens (the needle, the "
                          f"question and the answer); {data_dir / MANIFEST} has max_seq_length "
                          f"{manifest.max_seq_length} (set pass_key_rows_per_batch: 0, or pack longer rows)")

    model, base_id = build_model(cfg, manifest.vocab_size, dev)
    check_manifest(manifest, vocab_size=model.get_input_embeddings().num_embeddings)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(ft))

    # the same val batches for every evaluation (before, intervals, after)
    val_loader = make_loader(data_dir, "val", ft.batch_size, tokenizer_hash=tok_hash)
    val_batches = list(islice(val_loader, ft.eval_batches or None))

    def evaluate() -> dict[str, float]:
        return perplexity(model, val_batches, device=dev)

    state: dict[str, Any] = {"step": 0, "tokens": 0, "best_ppl": None, "best_step": None, "bad_evals": 0,
                             "early_stopped": False, "history": []}
    tstate = None
    if resume_from is not None:
        path, tstate, _ = ckpt.load_trainer_state(resume_from)
        load_weights(model, path)
        opt.load_state_dict(tstate["optimizer"])
        sched.load_state_dict(tstate["scheduler"])
        state.update(tstate["teacher_ft"])
    run_config = cfg.model_dump(mode="json")
    tel = Telemetry(out, cfg.wandb, run_config, total_steps=ft.max_steps, echo=log,
                    resume_id=(tstate or {}).get("wandb_id") or None, name=out.name, group=wandb_group(cfg),
                    job_type="teacher_ft", tags=["teacher_ft", ft.mode], start_step=state["step"],
                    progress_desc="teacher_ft")
    tel.info(f"teacher_ft: mode={ft.mode} trainable {n_trainable:,} / {n_total:,} params on {dev}")
    if tstate is not None:
        tel.event(state["step"], "resumed", from_checkpoint=str(path))
    else:
        before = evaluate()
        state["before"] = before
        tel.log(0, {"val_ppl": before["ppl"], "val_nats_per_token": before["nats_per_token"]}, kind="val",
                line=f"teacher_ft: val ppl before finetuning {before['ppl']:.3f} ({before['tokens']} tokens)")

    run_info = {
        "kind": "teacher_ft",
        "config": run_config,
        "lineage": {"manifest_sha256": sha256_file(data_dir / MANIFEST), "tokenizer_hash": tok_hash, "base": base_id},
    }
    best_dir = out / "best"

    def contents(at: int) -> CheckpointContents:
        state.update(step=at, tokens=loop.tokens)
        tstate = {"step": at, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                  "rng": ckpt.rng_state(), "teacher_ft": dict(state), "wandb_id": tel.wandb_id or ""}
        return CheckpointContents(model, tstate, run_info)

    warmup = ft.copy_warmup_steps  # the first steps train on copy rows; the corpus loader starts after them
    train_iter = iter(make_loader(data_dir, "train", ft.batch_size, seed=ft.seed,
                                  start_step=max(0, state["step"] - warmup) * ft.grad_accum, tokenizer_hash=tok_hash))
    specials = sorted(getattr(tokenizer, "all_special_ids", None) or [])
    first_token = len(specials) if specials == list(range(len(specials))) else 0  # copy rows skip leading specials
    if tstate is not None:
        # after the iterator is created: creating it draws from torch's RNG, in a fresh run before step 1 too
        ckpt.set_rng_state(tstate["rng"])
    model.train()

    T, V = manifest.max_seq_length, manifest.vocab_size

    def short_rows(index: int) -> dict[str, torch.Tensor]:
        """A corpus step's tokens as 64-token rows: many distinct spans per step, so the circuit forms sooner."""
        if T <= COPY_ROW_LEN:
            return long_rows(index, ft.batch_size)
        return copy_batch(index, ft.batch_size * (T // COPY_ROW_LEN), COPY_ROW_LEN, V, seed=ft.seed,
                          first_token=first_token, min_period=6, max_period=COPY_ROW_LEN // 2 - 2)

    def long_rows(index: int, rows: int) -> dict[str, torch.Tensor]:
        """Full-length rows, periods up to T - 16 (the distances of the training length), half over small alphabets."""
        return copy_batch(index, rows, T, V, seed=ft.seed, first_token=first_token, min_period=min(6, T // 8),
                          max_period=max(T - 16, T // 2), small_alphabet_share=0.5)

    def batches(step: int) -> list[dict[str, torch.Tensor]]:
        idx = [step * ft.grad_accum + i for i in range(ft.grad_accum)]  # copy rows are a function of this index
        if step < warmup:
            return [short_rows(i) if step < warmup * COPY_SHORT_SHARE else long_rows(i, ft.batch_size) for i in idx]
        out = [next(train_iter) for _ in idx]
        if ft.pass_key_rows_per_batch:  # some corpus rows carry a pass key at a random distance
            out = [pass_key_rows(b, i, ft.pass_key_rows_per_batch, encode, seed=ft.seed) for b, i in zip(out, idx)]
        if ft.copy_rows_per_batch:  # copy rows beside the corpus rows keep the circuit at every distance
            extra = [long_rows(MIXED_ROWS_INDEX + i, ft.copy_rows_per_batch) for i in idx]
            out = [{k: torch.cat([b[k], c[k]]) for k in b if k in c} for b, c in zip(out, extra)]
        return out

    def train_step(step: int) -> StepOutput:
        """The token-mean CE of grad_accum micro-batches (module docstring), backward."""
        micro = batches(step)
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        loss_sum = 0.0
        for b in micro:
            kw = lm_inputs(model, b, dev)
            # HF shifts the unshifted labels once (its loss upcasts the logits to fp32); num_items_in_batch
            # makes the sum a mean over the step. train.autocast: bf16 matmuls where the hardware has them
            with autocast(dev, cfg.train.autocast):
                out_ = model(**kw, labels=b["labels"].to(dev), num_items_in_batch=max(n_items, 1))
            out_.loss.backward()
            loss_sum += float(out_.loss.detach())
        return StepOutput(loss=loss_sum, tokens=n_items, rows=sum(len(b["input_ids"]) for b in micro))

    def evaluate_and_keep_best(at: int) -> dict[str, float]:
        """Interval evaluation: history, the best weights (``best/``), early stopping."""
        ev = evaluate()
        state["history"].append({"step": at, "train_loss": loop.last.loss, "val_ppl": ev["ppl"],
                                 "val_nats_per_token": ev["nats_per_token"]})
        if at <= warmup:  # copy rows are not the corpus: their held-out ppl is logged, never a best or a stop
            tel.log(at, {"val_ppl": ev["ppl"], "val_nats_per_token": ev["nats_per_token"]}, kind="val",
                    line=f"teacher_ft step {at}: val ppl {ev['ppl']:.3f} (copy warm-up, {warmup} steps)")
            return ev
        if state["best_ppl"] is None or ev["ppl"] < state["best_ppl"]:
            state.update(best_ppl=ev["ppl"], best_step=at, bad_evals=0)
            with atomic_dir(best_dir) as tmp:
                _save_weights(model, tmp)
        else:
            state["bad_evals"] += 1
        tel.log(at, {"val_ppl": ev["ppl"], "val_nats_per_token": ev["nats_per_token"], "best_ppl": state["best_ppl"]},
                kind="val", line=f"teacher_ft step {at}: val ppl {ev['ppl']:.3f} (best {state['best_ppl']:.3f} "
                                 f"at step {state['best_step']})")
        if ft.early_stopping_patience and state["bad_evals"] >= ft.early_stopping_patience:
            state["early_stopped"] = True
            tel.event(at, "early_stopped", bad_evals=state["bad_evals"], best_step=state["best_step"])
        return ev

    checkpointer = Checkpointer(out, contents, keep=ft.keep_checkpoints, tel=tel)
    guard = NanGuard(1, fix="Lower teacher_ft.learning_rate")
    loop = TrainLoop(
        "teacher finetuning", tel, optimizer_step=OptimizerStep(opt, sched, params, ft.grad_clip, guard),
        max_steps=ft.max_steps, log_interval=ft.log_interval, eval_interval=ft.eval_interval,
        save_interval=ft.save_interval, checkpointer=checkpointer, step=state["step"], tokens=state["tokens"],
        stop_after=stop_after, device=dev, resume_hint=f"resume with --resume-from {out}",
        log_line=lambda at, m: (f"teacher_ft step {at}/{ft.max_steps}: loss {m['loss']:.4f} lr {m['lr']:.3g} "
                                f"grad_norm {m['grad_norm']:.3g} {m['tokens_per_s']:,.0f} tok/s"),
    )
    with loop:
        loop.run(train_step, evaluate=evaluate_and_keep_best, finished=lambda: state["early_stopped"])
        state.update(step=loop.step, tokens=loop.tokens)
        metrics = _finish(cfg, model, tokenizer, out, state, evaluate, n_trainable, tel)
        metrics.update(wandb_url=tel.wandb_url, wandb_dir=tel.wandb_dir)
        tel.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _finish(cfg: PipelineConfig, model: torch.nn.Module, tokenizer: Any, out: Path, state: dict[str, Any],
            evaluate: Callable[[], dict[str, float]], n_trainable: int, tel: Telemetry) -> dict[str, Any]:
    """After the last step: the held-out "after" (the best weights if they beat the last ones), the final
    folders, and the metrics."""
    ft = cfg.teacher_ft
    best_dir = out / "best"
    after = evaluate()
    restored_best = False
    if state["best_ppl"] is not None and state["best_ppl"] < after["ppl"] and best_dir.exists():
        load_weights(model, best_dir)
        after = evaluate()
        restored_best = True
        tel.info(f"teacher_ft: restored the best weights (step {state['best_step']})")
    model.eval()
    before = state["before"]
    rel = (before["ppl"] - after["ppl"]) / before["ppl"]
    metrics: dict[str, Any] = {
        "mode": ft.mode,
        "steps": state["step"],
        "tokens_trained": state["tokens"],
        "trainable_params": n_trainable,
        "val_tokens": after["tokens"],
        "val_ppl_before": before["ppl"],
        "val_ppl_after": after["ppl"],
        "val_nats_per_token_before": before["nats_per_token"],
        "val_nats_per_token_after": after["nats_per_token"],
        "relative_improvement": rel,
        "expected_improvement": ft.expected_improvement,
        "meets_expected_improvement": bool(rel >= ft.expected_improvement),
        "early_stopped": state["early_stopped"],
        "best_step": state["best_step"],
        "restored_best": restored_best,
        "output_dir": str(out),
        "final_adapter": None,
        "final_model": None,
        "merged_model": None,
        "history": state["history"],
    }
    if ft.mode == "lora":
        with atomic_dir(out / "final_adapter") as tmp:
            _save_weights(model, tmp, tokenizer)
        metrics["final_adapter"] = str(out / "final_adapter")
        if ft.merge:
            merged = model.merge_and_unload()
            with atomic_dir(out / "merged_model") as tmp:
                _save_weights(merged, tmp, tokenizer)
            metrics["merged_model"] = str(out / "merged_model")
    else:
        with atomic_dir(out / "final_model") as tmp:
            _save_weights(model, tmp, tokenizer)
        metrics["final_model"] = str(out / "final_model")
    final = metrics["final_adapter"] or metrics["final_model"]
    metrics["final_sha256"] = sha256_dir(final)
    verdict = "meets" if metrics["meets_expected_improvement"] else "does NOT meet"
    tel.info(f"teacher_ft: val ppl {before['ppl']:.3f} -> {after['ppl']:.3f} ({100 * rel:+.1f}%), {verdict} the "
             f"expected {100 * ft.expected_improvement:.0f}% improvement; wrote {final}")
    return metrics
