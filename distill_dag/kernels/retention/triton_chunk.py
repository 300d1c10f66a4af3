"""Chunkwise retention as Triton kernels: forward and backward, document resets inside chunks.

Same math as :mod:`distill_dag.kernels.retention.chunk` (see its docstring), split the way
flash-linear-attention splits its chunk kernels:

forward
  1. ``_state_fwd``   grid (K/BK, V/BV, B*H): walks the chunks in order, writes the state entering every
                      chunk, ``h[b, h, n]`` [K, V] float32 (and the final state).
  2. ``_output_fwd``  grid (V/BV, T/BT, B*H): every chunk in parallel, ``o = inter(q, h) + intra(q, k, v)``.
backward (states recomputed by 1, not stored, to keep the forward's memory at O(T))
  3. ``_state_bwd``   grid (K/BK, V/BV, B*H): walks the chunks backwards, writes ``dh[b, h, n]``, the gradient
                      of the loss w.r.t. the state *leaving* chunk n (and dh0 for the initial state):
                      ``dS_n = [no reset in chunk n] gamma^L dS_{n+1} + sum_i [rc_i = 0] gamma^(i+1) q_i^T do_i``.
  4. ``_dqk_bwd``     grid (K/BK, T/BT, B*H): ``dq = dA k + w_q do h^T``, ``dk = dA^T q + w_k v dh^T`` with
                      ``dA = (do v^T) * M`` (M the chunk's decay/document mask).
  5. ``_dv_bwd``      grid (V/BV, T/BT, B*H): ``dv = (q k^T * M)^T do + w_k k dh``.

Document boundaries are per-position reset flags ([B, T]); inside a chunk a running count of resets
(``tl.cumsum``) gives each position its document, so documents of any length (variable-length segments
not aligned to chunks) never see each other.

Tensors are [B, T, H, K|V] contiguous. Dots take the inputs' dtype (bf16 on GPU training, fp32 in tests)
and accumulate in fp32; decays, masks and states are fp32. Under ``TRITON_INTERPRET=1`` (CPU tests) the
kernels run with a fixed launch config, because ``triton.autotune`` cannot run in the interpreter.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tuned(fn):
    """Autotune the launch config on a GPU; the interpreter has no driver to time configs on."""
    if INTERPRET:
        return fn
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2)]
    return triton.autotune(configs=configs, key=["K", "V", "BT", "BK", "BV"])(fn)


@triton.jit
def _chunk_flags(reset, i_b, i_t, T, BT: tl.constexpr):
    """Positions, in-bounds mask, inclusive reset count and total resets of chunk i_t of row i_b."""
    o_t = tl.arange(0, BT)
    t = i_t * BT + o_t
    m_t = t < T
    r = tl.load(reset + i_b * T + t, mask=m_t, other=0).to(tl.int32)
    rc = tl.cumsum(r, 0)
    rl = tl.sum(r, 0)
    return o_t, t, m_t, rc, rl


@_tuned
@triton.jit
def _state_fwd(
    k, v, reset, g, h, h0, ht, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    lg = tl.load(g + i_h)  # log2(gamma_h)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    kv_off = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + i_bh64 * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(NT):
        tl.store(h + (i_bh64 * NT + i_t) * K * V + kv_off, S, mask=m_kv)
        o_t, t, m_t, rc, rl = _chunk_flags(reset, i_b, i_t, T, BT)
        L = tl.minimum(T - i_t * BT, BT)
        row = (i_b * T + t).to(tl.int64) * H + i_h
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K), other=0.0)
        b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V), other=0.0)
        w_k = tl.where(m_t & (rc == rl), tl.exp2((L - 1 - o_t).to(tl.float32) * lg), 0.0)
        carry = tl.where(rl == 0, tl.exp2(L.to(tl.float32) * lg), 0.0)
        b_kw = (b_k.to(tl.float32) * w_k[:, None]).to(b_v.dtype)
        S = S * carry + tl.dot(tl.trans(b_kw), b_v, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_bh64 * K * V + kv_off, S, mask=m_kv)


@_tuned
@triton.jit
def _output_fwd(
    q, k, v, reset, g, h, o, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    lg = tl.load(g + i_h)
    o_t, t, m_t, rc, rl = _chunk_flags(reset, i_b, i_t, T, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    row = (i_b * T + t).to(tl.int64) * H + i_h
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_qk = m_t[:, None] & (o_k[None, :] < K)
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_qk, other=0.0)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_qk, other=0.0)
        b_h = tl.load(
            h + (i_bh64 * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.0,
        )
        b_o += tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PREC)
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    diff = o_t[:, None] - o_t[None, :]
    keep = (diff >= 0) & (rc[:, None] == rc[None, :])
    b_A = tl.where(keep, b_A * tl.exp2(diff.to(tl.float32) * lg), 0.0)
    w_q = tl.where(rc == 0, tl.exp2((o_t + 1).to(tl.float32) * lg), 0.0)
    m_tv = m_t[:, None] & (o_v[None, :] < V)
    b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
    b_o = b_o * w_q[:, None] + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
    tl.store(o + row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)


@_tuned
@triton.jit
def _state_bwd(
    q, do, reset, g, dh, dht, dh0, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    lg = tl.load(g + i_h)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    kv_off = o_k[:, None] * V + o_v[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_bh64 * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        tl.store(dh + (i_bh64 * NT + i_t) * K * V + kv_off, dS, mask=m_kv)
        o_t, t, m_t, rc, rl = _chunk_flags(reset, i_b, i_t, T, BT)
        L = tl.minimum(T - i_t * BT, BT)
        row = (i_b * T + t).to(tl.int64) * H + i_h
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K), other=0.0)
        b_do = tl.load(do + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V), other=0.0)
        w_q = tl.where(m_t & (rc == 0), tl.exp2((o_t + 1).to(tl.float32) * lg), 0.0)
        carry = tl.where(rl == 0, tl.exp2(L.to(tl.float32) * lg), 0.0)
        b_qw = (b_q.to(tl.float32) * w_q[:, None]).to(b_do.dtype)
        dS = dS * carry + tl.dot(tl.trans(b_qw), b_do, input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + i_bh64 * K * V + kv_off, dS, mask=m_kv)


@_tuned
@triton.jit
def _dqk_bwd(
    q, k, v, do, reset, g, h, dh, dq, dk, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    lg = tl.load(g + i_h)
    o_t, t, m_t, rc, rl = _chunk_flags(reset, i_b, i_t, T, BT)
    L = tl.minimum(T - i_t * BT, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    row = (i_b * T + t).to(tl.int64) * H + i_h
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
        b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_do = tl.load(do + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        hv_off = (i_bh64 * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(h + hv_off, mask=m_kv, other=0.0)
        b_dh = tl.load(dh + hv_off, mask=m_kv, other=0.0)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_dq += tl.dot(b_do, tl.trans(b_h).to(b_do.dtype), input_precision=PREC)
        b_dk += tl.dot(b_v, tl.trans(b_dh).to(b_v.dtype), input_precision=PREC)
    diff = o_t[:, None] - o_t[None, :]
    keep = (diff >= 0) & (rc[:, None] == rc[None, :])
    b_dA = tl.where(keep, b_dA * tl.exp2(diff.to(tl.float32) * lg), 0.0)
    w_q = tl.where(rc == 0, tl.exp2((o_t + 1).to(tl.float32) * lg), 0.0)
    w_k = tl.where(m_t & (rc == rl), tl.exp2((L - 1 - o_t).to(tl.float32) * lg), 0.0)
    m_tk = m_t[:, None] & (o_k[None, :] < K)
    b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_dq = b_dq * w_q[:, None] + tl.dot(b_dA.to(b_k.dtype), b_k, input_precision=PREC)
    b_dk = b_dk * w_k[:, None] + tl.dot(tl.trans(b_dA).to(b_q.dtype), b_q, input_precision=PREC)
    tl.store(dq + row[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + row[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)


@_tuned
@triton.jit
def _dv_bwd(
    q, k, do, reset, g, dh, dv, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    lg = tl.load(g + i_h)
    o_t, t, m_t, rc, rl = _chunk_flags(reset, i_b, i_t, T, BT)
    L = tl.minimum(T - i_t * BT, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    row = (i_b * T + t).to(tl.int64) * H + i_h
    b_At = tl.zeros([BT, BT], dtype=tl.float32)  # At[j, i] = k_j . q_i
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_dh = tl.load(
            dh + (i_bh64 * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.0,
        )
        b_At += tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
        b_dv += tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=PREC)
    diff = o_t[None, :] - o_t[:, None]  # i - j
    keep = (diff >= 0) & (rc[:, None] == rc[None, :])
    b_At = tl.where(keep, b_At * tl.exp2(diff.to(tl.float32) * lg), 0.0)
    w_k = tl.where(m_t & (rc == rl), tl.exp2((L - 1 - o_t).to(tl.float32) * lg), 0.0)
    m_tv = m_t[:, None] & (o_v[None, :] < V)
    b_do = tl.load(do + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
    b_dv = b_dv * w_k[:, None] + tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC)
    tl.store(dv + row[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


def _blocks(K: int, V: int, chunk_size: int) -> tuple[int, int, int]:
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"triton retention needs a power-of-two chunk_size >= 16 (tl.dot), got {chunk_size}")
    if K < 16 or V < 16:
        raise ValueError(f"triton retention needs head dims >= 16 (tl.dot), got K={K}, V={V}")
    return chunk_size, min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs: exact fp32 dots unless the user allowed TF32 globally; bf16/fp16: Triton's default."""
    if dtype != torch.float32:
        return None
    return "tf32" if (torch.backends.cuda.matmul.allow_tf32 and not INTERPRET) else "ieee"


def _launch_kw() -> dict:
    return {"num_warps": 4, "num_stages": 1} if INTERPRET else {}


def _fwd_states(k, v, reset, lg2, h0, store_final, BT, BK, BV, prec):
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    h = torch.empty(B, H, NT, K, V, device=k.device, dtype=torch.float32)
    ht = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32) if store_final else None
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)
    _state_fwd[grid](
        k, v, reset, lg2, h, h0 if h0 is not None else h, ht if ht is not None else h, T, NT,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_H0=h0 is not None, STORE_HT=store_final, PREC=prec,
        **_launch_kw(),
    )
    return h, ht


class ChunkRetentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, reset, initial_state, output_final_state, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        BT, BK, BV = _blocks(K, V, chunk_size)
        prec = _precision(q.dtype)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        lg2 = (log_decay.to(device=q.device, dtype=torch.float32) / math.log(2.0)).contiguous()
        reset_i = (
            torch.zeros(B, T, dtype=torch.int32, device=q.device) if reset is None else reset.to(torch.int32).contiguous()
        )
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        h, ht = _fwd_states(k, v, reset_i, lg2, h0, output_final_state, BT, BK, BV, prec)
        NT = h.shape[2]
        o = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype)
        grid = (triton.cdiv(V, BV), NT, B * H)
        _output_fwd[grid](q, k, v, reset_i, lg2, h, o, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec, **_launch_kw())
        ctx.save_for_backward(q, k, v, reset_i, lg2, h0)
        ctx.cfg = (BT, BK, BV, prec)
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, reset_i, lg2, h0 = ctx.saved_tensors
        BT, BK, BV, prec = ctx.cfg
        B, T, H, K = q.shape
        V = v.shape[-1]
        do = do.contiguous().to(v.dtype)
        h, _ = _fwd_states(k, v, reset_i, lg2, h0, False, BT, BK, BV, prec)
        NT = h.shape[2]
        dh = torch.empty_like(h)
        dh0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if h0 is not None else None
        dht = dht.to(torch.float32).contiguous() if dht is not None else None
        _state_bwd[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
            q, do, reset_i, lg2, dh, dht if dht is not None else dh, dh0 if dh0 is not None else dh, T, NT,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_DHT=dht is not None, STORE_DH0=dh0 is not None, PREC=prec,
            **_launch_kw(),
        )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _dqk_bwd[(triton.cdiv(K, BK), NT, B * H)](
            q, k, v, do, reset_i, lg2, h, dh, dq, dk, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec,
            **_launch_kw(),
        )
        _dv_bwd[(triton.cdiv(V, BV), NT, B * H)](
            q, k, do, reset_i, lg2, dh, dv, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec, **_launch_kw()
        )
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, None, None, dh0, None, None


def retention_chunkwise_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    reset: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton chunkwise retention (forward + backward). q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H];
    reset [B, T] bool or None; initial_state [B, H, K, V] or None. Returns (o [B, T, H, V] in v's dtype,
    final state [B, H, K, V] fp32 or None). q, k, v must share a dtype; K, V >= 16; chunk_size a power of 2."""
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return ChunkRetentionFunction.apply(q, k, v, log_decay, reset, initial_state, output_final_state, chunk_size)
