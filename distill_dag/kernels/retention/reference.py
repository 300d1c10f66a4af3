"""Retention in its parallel and recurrent forms: plain PyTorch, the reference for every fast path.

Retention of one head (Sun et al. 2023, eq. 5-6), with document boundaries inside a row::

    S_t = a_t * S_{t-1} + k_t^T v_t          a_t = gamma_h, or 0 where a document starts (reset_t)
    o_t = q_t S_t

so the parallel form is ``o = ((q k^T) * D) v`` with ``D[n, m] = gamma^(n-m)`` for ``m <= n`` in the same
document and 0 elsewhere. Shapes, shared by every form in this package:

- ``q``, ``k``: [B, T, H, K]; ``v``: [B, T, H, V] (the layout a linear layer produces, no transposes)
- ``log_decay``: [H], ``log(gamma_h)`` (negative)
- ``reset``: [B, T] bool, True where a document starts (position_ids == 0); None = one document per row
- ``initial_state``: [B, H, K, V], the state before token 0 (generation continuing a prompt); None = zeros
- returns ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32 or None)``

Scaling of q or k (e.g. K^-0.5) is the caller's business. Math runs in float32 (float64 stays float64),
whatever the input dtype, so the references are what fp32 results are checked against.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple

import torch

RetentionOutput = tuple[torch.Tensor, torch.Tensor | None]  # (o, final_state or None)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class RetentionInputs(NamedTuple):
    """The arguments every retention form takes, in this order (shapes in the module docstring)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_decay: torch.Tensor
    reset: torch.Tensor | None = None
    initial_state: torch.Tensor | None = None
    output_final_state: bool = False

    def dims(self) -> tuple[int, int, int, int, int]:
        """(B, T, H, K, V)."""
        B, T, H, K = self.q.shape
        return B, T, H, K, self.v.shape[-1]

    def in_compute_dtype(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v and log_decay (on q's device) in the math dtype: float32, or float64 for float64 inputs."""
        dt = _compute_dtype(self.q)
        return self.q.to(dt), self.k.to(dt), self.v.to(dt), self.log_decay.to(device=self.q.device, dtype=dt)


def retention_form(body: Callable[..., RetentionOutput]) -> Callable[..., RetentionOutput]:
    """The family's signature, written once: ``body(inputs: RetentionInputs, *options)`` becomes
    ``form(q, k, v, log_decay, reset=None, initial_state=None, output_final_state=False, *options)``
    (the fields of :class:`RetentionInputs`, then the body's own options such as ``chunk_size``)."""

    @functools.wraps(body)
    def form(q, k, v, log_decay, reset=None, initial_state=None, output_final_state=False, *options, **kw_options):
        inputs = RetentionInputs(q, k, v, log_decay, reset, initial_state, output_final_state)
        return body(inputs, *options, **kw_options)

    fields = [  # help() and inspect show the signature the caller uses
        inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=getattr(hint, "__forward_arg__", hint),
            default=RetentionInputs._field_defaults.get(name, inspect.Parameter.empty),
        )
        for name, hint in RetentionInputs.__annotations__.items()
    ]
    own = inspect.signature(body)
    form.__signature__ = own.replace(parameters=fields + list(own.parameters.values())[1:])
    return form


def decay_log_gammas(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``log(gamma_h)`` with ``gamma_h = 1 - 2^(-5-h)``, h = 0..H-1 (the paper's multi-scale decays); [H] float32."""
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(torch.float32)


@retention_form
def retention_parallel(x: RetentionInputs) -> RetentionOutput:
    """Parallel form: builds the [B, H, T, T] decay mask, O(T^2) time and memory. See module doc for shapes."""
    B, T, H, _, _ = x.dims()
    qf, kf, vf, g = x.in_compute_dtype()
    dt = qf.dtype
    q, reset, initial_state = x.q, x.reset, x.initial_state
    seg = _segments(reset, B, T, q.device)  # [B, T] document index inside the row
    idx = torch.arange(T, device=q.device)
    diff = idx[:, None] - idx[None, :]  # n - m
    keep = (diff >= 0)[None] & (seg[:, :, None] == seg[:, None, :])  # [B, T, T]
    decay = torch.exp(g[:, None, None] * diff.clamp(min=0).to(dt))  # [H, T, T]
    mask = decay[None] * keep[:, None].to(dt)  # [B, H, T, T]
    scores = torch.einsum("bthk,bshk->bhts", qf, kf) * mask
    o = torch.einsum("bhts,bshv->bthv", scores, vf)
    first_doc = seg == 0  # positions that still see the initial state
    if initial_state is not None:
        w = torch.exp(g[None, :] * (idx[:, None] + 1).to(dt))  # [T, H]
        w = w[None] * first_doc[:, :, None].to(dt)  # [B, T, H]
        o = o + torch.einsum("bthk,bhkv->bthv", qf, initial_state.to(dt)) * w[..., None]
    final = None
    if x.output_final_state:
        wk = torch.exp(g[None, :] * (T - 1 - idx)[:, None].to(dt))  # [T, H]
        wk = wk[None] * (seg == seg[:, -1:])[:, :, None].to(dt)  # [B, T, H]
        final = torch.einsum("bshk,bshv->bhkv", kf * wk[..., None], vf)
        if initial_state is not None:
            carry = torch.exp(g * T)[None, :] * first_doc[:, -1:].to(dt)  # [B, H]
            final = final + carry[..., None, None] * initial_state.to(dt)
        final = final.to(torch.promote_types(dt, torch.float32))
    return o.to(x.v.dtype), final


def retention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor | None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step (generation). q, k [B, H, K]; v [B, H, V]; state [B, H, K, V] or None (zeros);
    reset [B] bool or None. Returns (o [B, H, V] in v's dtype, new state [B, H, K, V] float32)."""
    dt = _compute_dtype(q)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    a = torch.exp(log_decay.to(device=q.device, dtype=dt))[None, :].expand(q.shape[0], -1)  # [B, H]
    if reset is not None:
        a = a * (~reset.bool()).to(dt)[:, None]
    kv = kf[..., :, None] * vf[..., None, :]
    new = kv if state is None else a[..., None, None] * state.to(dt) + kv
    o = torch.einsum("bhk,bhkv->bhv", qf, new)
    return o.to(v.dtype), new


@retention_form
def retention_recurrent(x: RetentionInputs) -> RetentionOutput:
    """Recurrent form, token by token (O(T) time, O(1) state). See module doc for shapes."""
    q, k, v, log_decay, reset, initial_state, output_final_state = x
    T = q.shape[1]
    state = initial_state
    outs = []
    for t in range(T):
        r = reset[:, t] if reset is not None else None
        o_t, state = retention_step(q[:, t], k[:, t], v[:, t], log_decay, state, r)
        outs.append(o_t)
    o = torch.stack(outs, dim=1)
    return o, (state if output_final_state else None)


def _segments(reset: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """Document index of every position: cumulative count of resets, [B, T] long."""
    if reset is None:
        return torch.zeros(B, T, dtype=torch.long, device=device)
    return torch.cumsum(reset.to(torch.long), dim=1)
