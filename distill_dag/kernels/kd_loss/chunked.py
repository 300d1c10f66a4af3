"""Chunked fused-linear KD loss: LM head + CE + sparse top-k KL, gradient produced inside the forward.

The student's logits exist only for ``chunk_tokens`` rows at a time ([chunk, V] fp32). For each chunk
the forward computes the loss AND dL/dlogits analytically, turns that into the chunk's contribution
to dL/dhidden ([chunk, d]) and dL/dW ([V, d], accumulated), and drops the logits. Backward only
scales the stored gradients by grad_output (the fused-linear pattern of Liger-Kernel).

Per chunk the logits ``z`` are split into the teacher's support S (k gathered columns, [n, k]) and the
tail (every other column: S is overwritten with -inf in place). All support math is small [n, k]
work; the [n, V] work is two row-softmaxes over the tail (at 1 and at T), done by
:func:`_tail_softmax_torch` (CPU / any device) or by the Triton kernels of ``triton_tail`` on CUDA,
which write the gradient into the logits buffer in place.

Notation (one row, i.e. one scored token): lse1 = logsumexp(z), lseT = logsumexp(z / T),
q1 = softmax(z), qT = softmax(z / T), Qrest1 = q1 mass on the tail, QrestT = qT mass on the tail,
c_ce = (1 - alpha) / N, c_kl = alpha T^2 / N (N = number of scored tokens).

dL/dz_v = c_ce (q1_v - [v = y])                                       (CE)
        + renormalize: c_kl / T (qT_v - p~_v [v in S])                  (p~: teacher renormalised on S at T)
          bucket:      c_kl / T (Q_v - P_v)                     v in S
                       c_kl / T (Q_rest - P_rest) q1_v / Qrest1  v not in S
        + diversity (see losses.py): w q1_v (a_v - sum_u q1_u a_u),  a = log(m) / N
So on the tail the gradient of a row is  A * q1_v / Qrest1 + B * qT_v / QrestT  with per-row A, B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

TAILS = ("renormalize", "bucket")
BACKENDS = ("auto", "torch", "triton")
_NEG_INF = float("-inf")


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    # Rows whose tail is empty (k = V) have lse = -inf; exp(z - lse) must read exp(-inf - 0) = 0 there.
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _tail_softmax_torch(z: torch.Tensor, T: float, need_T: bool):
    """z [n, V] fp32 with -inf on the support. Returns E1 = exp(z - m), ET = exp((z - m) / T) (or None),
    their row sums s1, sT (clamped to > 0 so callers can divide) and the tail logsumexps lse1, lseT
    [n, 1]. E1 / s1 is softmax(z) over the tail; the normalisation is left to the caller, who folds it
    into per-row coefficients (one [n, V] pass less each). ``z`` is consumed (ET reuses its memory)."""
    m = _finite_or_zero(z.amax(1, keepdim=True))
    E1 = (z - m).exp_()
    s1 = E1.sum(1, keepdim=True)
    lse1 = m + s1.log()  # -inf where the tail is empty
    s1 = torch.where(s1 > 0, s1, torch.ones_like(s1))
    if not need_T:
        return E1, None, s1, None, lse1, None
    ET = z.sub_(m).mul_(1.0 / T).exp_()  # max of (z - m) / T is 0: no overflow
    sT = ET.sum(1, keepdim=True)
    lseT = m / T + sT.log()
    sT = torch.where(sT > 0, sT, torch.ones_like(sT))
    return E1, ET, s1, sT, lse1, lseT


def _support_terms(zS, zy, lse_t1, lse_tT, logp, *, T, tail, c_ce, c_kl):
    """Small [n, k] math. zS [n, k] student logits on the support, zy [n] logit of the label,
    lse_t1 / lse_tT [n, 1] tail logsumexps at 1 and at T (lse_tT None when T = 1: then equal to lse_t1),
    logp [n, k] teacher log-probs at T = 1 or None. Returns per-row ce [n], kl [n], the support gradient
    gS [n, k] (CE + KL parts) and the tail coefficients A, B [n, 1] (see module docstring), q1_S, Qrest1."""
    lse1 = torch.logaddexp(lse_t1, torch.logsumexp(zS, 1, keepdim=True)) if zS.shape[1] else lse_t1
    ce = lse1.squeeze(1) - zy
    q1_S = (zS - lse1).exp()
    Qrest1 = (lse_t1 - lse1).exp()
    gS = c_ce * q1_S
    A = c_ce * Qrest1
    B = None
    if logp is None:
        return ce, torch.zeros_like(ce), gS, A, B, q1_S, Qrest1
    if tail == "renormalize":
        if lse_tT is None:  # T == 1
            lse_tT = lse_t1
        sS = zS / T
        lseT = torch.logaddexp(lse_tT, torch.logsumexp(sS, 1, keepdim=True))
        log_qT_S = sS - lseT
        QrestT = (lse_tT - lseT).exp()
        log_p = torch.log_softmax(logp / T, dim=1)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_qT_S), torch.zeros_like(p)).sum(1)
        gS = gS + (c_kl / T) * (log_qT_S.exp() - p)
        B = (c_kl / T) * QrestT
    elif tail == "bucket":
        empty_tail = ~torch.isfinite(lse_t1)
        # teacher rest = log(1 - sum_j p_j), stably; 0 mass where rounding makes the sum >= 1 or the tail is empty
        rest_t = torch.log((-torch.expm1(torch.logsumexp(logp, 1, keepdim=True))).clamp_min(0.0))
        rest_t = torch.where(empty_tail, torch.full_like(rest_t, _NEG_INF), rest_t)
        log_P = torch.log_softmax(torch.cat([logp, rest_t], 1) / T, dim=1)
        log_Q = torch.log_softmax(torch.cat([zS - lse1, lse_t1 - lse1], 1) / T, dim=1)
        P = log_P.exp()
        kl = torch.where(P > 0, P * (log_P - log_Q), torch.zeros_like(P)).sum(1)
        g = (c_kl / T) * (log_Q.exp() - P)
        gS = gS + g[:, :-1]
        A = A + g[:, -1:]
    else:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    return ce, kl, gS, A, B, q1_S, Qrest1


def _chunk_forward(z, y, idx, logp, *, T, tail, c_ce, c_kl, div_w, div_a, use_triton):
    """One chunk. z [n, V] fp32 logits (consumed: it becomes dL/dz), y [n], idx / logp [n, k] or None,
    div_a [V] or None. Returns (grad [n, V] fp32, ce_sum, kl_sum)."""
    n = z.shape[0]
    rows = torch.arange(n, device=z.device)
    zy = z[rows, y]
    if idx is not None:
        zS = z.gather(1, idx)
        z.scatter_(1, idx, _NEG_INF)
    else:
        zS = z.new_empty(n, 0)
    need_T = idx is not None and tail == "renormalize" and T != 1.0

    if use_triton and div_w == 0.0:
        from .triton_tail import tail_grad_, tail_lse  # lazy: triton is optional (CUDA only)

        lse_t1, lse_tT = tail_lse(z, T, need_T)
        ce, kl, gS, A, B, _, _ = _support_terms(
            zS, zy, lse_t1, lse_tT, logp, T=T, tail=tail, c_ce=c_ce, c_kl=c_kl
        )
        if B is not None and lse_tT is None:  # T == 1: the qT tail is the q1 tail
            A, B = A + B, None
        grad = tail_grad_(z, A, B, _finite_or_zero(lse_t1), None if B is None else _finite_or_zero(lse_tT), T)
    else:
        E1, ET, s1, sT, lse_t1, lse_tT = _tail_softmax_torch(z, T, need_T)
        ce, kl, gS, A, B, q1_S, Qrest1 = _support_terms(
            zS, zy, lse_t1, lse_tT, logp, T=T, tail=tail, c_ce=c_ce, c_kl=c_kl
        )
        if B is not None and ET is None:  # T == 1
            A, B = A + B, None
        A = A / s1  # E1 is unnormalised: fold 1 / s1 (and 1 / sT) into the row coefficients
        div_tail = None
        if div_w:
            # <q1, a> per row = Qrest1 * (E1 @ a) / s1 + sum_S q1_S a_S
            dot = (Qrest1 / s1).squeeze(1) * (E1 @ div_a)
            if idx is not None:
                a_S = div_a[idx]
                dot = dot + (q1_S * a_S).sum(1)
                gS = gS + div_w * q1_S * (a_S - dot[:, None])
            div_tail = E1 * (div_a[None, :] - dot[:, None])
            div_tail.mul_(div_w * Qrest1 / s1)
        if B is not None:
            grad = ET.mul_(B / sT).addcmul_(E1, A)
            del E1
        else:
            grad = E1.mul_(A)
        if div_tail is not None:
            grad.add_(div_tail)
            del div_tail
    if idx is not None:
        grad.scatter_(1, idx, gS)  # the tail buffers are exactly 0 on S
    grad.index_put_((rows, y), torch.full_like(zy, -c_ce), accumulate=True)
    return grad, ce.sum(), kl.sum()


class FusedLinearKDLoss(torch.autograd.Function):
    """loss = sum over tokens of the per-token terms (already divided by N); see ``fused_linear_kd_loss``."""

    @staticmethod
    def forward(ctx, h, W, y, idx, logp, T, alpha, tail, chunk_tokens, div_w, use_triton, cdt, need_gh, need_gW):
        N, d = h.shape
        V = W.shape[0]
        dev = h.device
        with torch.autocast(device_type=dev.type, enabled=False):
            # cdt: dtype of the three matmuls (the autocast dtype under autocast, else h's dtype);
            # softmaxes, losses and dL/dlogits are fp32 whatever it is.
            Wc = W if W.dtype == cdt else W.to(cdt)
            grad_h = torch.zeros_like(h) if need_gh else None
            # dL/dW accumulates over chunks in fp32 (one rounding at the end, not one per chunk)
            grad_W = torch.zeros(W.shape, dtype=torch.float32, device=dev) if need_gW else None
            Neff = max(N, 1)
            has_teacher = idx is not None
            c_ce = (1.0 - alpha) / Neff if has_teacher else 1.0 / Neff
            c_kl = alpha * T * T / Neff if has_teacher else 0.0

            div_a = None
            div_val = torch.zeros((), dtype=torch.float32, device=dev)
            if div_w and N:
                # pass 1: batch-mean predicted distribution m (needs every chunk before any gradient)
                m = torch.zeros(V, dtype=torch.float32, device=dev)
                for s in range(0, N, chunk_tokens):
                    z = _logits_fp32(h[s : s + chunk_tokens].to(cdt), Wc)
                    m += torch.softmax(z, dim=1).sum(0)
                    del z
                m /= N
                m = m.clamp_min(torch.finfo(torch.float32).tiny)
                div_val = math.log(V) + (m * m.log()).sum()
                div_a = m.log() / N

            ce_sum = torch.zeros((), dtype=torch.float32, device=dev)
            kl_sum = torch.zeros((), dtype=torch.float32, device=dev)
            for s in range(0, N, chunk_tokens):
                e = min(s + chunk_tokens, N)
                hc = h[s:e].to(cdt)
                g, ce_c, kl_c = _chunk_forward(
                    _logits_fp32(hc, Wc), y[s:e],
                    None if idx is None else idx[s:e],
                    None if logp is None else logp[s:e].float(),
                    T=T, tail=tail, c_ce=c_ce, c_kl=c_kl, div_w=div_w, div_a=div_a, use_triton=use_triton,
                )
                ce_sum += ce_c
                kl_sum += kl_c
                if not (need_gh or need_gW):  # evaluation: the loss is all we need
                    del g
                    continue
                gc = g.to(cdt)
                del g  # free the fp32 [n, V] buffer before the two gradient matmuls
                if need_gh:
                    grad_h[s:e] = gc @ Wc
                if need_gW:
                    _accumulate_fp32_(grad_W, gc.T, hc)
                del gc
            if need_gW and W.dtype != torch.float32:
                grad_W = grad_W.to(W.dtype)
            ce = ce_sum / Neff
            kl = kl_sum / Neff
            loss = c_ce * ce_sum + c_kl * kl_sum  # a tensor distinct from ce: only loss is differentiable
            if div_w:
                loss = loss + div_w * div_val
        ctx.save_for_backward(grad_h, grad_W)
        ctx.mark_non_differentiable(ce, kl, div_val)
        return loss, ce, kl, div_val

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_h, grad_W = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_W = None if grad_W is None else grad_W * grad_loss.to(grad_W.dtype)
        return (grad_h, grad_W) + (None,) * 12


def _has_out_dtype() -> bool:
    # torch.mm / addmm(..., out_dtype=float32) for bf16/fp16 operands: CUDA, torch >= 2.12
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 12)


def _logits_fp32(hc: torch.Tensor, Wc: torch.Tensor) -> torch.Tensor:
    """[n, V] fp32 logits; with 16-bit operands on CUDA the GEMM writes fp32 directly (no 16-bit copy)."""
    if hc.dtype == torch.float32:
        return hc @ Wc.T
    if hc.is_cuda and _has_out_dtype():
        return torch.mm(hc, Wc.T, out_dtype=torch.float32)
    return (hc @ Wc.T).float()


def _accumulate_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without an fp32 [V, d] temporary."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda and _has_out_dtype():
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)  # 16-bit temporary; the in-place mixed-dtype add converts on the fly


@dataclass(frozen=True, kw_only=True)
class KDOptions:
    """How the KD loss is computed (the config key in brackets); checked when built.

    temperature (train.temperature) > 0; distill_alpha (train.distill_alpha) in [0, 1], the KL's weight;
    tail (train.tail) one of :data:`TAILS`; chunk_tokens (train.loss_chunk_tokens) >= 1, rows of logits at a
    time; diversity_weight, the batch-diversity term's weight; backend: "torch", "triton" (CUDA only) or
    "auto" (triton on CUDA when importable and diversity is off)."""

    temperature: float
    distill_alpha: float
    tail: str = "renormalize"
    chunk_tokens: int = 1024
    diversity_weight: float = 0.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS} (train.tail in the config), got {self.tail!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (train.temperature), got {self.temperature}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1] (train.distill_alpha), got {self.distill_alpha}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1 (train.loss_chunk_tokens), got {self.chunk_tokens}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be auto|torch|triton, got {self.backend!r}")


def fused_linear_kd_loss(
    h: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    teacher_indices: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    **options: Any,
):
    """Already shifted and masked inputs: h [N, d] hidden states of the scored positions, W [V, d],
    y [N] target ids, teacher_indices [N, k] int64 / teacher_logprobs [N, k] (T = 1, full-vocab
    normalised) or None; options: the fields of :class:`KDOptions`, by keyword. Returns (loss, ce, kl,
    diversity) scalars; only loss has a grad."""
    opts = KDOptions(**options)
    tail, backend, diversity_weight = opts.tail, opts.backend, opts.diversity_weight
    V = W.shape[0]
    if teacher_indices is not None and teacher_indices.shape[-1] >= V and tail == "bucket":
        tail = "renormalize"  # no tail: both definitions are the exact KL
    if backend == "auto":
        use_triton = h.is_cuda and diversity_weight == 0.0 and _triton_available()
    else:
        use_triton = backend == "triton"
    if use_triton and diversity_weight:
        raise ValueError("the triton backend does not implement diversity_weight > 0; use backend='torch'")
    # the LM head matmul runs in the dtype autocast would give it; without autocast in h's dtype
    dev_type = h.device.type
    cdt = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else h.dtype
    # gradients are produced in the forward, so only when they will be asked for (not under no_grad)
    grad_on = torch.is_grad_enabled()
    return FusedLinearKDLoss.apply(
        h, W, y, teacher_indices, teacher_logprobs, float(opts.temperature), float(opts.distill_alpha), tail,
        int(opts.chunk_tokens), float(diversity_weight), use_triton, cdt, grad_on and h.requires_grad,
        grad_on and W.requires_grad,
    )


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
