"""Builders specific to the teacher / logit-cache / server tests (no tests here): their teacher, and
independent reference KLs. Rows, shards and batches are in ``support``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# subprocess scripts import this module with only tests/teacher on their path: `support` is in tests/
_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from support import VOCAB  # noqa: E402
from support import tiny_llama as _tiny_llama  # noqa: E402


def tiny_llama(vocab: int = VOCAB, seed: int = 0):
    """The teacher of these tests: ``support.tiny_llama`` at half width (hidden 32, MLP 64) with its
    embeddings x8, sharper than the 0.02-std init, so the top-k is far from uniform."""
    return _tiny_llama(vocab, seed, embed_scale=8.0, hidden_size=32, intermediate_size=64)


def reference_kl(t_idx: torch.Tensor, t_lp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_T || q_S) over the teacher's top-k support, both renormalised over it (fp64).

    ``t_idx``/``t_lp`` [B, T, k]; ``student_logits`` [B, T, V] -> [B, T].
    """
    p_log = torch.log_softmax(t_lp.double(), -1)
    q_log = torch.log_softmax(student_logits.double().gather(-1, t_idx), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def reference_kl_bucket(t_idx, t_lp, student_logits) -> torch.Tensor:
    """Per-position KL with the tail outside the teacher's top-k as one extra bucket (fp64)."""
    s_full = torch.log_softmax(student_logits.double(), -1)
    q = s_full.gather(-1, t_idx)
    p = t_lp.double()
    tp = (-torch.expm1(torch.logsumexp(p, -1))).clamp_min(1e-30)
    tq = (-torch.expm1(torch.logsumexp(q, -1))).clamp_min(1e-30)
    return (p.exp() * (p - q)).sum(-1) + tp * (tp.log() - tq.log())
