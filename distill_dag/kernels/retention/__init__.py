"""Retention kernels, one family with the same signature in every form (flash-linear-attention's layout).

- :func:`retention_parallel`, :func:`retention_recurrent`, :func:`retention_step` (reference.py): plain
  PyTorch, O(T^2) / token-by-token; the references everything is tested against.
- :func:`retention_chunkwise` (chunk.py): PyTorch chunkwise, O(T); the CPU training path.
- ``retention_chunkwise_triton`` (triton_chunk.py): Triton forward + backward, the CUDA training path.
- :func:`retention`: the dispatcher the model calls.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H]; reset [B, T] bool (document starts) or None;
initial_state [B, H, K, V] or None. Every form returns (o [B, T, H, V], final_state [B, H, K, V] or None).
"""

from __future__ import annotations

import importlib.util

import torch

from distill_dag.kernels.retention.chunk import retention_chunkwise
from distill_dag.kernels.retention.reference import (
    RetentionInputs,
    RetentionOutput,
    decay_log_gammas,
    retention_parallel,
    retention_form,
    retention_recurrent,
    retention_step,
)

BACKENDS = ("auto", "torch", "triton", "fla", "parallel", "recurrent")

__all__ = [
    "BACKENDS",
    "decay_log_gammas",
    "resolve_backend",
    "retention",
    "retention_chunkwise",
    "retention_parallel",
    "retention_recurrent",
    "retention_step",
]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA when triton is importable, else ``torch`` (PyTorch chunkwise)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown retention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return "triton"
        return "torch"
    return backend


@retention_form
def retention(x: RetentionInputs, chunk_size: int = 64, backend: str = "auto") -> RetentionOutput:
    """Retention ``o_t = q_t S_t``, ``S_t = a_t S_{t-1} + k_t^T v_t`` (a_t = gamma_h, 0 at a reset) by the
    chosen backend. Shapes in the module docstring."""
    which = resolve_backend(backend, x.q.device)
    if which == "torch":
        return retention_chunkwise(*x, chunk_size)
    if which == "triton":
        from distill_dag.kernels.retention.triton_chunk import retention_chunkwise_triton  # lazy: triton is optional

        return retention_chunkwise_triton(*x, chunk_size)
    if which == "fla":
        return _retention_fla(x)
    if which == "parallel":
        return retention_parallel(*x)
    return retention_recurrent(*x)


def _retention_fla(x: RetentionInputs) -> RetentionOutput:
    """flash-linear-attention's ``chunk_retention`` (CUDA only). Its decays are fixed to 1 - 2^(-5-h); documents
    inside rows become its variable-length format (one flattened row, ``cu_seqlens`` at every start)."""
    from fla.ops.retention import chunk_retention

    q, k, v, log_decay, reset, initial_state, output_final_state = x
    B, T, H, _ = q.shape
    if not torch.allclose(log_decay.float().cpu(), decay_log_gammas(H)):
        raise ValueError("backend 'fla' only supports the decays gamma_h = 1 - 2^(-5-h); use backend 'triton'")
    if reset is None or not bool(reset[:, 1:].any()):
        return chunk_retention(q, k, v, scale=1.0, initial_state=initial_state, output_final_state=output_final_state)
    if initial_state is not None or output_final_state:
        raise ValueError("backend 'fla' with document resets supports neither initial_state nor output_final_state")
    starts = reset.clone()
    starts[:, 0] = True
    cu = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([cu, cu.new_tensor([B * T])])
    flat = lambda x: x.reshape(1, B * T, H, x.shape[-1])  # noqa: E731
    o, _ = chunk_retention(flat(q), flat(k), flat(v), scale=1.0, cu_seqlens=cu)
    return o.reshape(B, T, H, v.shape[-1]), None
