"""Chunkwise retention as Triton kernels: forward and backward, document resets inside chunks.

Same math as :mod:`distill_dag.kernels.retention.chunk` (see its docstring), split the way
flash-linear-attention splits its chunk kernels:

forward
  1. ``_state_scan``  grid (K/BK, V/BV, B*H): walks the chunks in order, writes the state entering every
                      chunk, ``h[b, h, n]`` [K, V] float32 (and the final state).
  2. ``_chunk_out``   grid (V/BV, T/BT, B*H): every chunk in parallel, ``o = inter(q, h) + intra(q, k, v)``.
backward (states recomputed by 1, not stored, to keep the forward's memory at O(T))
  3. ``_state_scan``  the same kernel with REVERSE: walks the chunks backwards, writes ``dh[b, h, n]``, the
                      gradient of the loss w.r.t. the state *leaving* chunk n (and dh0 for the initial state):
                      ``dS_n = [no reset in chunk n] gamma^L dS_{n+1} + sum_i [rc_i = 0] gamma^(i+1) q_i^T do_i``.
  4. ``_dqk_bwd``     grid (K/BK, T/BT, B*H): ``dq = dA k + w_q do h^T``, ``dk = dA^T q + w_k v dh^T`` with
                      ``dA = (do v^T) * M`` (M the chunk's decay/document mask).
  5. ``_chunk_out``   the same kernel with TRANSPOSED: ``dv = (q k^T * M)^T do + w_k k dh``.

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

from distill_dag.kernels.retention.reference import RetentionInputs, RetentionOutput, retention_form

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tuned(fn):
    """Autotune the launch config on a GPU; the interpreter has no driver to time configs on."""
    if INTERPRET:
        return fn
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2)]
    key = [name for name in ("K", "V", "BT", "BK", "BV", "REVERSE", "TRANSPOSED") if name in fn.arg_names]
    return triton.autotune(configs=configs, key=key)(fn)


@triton.jit
def _program(g, H: tl.constexpr):
    """Row, head, 64-bit row*H + head and log2(gamma_head) of this program (grid axis 2 is B*H)."""
    i_bh = tl.program_id(2)
    i_h = i_bh % H
    return i_bh // H, i_h, i_bh.to(tl.int64), tl.load(g + i_h)


@triton.jit
def _chunk(reset, i_b, i_h, i_t, T, H: tl.constexpr, BT: tl.constexpr):
    """Chunk i_t of row i_b: positions in the chunk, in-bounds mask, inclusive reset count, total resets,
    true length and the rows (b * T + t) * H + h of the [B, T, H, D] tensors."""
    o_t = tl.arange(0, BT)
    t = i_t * BT + o_t
    m_t = t < T
    r = tl.load(reset + i_b * T + t, mask=m_t, other=0).to(tl.int32)
    rc = tl.cumsum(r, 0)
    rl = tl.sum(r, 0)
    L = tl.minimum(T - i_t * BT, BT)
    row = (i_b * T + t).to(tl.int64) * H + i_h
    return o_t, m_t, rc, rl, L, row


@triton.jit
def _load_rows(x, row, o_d, m_t, D: tl.constexpr):
    """[BT, BD] tile of a [B, T, H, D] tensor (zeros outside)."""
    return tl.load(x + row[:, None] * D + o_d[None, :], mask=m_t[:, None] & (o_d[None, :] < D), other=0.0)


@triton.jit
def _load_row_pair(x, y, row, o_d, m_t, D: tl.constexpr):
    """The same [BT, BD] tile of two [B, T, H, D] tensors."""
    return _load_rows(x, row, o_d, m_t, D), _load_rows(y, row, o_d, m_t, D)


@triton.jit
def _store_rows(x, row, o_d, m_t, D: tl.constexpr, value):
    tl.store(x + row[:, None] * D + o_d[None, :], value.to(x.dtype.element_ty), mask=m_t[:, None] & (o_d[None, :] < D))


@triton.jit
def _state_tile(i_state, o_k, o_v, K: tl.constexpr, V: tl.constexpr):
    """Offsets and mask of a [BK, BV] tile of state number i_state (int64) in a [..., K, V] float32 tensor."""
    return i_state * K * V + o_k[:, None] * V + o_v[None, :], (o_k[:, None] < K) & (o_v[None, :] < V)


@triton.jit
def _chunk_program(reset, g, T, NT, H: tl.constexpr, BT: tl.constexpr):
    """Kernels 2, 4, 5 (grid axis 1 is the chunk): the chunk, its state's number and the chunk's flags."""
    i_t = tl.program_id(1)
    i_b, i_h, i_bh64, lg = _program(g, H)
    o_t, m_t, rc, rl, L, row = _chunk(reset, i_b, i_h, i_t, T, H, BT)
    return i_bh64 * NT + i_t, lg, o_t, m_t, rc, rl, L, row


@triton.jit
def _dots_over_k(x, y, s, row, m_t, i_state, o_v, K: tl.constexpr, V: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """``x y^T`` [BT, BT] and ``x s`` [BT, BV] over all of K, for x, y [B, T, H, K] and the state s."""
    b_xy = tl.zeros([BT, BT], dtype=tl.float32)
    b_xs = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_x, b_y = _load_row_pair(x, y, row, o_k, m_t, K)
        s_off, m_kv = _state_tile(i_state, o_k, o_v, K, V)
        b_s = tl.load(s + s_off, mask=m_kv, other=0.0)
        b_xs += tl.dot(b_x, b_s.to(b_x.dtype), input_precision=PREC)
        b_xy += tl.dot(b_x, tl.trans(b_y), input_precision=PREC)
    return b_xy, b_xs


@triton.jit
def _decays(o_t, m_t, rc, rl, L, lg):
    """Per-position weights of a chunk: w_q (query i sees the entering state: gamma^(i+1) before the first
    reset), w_k (key j reaches the leaving state: gamma^(L-1-j) in the last document) and the state's carry
    across the chunk (gamma^L, 0 when the chunk holds a reset)."""
    w_q = tl.where(rc == 0, tl.exp2((o_t + 1).to(tl.float32) * lg), 0.0)
    w_k = tl.where(m_t & (rc == rl), tl.exp2((L - 1 - o_t).to(tl.float32) * lg), 0.0)
    carry = tl.where(rl == 0, tl.exp2(L.to(tl.float32) * lg), 0.0)
    return w_q, w_k, carry


@triton.jit
def _intra(A, o_t, rc, lg, TRANSPOSED: tl.constexpr):
    """A [BT, BT] (scores i, j; TRANSPOSED: j, i) times the chunk's mask gamma^(i-j) for j <= i in one document."""
    if TRANSPOSED:
        diff = o_t[None, :] - o_t[:, None]
    else:
        diff = o_t[:, None] - o_t[None, :]
    keep = (diff >= 0) & (rc[:, None] == rc[None, :])
    return tl.where(keep, A * tl.exp2(diff.to(tl.float32) * lg), 0.0)


@_tuned
@triton.jit
def _state_scan(
    a, b, reset, g, states, s_in, s_out, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, USE_IN: tl.constexpr, STORE_OUT: tl.constexpr, PREC: tl.constexpr,
):
    """Kernels 1 and 3: ``S = carry S + (w a)^T b`` chunk by chunk, writing the state before each chunk into
    ``states``. Forward (a, b = k, v; w = w_k) in order from s_in; REVERSE (a, b = q, do; w = w_q) from the
    last chunk, from s_in = dht. The state after the scan goes to s_out."""
    i_b, i_h, i_bh64, lg = _program(g, H)
    o_k = tl.program_id(0) * BK + tl.arange(0, BK)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    bh_off, m_kv = _state_tile(i_bh64, o_k, o_v, K, V)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_IN:
        S += tl.load(s_in + bh_off, mask=m_kv, other=0.0).to(tl.float32)
    for i_r in range(NT):
        if REVERSE:
            i_t = NT - 1 - i_r
        else:
            i_t = i_r
        st_off, _ = _state_tile(i_bh64 * NT + i_t, o_k, o_v, K, V)
        tl.store(states + st_off, S, mask=m_kv)
        o_t, m_t, rc, rl, L, row = _chunk(reset, i_b, i_h, i_t, T, H, BT)
        b_a = _load_rows(a, row, o_k, m_t, K)
        b_b = _load_rows(b, row, o_v, m_t, V)
        w_q, w_k, carry = _decays(o_t, m_t, rc, rl, L, lg)
        if REVERSE:
            w = w_q
        else:
            w = w_k
        b_aw = (b_a.to(tl.float32) * w[:, None]).to(b_b.dtype)
        S = S * carry + tl.dot(tl.trans(b_aw), b_b, input_precision=PREC)
    if STORE_OUT:
        tl.store(s_out + bh_off, S, mask=m_kv)


@_tuned
@triton.jit
def _chunk_out(
    x, y, z, reset, g, s, out, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, TRANSPOSED: tl.constexpr, PREC: tl.constexpr,
):
    """Kernels 2 and 5: ``out = w (x s) + ((x y^T) * M) z`` for every chunk. Forward: x, y, z, s = q, k, v, h,
    w = w_q. TRANSPOSED (M^T, w = w_k): x, y, z, s = k, q, do, dh gives dv."""
    i_state, lg, o_t, m_t, rc, rl, L, row = _chunk_program(reset, g, T, NT, H, BT)
    o_v = tl.program_id(0) * BV + tl.arange(0, BV)
    b_A, b_out = _dots_over_k(x, y, s, row, m_t, i_state, o_v, K, V, BT, BK, BV, PREC)
    b_A = _intra(b_A, o_t, rc, lg, TRANSPOSED)
    w_q, w_k, carry = _decays(o_t, m_t, rc, rl, L, lg)
    if TRANSPOSED:
        w = w_k
    else:
        w = w_q
    b_z = _load_rows(z, row, o_v, m_t, V)
    b_out = b_out * w[:, None] + tl.dot(b_A.to(b_z.dtype), b_z, input_precision=PREC)
    _store_rows(out, row, o_v, m_t, V, b_out)


@_tuned
@triton.jit
def _dqk_bwd(
    q, k, v, do, reset, g, h, dh, dq, dk, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    i_state, lg, o_t, m_t, rc, rl, L, row = _chunk_program(reset, g, T, NT, H, BT)
    o_k = tl.program_id(0) * BK + tl.arange(0, BK)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_v, b_do = _load_row_pair(v, do, row, o_v, m_t, V)
        hv_off, m_kv = _state_tile(i_state, o_k, o_v, K, V)
        b_h = tl.load(h + hv_off, mask=m_kv, other=0.0)
        b_dh = tl.load(dh + hv_off, mask=m_kv, other=0.0)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_dq += tl.dot(b_do, tl.trans(b_h).to(b_do.dtype), input_precision=PREC)
        b_dk += tl.dot(b_v, tl.trans(b_dh).to(b_v.dtype), input_precision=PREC)
    b_dA = _intra(b_dA, o_t, rc, lg, False)
    w_q, w_k, carry = _decays(o_t, m_t, rc, rl, L, lg)
    b_q, b_k = _load_row_pair(q, k, row, o_k, m_t, K)
    b_dq = b_dq * w_q[:, None] + tl.dot(b_dA.to(b_k.dtype), b_k, input_precision=PREC)
    b_dk = b_dk * w_k[:, None] + tl.dot(tl.trans(b_dA).to(b_q.dtype), b_q, input_precision=PREC)
    _store_rows(dq, row, o_k, m_t, K, b_dq)
    _store_rows(dk, row, o_k, m_t, K, b_dk)


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
    _state_scan[grid](
        k, v, reset, lg2, h, h0 if h0 is not None else h, ht if ht is not None else h, T, NT,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, REVERSE=False, USE_IN=h0 is not None, STORE_OUT=store_final, PREC=prec,
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
        _chunk_out[grid](
            q, k, v, reset_i, lg2, h, o, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, TRANSPOSED=False, PREC=prec,
            **_launch_kw(),
        )
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
        _state_scan[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
            q, do, reset_i, lg2, dh, dht if dht is not None else dh, dh0 if dh0 is not None else dh, T, NT,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, REVERSE=True, USE_IN=dht is not None, STORE_OUT=dh0 is not None,
            PREC=prec, **_launch_kw(),
        )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _dqk_bwd[(triton.cdiv(K, BK), NT, B * H)](
            q, k, v, do, reset_i, lg2, h, dh, dq, dk, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec,
            **_launch_kw(),
        )
        _chunk_out[(triton.cdiv(V, BV), NT, B * H)](
            k, q, do, reset_i, lg2, dh, dv, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, TRANSPOSED=True, PREC=prec,
            **_launch_kw(),
        )
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, None, None, dh0, None, None


@retention_form
def retention_chunkwise_triton(x: RetentionInputs, chunk_size: int = 64) -> RetentionOutput:
    """Triton chunkwise retention (forward + backward); shapes in :mod:`~distill_dag.kernels.retention.reference`.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32 or None). q, k, v must share a dtype;
    K, V >= 16; chunk_size a power of 2."""
    q, k, v = x.q, x.k, x.v
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return ChunkRetentionFunction.apply(*x, chunk_size)
