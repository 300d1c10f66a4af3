r"""Distillation loss: next-token CE mixed with a sparse top-k KL to the teacher, computed in chunks.

Notation for one scored position (hidden state ``h_t`` scored against ``labels[t+1]``):

* student logits ``z = W h_t`` over the vocabulary V (never materialised for the whole batch),
  ``q_T = softmax(z / T)``, ``q_1 = softmax(z)``;
* teacher top-k support ``S`` (k ids) with log-probs ``l_j`` at temperature 1, normalised over the
  full vocabulary (``TeacherTopK``), so ``sum_j exp(l_j) <= 1``.

Loss, averaged over the N positions whose shifted label is not -100:

    loss = alpha * T^2 * KL + (1 - alpha) * CE  [+ w_div * D]          (teacher given)
    loss = CE  [+ w_div * D]                                            (teacher None)
    CE   = -log q_1(y)

The temperature divides both the teacher's log-probs and the student's logits; T^2 keeps the KL
gradient's scale independent of T. Two treatments of the teacher's tail (mass outside its top-k):

``tail="renormalize"`` (default)::

    p~_j = softmax_j(l_j / T)                   teacher at T renormalised over S (exact: the unknown
                                                normaliser cancels)
    KL   = sum_{j in S} p~_j (log p~_j - log q_T(j))

  where ``log q_T(j) = z_j / T - logsumexp_V(z / T)`` is the student's FULL-vocabulary log-prob at
  T restricted to S (not renormalised). This is the cross-entropy H(p~, q_T) - H(p~), and equals
  ``KL(p~ || q~_T) - log Q_T(S)`` with ``q~_T`` the student renormalised on S and ``Q_T(S)`` its
  mass on S: the KL between the renormalised distributions plus a penalty for student mass outside
  the teacher's support. Gradient w.r.t. z: ``(q_T(v) - p~_v [v in S]) / T`` for every v.

``tail="bucket"``: both distributions become k+1 categories (S plus one "rest" bucket) at T = 1,
then are tempered as categoricals::

    c_t = [l_1..l_k, log(1 - sum_j exp(l_j))]       c_s = [log q_1(j) for j in S, log(1 - q_1(S))]
    P = softmax(c_t / T),  Q = softmax(c_s / T),   KL = sum_{m in S + rest} P_m (log P_m - log Q_m)

  For the teacher this is the only possible tempering (its tail logits are unknown); applying the
  same map to the student keeps the objective proper (zero iff the student's k+1 categories equal
  the teacher's, for every T). With k = V the rest bucket is empty and both tails are the exact
  ``KL(softmax(l / T) || softmax(z / T))``. Gradient w.r.t. z: ``(Q_v - P_v) / T`` on S, and
  ``(Q_rest - P_rest) / T * q_1(v) / q_1(rest)`` for v outside S.

Diversity (off by default, ``diversity_weight = w_div``): with the batch-mean predicted distribution
``m = (1/N) sum_t q_1(. | t)`` over the N scored positions of this call,

    D = log V - H(m) = log V + sum_v m_v log m_v      (>= 0; 0 iff m is uniform)

penalises a student whose predictions collapse onto a few tokens across the whole batch (it does
not push any single prediction toward uniform). Its gradient needs m from every chunk first, so it
costs one more pass of the LM head. Reported ``diversity`` is D (unweighted).

Teacher ids in a row must be distinct (a sorted top-k is). The LM head has no bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distill_dag.loss.topk import TeacherTopK
from distill_dag.kernels.kd_loss import KDOptions, fused_linear_kd_loss


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, carries the gradient (the value to .backward())
    ce: torch.Tensor  # scalar, detached: mean next-token CE (T = 1)
    kl: torch.Tensor  # scalar, detached: mean KL at temperature T (before alpha and T^2); 0 without teacher
    diversity: torch.Tensor  # scalar, detached: D (before its weight); 0 when diversity_weight == 0
    n_tokens: int  # positions scored (shifted label != -100): weight of this micro-batch


def distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherTopK | None = None,
    **options: Any,
) -> LossOutput:
    """Chunked CE + sparse top-k KL (see the module docstring for the formulas).

    hidden [B, T, d]: the student's last hidden state (after the final norm, before the LM head).
    lm_head_weight [V, d]. labels [B, T] UNSHIFTED, -100 = not scored. teacher: ``TeacherTopK``
    with indices / logprobs [B, T, k] (position t describes token t+1) or None for CE only.
    The shift happens here, once: hidden[:, t] is scored against labels[:, t+1] and teacher[:, t].
    Logits exist for ``chunk_tokens`` positions at a time; the gradients w.r.t. hidden and
    lm_head_weight are computed during the forward and returned by backward.
    options: the fields of :class:`~distill_dag.kernels.kd_loss.KDOptions` (temperature and distill_alpha
    required; tail, chunk_tokens, diversity_weight, backend), checked after the shapes.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, d], got shape {tuple(hidden.shape)}")
    B, T, d = hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != d:
        raise ValueError(f"lm_head_weight must be [V, {d}] to match hidden, got {tuple(lm_head_weight.shape)}")
    if labels.shape != (B, T):
        raise ValueError(f"labels must be [B, T] = {(B, T)} like hidden, got {tuple(labels.shape)}")
    KDOptions(**options)  # checks them before any work; fused_linear_kd_loss takes them as given here

    tgt = labels[:, 1:].to(hidden.device)
    valid = tgt != -100
    h = hidden[:, :-1][valid]  # [N, d]; autograd scatters the gradient back into hidden
    y = tgt[valid].long()
    V = lm_head_weight.shape[0]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= V):
        raise ValueError(f"labels hold ids outside [0, {V}) other than -100: the tokenizer and the LM head disagree")
    idx = logp = None
    if teacher is not None:
        if teacher.indices.shape[:2] != (B, T) or teacher.logprobs.shape != teacher.indices.shape:
            raise ValueError(
                f"teacher top-k must be [B, T, k] with B, T = {(B, T)} (as hidden), got indices "
                f"{tuple(teacher.indices.shape)} and logprobs {tuple(teacher.logprobs.shape)}"
            )
        if teacher.k > V:
            raise ValueError(f"teacher k = {teacher.k} > vocabulary {V}")
        idx = teacher.indices[:, :-1].to(hidden.device)[valid].long()
        logp = teacher.logprobs[:, :-1].to(hidden.device)[valid].float()
    loss, ce, kl, div = fused_linear_kd_loss(h, lm_head_weight, y, idx, logp, **options)
    return LossOutput(loss=loss, ce=ce, kl=kl, diversity=div, n_tokens=int(y.numel()))
