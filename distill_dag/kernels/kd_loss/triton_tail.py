"""Triton GPU path for the [n, V] part of the chunked KD loss: two row kernels over the tail logits.

``tail_lse``: one sweep per row computing lse1 = logsumexp(z) and lseT = logsumexp(z / T) over the
tail (the support columns hold -inf), with lane-wise online max/sum so no [n, V] temporary is made.
``tail_grad_``: writes dL/dz_v = A * exp(z_v - lse1) + B * exp(z_v / T - lseT) into the logits
buffer in place (A, B per row, from the small support math in ``chunked._support_terms``).

Against the PyTorch path this saves the two extra [n, V] fp32 buffers and several passes over them.
No autotune: a fixed config, so the same kernels run under ``TRITON_INTERPRET=1`` on the CPU (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tail_lse_kernel(z_ptr, stride, V, inv_T, lse1_ptr, lseT_ptr, NEED_T: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    m1 = tl.full([BLOCK], float("-inf"), tl.float32)
    s1 = tl.zeros([BLOCK], tl.float32)
    mT = tl.full([BLOCK], float("-inf"), tl.float32)
    sT = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m1, x)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: sum stays 0, no nan
        s1 = s1 * tl.exp(m1 - m_ref) + tl.exp(x - m_ref)
        m1 = m_new
        if NEED_T:
            xt = x * inv_T
            mt_new = tl.maximum(mT, xt)
            mt_ref = tl.where(mt_new == float("-inf"), 0.0, mt_new)
            sT = sT * tl.exp(mT - mt_ref) + tl.exp(xt - mt_ref)
            mT = mt_new
    # combine lanes
    M = tl.max(m1, 0)
    M_ref = tl.where(M == float("-inf"), 0.0, M)
    lane_ref = tl.where(m1 == float("-inf"), 0.0, m1)
    tot = tl.sum(s1 * tl.exp(lane_ref - M_ref), 0)
    tl.store(lse1_ptr + row, M_ref + tl.log(tot))
    if NEED_T:
        MT = tl.max(mT, 0)
        MT_ref = tl.where(MT == float("-inf"), 0.0, MT)
        laneT_ref = tl.where(mT == float("-inf"), 0.0, mT)
        totT = tl.sum(sT * tl.exp(laneT_ref - MT_ref), 0)
        tl.store(lseT_ptr + row, MT_ref + tl.log(totT))


@triton.jit
def _tail_grad_kernel(z_ptr, stride, V, inv_T, A_ptr, B_ptr, l1_ptr, lT_ptr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    a = tl.load(A_ptr + row)
    l1 = tl.load(l1_ptr + row)
    if HAS_B:
        b = tl.load(B_ptr + row)
        lT = tl.load(lT_ptr + row)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        msk = cols < V
        x = tl.load(base + cols, mask=msk, other=float("-inf")).to(tl.float32)
        g = a * tl.exp(x - l1)
        if HAS_B:
            g += b * tl.exp(x * inv_T - lT)
        tl.store(base + cols, g, mask=msk)


def _block(V: int) -> int:
    return min(4096, triton.next_power_of_2(V))


def tail_lse(z: torch.Tensor, T: float, need_T: bool):
    """z [n, V] fp32, row-contiguous. Returns lse1 [n, 1] and lseT [n, 1] (None unless need_T)."""
    assert z.dtype == torch.float32 and z.stride(1) == 1
    n, V = z.shape
    lse1 = torch.empty(n, dtype=torch.float32, device=z.device)
    lseT = torch.empty(n, dtype=torch.float32, device=z.device) if need_T else lse1
    if n:
        _tail_lse_kernel[(n,)](z, z.stride(0), V, 1.0 / T, lse1, lseT, NEED_T=need_T, BLOCK=_block(V), num_warps=8)
    return lse1[:, None], (lseT[:, None] if need_T else None)


def tail_grad_(z, A, B, lse1, lseT, T: float) -> torch.Tensor:
    """In place: z[r, v] <- A[r] exp(z[r, v] - lse1[r]) + B[r] exp(z[r, v] / T - lseT[r]) (B term if B given).
    A, B, lse1, lseT [n, 1] fp32 with finite lse (the caller maps -inf to 0). Returns z."""
    n, V = z.shape
    A = A.reshape(n).contiguous().float()
    l1 = lse1.reshape(n).contiguous().float()
    has_b = B is not None
    Bv = B.reshape(n).contiguous().float() if has_b else A
    lT = lseT.reshape(n).contiguous().float() if has_b else l1
    if n:
        _tail_grad_kernel[(n,)](z, z.stride(0), V, 1.0 / T, A, Bv, l1, lT, HAS_B=has_b, BLOCK=_block(V), num_warps=8)
    return z
