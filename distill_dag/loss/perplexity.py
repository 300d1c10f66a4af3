"""Perplexity of any Hugging Face causal LM on a ``tokenized_parquet`` split (or any batch iterable).

Label convention (the project's one): ``labels[b, t]`` is ``input_ids[b, t]`` or -100, NOT shifted.
The score shifts exactly once: the model's output at position ``t`` is scored against
``labels[b, t + 1]``::

    nats_per_token = - sum_{b, t : labels[b, t+1] != -100} log softmax(logits[b, t])[labels[b, t+1]]
                     / #{b, t : labels[b, t+1] != -100}
    bits_per_token = nats_per_token / ln 2
    ppl            = exp(nats_per_token)

Packed rows hold several documents; ``position_ids`` restart at 0 where a document starts. The model
gets ``position_ids`` and no ``attention_mask`` (see :func:`lm_inputs`), so each document is scored
on its own, the same way in training, evaluation and the teacher's finetuning.
"""

from __future__ import annotations

import inspect
import math
from itertools import islice
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from distill_dag.data.dataset import make_loader

Batch = dict[str, torch.Tensor]


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def lm_inputs(model: torch.nn.Module, batch: Batch, device: torch.device | str | None = None) -> dict[str, Any]:
    """Forward kwargs of a causal LM for a packed batch (``input_ids``/``position_ids`` ``[B, T]``).

    ``attention_mask`` is deliberately left out: with ``position_ids`` and no mask (and no cache),
    transformers' Llama-class models build a block-diagonal causal mask from the restarts of
    ``position_ids`` (one block per document); the RetNet student resets its state at the same
    restarts. Padding only ever sits at the end of a row, with labels -100, and a causal model never
    lets an earlier position see it, so dropping the mask does not change any scored token.
    """
    dev = device if device is not None else next(model.parameters()).device
    kw: dict[str, Any] = {"input_ids": batch["input_ids"].to(dev)}
    if "position_ids" in batch and _accepts(model, "position_ids"):
        kw["position_ids"] = batch["position_ids"].to(dev)
    if _accepts(model, "use_cache"):
        kw["use_cache"] = False  # a cache would also switch off the per-document mask
    return kw


@torch.no_grad()
def batch_nll(model: torch.nn.Module, batch: Batch, device: torch.device | str | None = None) -> tuple[float, int]:
    """(sum of next-token NLL in nats, number of scored tokens) for one batch, shifted once.

    ``batch['labels']`` ``[B, T]`` long, unshifted, -100 where not scored. Logits are upcast to fp32
    one row at a time so a bf16 model at vocab 128k does not double its peak memory.
    """
    logits = model(**lm_inputs(model, batch, device)).logits  # [B, T, V]
    labels = batch["labels"].to(logits.device)
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        tgt = labels[b, 1:]
        keep = tgt != -100
        n = int(keep.sum())
        if n == 0:
            continue
        lp = logits[b, :-1][keep].float()
        total += float(F.cross_entropy(lp, tgt[keep], reduction="sum", ignore_index=-100).double())
        count += n
    return total, count


def split_loader(data_dir: str | Path, split: str = "val", batch_size: int = 8) -> Iterable[Batch]:
    """One ordered pass over a tokenized_parquet split (the train split too: no shuffle, no repeat)."""

    return make_loader(data_dir, split, batch_size, shuffle=False, infinite=False)


def perplexity(
    model: torch.nn.Module,
    data: Iterable[Batch] | str | Path,
    *,
    split: str = "val",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Perplexity of ``model`` over ``data``: a batch iterable (the data loader) or a data dir + ``split``.

    ``max_batches`` None or <= 0 reads everything. Returns ``nats_per_token``, ``bits_per_token``,
    ``ppl`` and ``tokens`` (the number of scored tokens). The model's train/eval mode is restored.
    """
    if isinstance(data, (str, Path)):
        data = split_loader(data, split, batch_size)
    limit = max_batches if max_batches and max_batches > 0 else None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(data):
            if limit is not None and i >= limit:
                break
            s, n = batch_nll(model, batch, device)
            total += s
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no scored tokens (every label is -100, or the split is empty)")
    nats = total / count
    return {"nats_per_token": nats, "bits_per_token": nats / math.log(2), "ppl": math.exp(nats), "tokens": count}


def perplexity_table(
    models: dict[str, torch.nn.Module],
    data: list[Batch] | str | Path,
    *,
    split: str = "val",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """One row per model (``{"model": name, **perplexity(...)}``), all on the same batches.

    ``data``: a data dir (read once, then shared) or a list of batches (re-iterable, not a generator).
    """
    if isinstance(data, (str, Path)):
        limit = max_batches if max_batches and max_batches > 0 else None
        data = list(islice(split_loader(data, split, batch_size), limit))
    rows = []
    for name, model in models.items():
        r = perplexity(model, data, max_batches=max_batches, device=device)
        rows.append({"model": name, **r})
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | nats/token | bits/token | ppl | tokens |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['nats_per_token']:.4f} | {r['bits_per_token']:.4f} | {r['ppl']:.2f} | {r['tokens']} |"
        )
    return "\n".join(lines)
