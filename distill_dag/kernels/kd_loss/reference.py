"""Naive full-vocabulary KD loss: the reference the chunked kernel is tested and benchmarked against.

It materialises the student's logits for every position ([B, T, V]) and lets autograd produce the
gradients, so it is easy to read and to trust, and it costs several [tokens x vocab] buffers.
The formulas are those of :func:`distill_dag.loss.kd.distill_loss`; this file computes them
the obvious way (log_softmax over the full vocabulary, masks instead of the chunked kernel's
support/tail split) so that the two are independent implementations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_indices: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    distill_alpha: float = 0.5,
    tail: str = "renormalize",
    diversity_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """hidden [B, T, d], lm_head_weight [V, d], labels [B, T] unshifted (-100 ignored),
    teacher_indices / teacher_logprobs [B, T, k] (position t describes token t+1) or None.

    Returns {"loss", "ce", "kl", "diversity"} (scalars; "loss" carries autograd)."""
    V = lm_head_weight.shape[0]
    T = float(temperature)
    logits = (hidden @ lm_head_weight.T).float()[:, :-1]  # [B, T-1, V]
    tgt = labels[:, 1:]
    valid = tgt != -100
    z = logits[valid]  # [N, V]
    y = tgt[valid]
    ce = F.cross_entropy(z, y, reduction="mean") if y.numel() else z.sum() * 0

    kl = z.new_zeros(())
    if teacher_indices is not None:
        idx = teacher_indices[:, :-1][valid]
        lp = teacher_logprobs[:, :-1][valid].float()
        if tail == "renormalize":
            log_q_T = F.log_softmax(z / T, dim=-1)
            log_p = F.log_softmax(lp / T, dim=-1)
            p = log_p.exp()
            per = torch.where(p > 0, p * (log_p - log_q_T.gather(1, idx)), torch.zeros_like(p)).sum(-1)
        elif tail == "bucket":
            q1 = F.softmax(z, dim=-1)
            support = torch.zeros_like(z, dtype=torch.bool).scatter(1, idx, True)
            q_S = q1.gather(1, idx)
            q_rest = (q1 * (~support)).sum(-1, keepdim=True)
            p_S = lp.exp()
            p_rest = (1.0 - p_S.sum(-1, keepdim=True)).clamp_min(0.0)
            p_rest = torch.where(support.all(-1, keepdim=True), torch.zeros_like(p_rest), p_rest)
            log_P = F.log_softmax(torch.cat([p_S, p_rest], -1).log() / T, dim=-1)
            log_Q = F.log_softmax(torch.cat([q_S, q_rest], -1).log() / T, dim=-1)
            P = log_P.exp()
            per = torch.where(P > 0, P * (log_P - log_Q), torch.zeros_like(P)).sum(-1)
        else:
            raise ValueError(tail)
        kl = per.mean() if per.numel() else z.sum() * 0
        loss = distill_alpha * T * T * kl + (1.0 - distill_alpha) * ce
    else:
        loss = ce

    div = z.new_zeros(())
    if diversity_weight > 0 and y.numel():
        m = F.softmax(z, dim=-1).mean(0)
        div = math.log(V) + torch.special.xlogy(m, m).sum()
        loss = loss + diversity_weight * div
    return {"loss": loss, "ce": ce.detach(), "kl": kl.detach(), "diversity": div.detach()}
