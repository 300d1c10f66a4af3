"""Chunkwise-recurrent retention in PyTorch: the training form on CPU (and the fallback everywhere).

The row is cut into chunks of ``C`` tokens. Inside a chunk the parallel form runs on a [C, C] mask; across
chunks a [K, V] state per head carries the past (Sun et al. 2023, eq. 7). With ``rc_i`` the number of
document starts in the chunk up to and including position i, ``L`` the chunk's length and ``S`` the state
entering the chunk::

    o_i     = sum_{j<=i, rc_j=rc_i} gamma^(i-j) (q_i.k_j) v_j  +  [rc_i = 0] gamma^(i+1) q_i S
    S_next  = [rc_L-1 = 0] gamma^L S  +  sum_{j<L, rc_j=rc_L-1} gamma^(L-1-j) k_j^T v_j

Time O(T C (K + V) + T K V), memory O(T C H + (T / C) H K V): linear in T for a fixed chunk size.
Shapes and conventions as in :mod:`distill_dag.kernels.retention.reference`. Gradients come from autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_dag.kernels.retention.reference import RetentionInputs, RetentionOutput, retention_form


@retention_form
def retention_chunkwise(x: RetentionInputs, chunk_size: int = 64) -> RetentionOutput:
    """Chunkwise retention (shapes in :mod:`~distill_dag.kernels.retention.reference`). Returns
    (o [B, T, H, V] in v's dtype, final state fp32 or None)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H, K, V = x.dims()
    q, reset, initial_state = x.q, x.reset, x.initial_state
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    qf, kf, vf, g = x.in_compute_dtype()
    dt = qf.dtype
    # Padding at the end is causal-safe for the outputs; the last chunk's true length fixes the final state.
    qf = F.pad(qf, (0, 0, 0, 0, 0, pad)).view(B, N, C, H, K)
    kf = F.pad(kf, (0, 0, 0, 0, 0, pad)).view(B, N, C, H, K)
    vf = F.pad(vf, (0, 0, 0, 0, 0, pad)).view(B, N, C, H, V)
    if reset is None:
        rc = torch.zeros(B, N, C, dtype=torch.long, device=q.device)
    else:
        rc = torch.cumsum(F.pad(reset.to(torch.long), (0, pad)).view(B, N, C), dim=-1)  # [B, N, C]

    i = torch.arange(C, device=q.device)
    diff = i[:, None] - i[None, :]
    keep = (diff >= 0)[None, None] & (rc[..., :, None] == rc[..., None, :])  # [B, N, C, C]
    decay = torch.exp(g[:, None, None] * diff.clamp(min=0).to(dt))  # [H, C, C]
    scores = torch.einsum("bnihk,bnjhk->bnhij", qf, kf) * decay[None, None] * keep[:, :, None].to(dt)
    o = torch.einsum("bnhij,bnjhv->bnihv", scores, vf)

    # state contribution of each chunk: U_n = sum_j w_j k_j^T v_j
    lengths = torch.full((N,), C, device=q.device, dtype=torch.long)
    lengths[-1] = C - pad
    expo = (lengths[:, None] - 1 - i[None, :]).clamp(min=0)  # [N, C]
    valid = i[None, :] < lengths[:, None]
    wk = torch.exp(g[None, None, :] * expo[..., None].to(dt)) * valid[..., None].to(dt)  # [N, C, H]
    wk = wk[None] * (rc == rc[..., -1:])[..., None].to(dt)  # [B, N, C, H]
    U = torch.einsum("bnjhk,bnjhv->bnhkv", kf * wk[..., None], vf)
    carry = torch.exp(g[None, None, :] * lengths[None, :, None].to(dt)) * (rc[..., -1] == 0)[..., None].to(dt)

    # sequential scan over chunks (N = T / C steps of elementwise work)
    state = initial_state.to(dt) if initial_state is not None else torch.zeros(B, H, K, V, dtype=dt, device=q.device)
    entering = []
    for n in range(N):
        entering.append(state)
        state = carry[:, n, :, None, None] * state + U[:, n]
    states = torch.stack(entering, dim=1)  # [B, N, H, K, V]

    wq = torch.exp(g[None, :] * (i[:, None] + 1).to(dt))[None, None] * (rc == 0)[..., None].to(dt)  # [B, N, C, H]
    o = o + torch.einsum("bnihk,bnhkv->bnihv", qf * wq[..., None], states)
    o = o.reshape(B, N * C, H, V)[:, :T]
    final = state.to(torch.promote_types(dt, torch.float32)) if x.output_final_state else None
    return o.to(x.v.dtype), final
