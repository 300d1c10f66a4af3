"""Which layers a hybrid student keeps as softmax attention: the KL-guided choice (``student.attention_layers:
auto``), as fla-org's hybrid-distillation chooses them.

After stage-1 alignment, the pure converted student is measured against the teacher on held-out rows, once as
it is and once per layer with that layer alone restored to the teacher's attention
(:func:`distill_dag.model.convert.hybridize`). With ``t`` the teacher's and ``s`` the student's next-token
distributions over the full vocabulary, averaged over attended positions::

    KL = mean_{b,t : attention_mask[b,t] = 1} sum_v t_v (log t_v - log s_v)
    gain_l = KL(pure) - KL(layer l restored)

The K layers with the largest gain are kept. The per-layer table goes into the stage-1 result and the model card.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distill_dag.model.convert import hybridize


@torch.no_grad()
def kl_to_teacher(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                  device: torch.device) -> float:
    """Token-mean KL(teacher || student) over the attended positions of ``batches`` (module docstring).

    Both models see ``input_ids`` [B, T] with ``position_ids`` [B, T] (packed documents), as in KD."""
    total, n = 0.0, 0.0
    was = student.training
    student.eval()
    for b in batches:
        ids, pos = b["input_ids"].to(device), b["position_ids"].to(device)
        mask = b["attention_mask"].to(device).bool()
        # use_cache=False: with a cache transformers skips its packed-document mask
        t = F.log_softmax(teacher(input_ids=ids, position_ids=pos, use_cache=False).logits.float(), -1)
        s = F.log_softmax(student(input_ids=ids, position_ids=pos, use_cache=False).logits.float(), -1)
        kl = (t.exp() * (t - s)).sum(-1)
        total += float(kl[mask].sum())
        n += float(mask.sum())
    student.train(was)
    return total / max(n, 1.0)


def attention_layer_gains(student: torch.nn.Module, teacher: torch.nn.Module,
                          batches: list[dict[str, torch.Tensor]], device: torch.device,
                          window: int | None = None) -> list[dict[str, Any]]:
    """One row per layer: ``{"layer", "kl", "gain"}`` with that layer alone restored to the teacher's
    attention; plus the pure student's KL as ``kl_pure`` on every row."""
    base = kl_to_teacher(student, teacher, batches, device)
    rows = []
    for i in range(student.config.num_hidden_layers):
        if student.config.layer_types[i] != "linear_attention":
            continue
        probe, _ = hybridize(student, teacher, [i], window)
        kl = kl_to_teacher(probe, teacher, batches, device)
        rows.append({"layer": i, "kl_pure": base, "kl": kl, "gain": base - kl})
        del probe
    return rows


def choose_attention_layers(rows: list[dict[str, Any]], k: int) -> list[int]:
    """The ``k`` layers of largest gain (ties: the lower index), in layer order."""
    if k > len(rows):
        raise ValueError(f"student.num_attention_layers {k} > the {len(rows)} layers that could be restored")
    best = sorted(rows, key=lambda r: (-r["gain"], r["layer"]))[:k]
    return sorted(r["layer"] for r in best)
