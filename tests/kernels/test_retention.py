"""Retention forms agree: parallel (reference) == chunkwise == recurrent, outputs, final states and gradients.

The parallel reference itself is checked against the definition written as a double loop.
"""

from __future__ import annotations

import pytest
import torch

from distill_dag.kernels.retention import (
    decay_log_gammas,
    resolve_backend,
    retention,
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
)

RTOL = 1e-5  # relative to the largest magnitude of the reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def make_inputs(B=2, T=37, H=3, K=8, V=16, seed=0, dtype=torch.float32, resets=True, state=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True)  # noqa: E731
    q, k, v = mk(B, T, H, K), mk(B, T, H, K), mk(B, T, H, V)
    h0 = mk(B, H, K, V) if state else None
    reset = None
    if resets:
        reset = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):  # a few document starts at random places, some at chunk borders
            idx = torch.randint(0, T, (3,), generator=g)
            reset[b, idx] = True
    return q, k, v, h0, reset


def outputs_and_grads(fn, q, k, v, h0, reset, seed=1, **kw):
    """Run a form, backprop a random cotangent through o and the final state, return [o, S, dq, dk, dv, dh0]."""
    H = q.shape[2]
    tensors = [x for x in (q, k, v, h0) if x is not None]
    for x in tensors:
        x.grad = None
    o, S = fn(q, k, v, decay_log_gammas(H), reset, h0, True, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + (
        S * torch.randn(S.shape, generator=g, dtype=S.dtype)
    ).sum()
    loss.backward()
    return [o.detach(), S.detach()] + [x.grad.clone() for x in tensors]


def test_parallel_reference_matches_definition_double_loop():
    # o_t = sum_{s<=t, same document} gamma^(t-s) (q_t.k_s) v_s + [no reset in 0..t] gamma^(t+1) q_t S0
    q, k, v, h0, reset = make_inputs(B=1, T=13, H=2, K=3, V=4, dtype=torch.float64)
    gam = decay_log_gammas(2).double().exp()
    o, _ = retention_parallel(q, k, v, decay_log_gammas(2), reset, h0)
    seg = reset.long().cumsum(1)[0]
    expect = torch.zeros_like(o)
    for t in range(13):
        for h in range(2):
            acc = torch.zeros(4, dtype=torch.float64)
            for s in range(t + 1):
                if seg[s] == seg[t]:
                    acc += gam[h] ** (t - s) * (q[0, t, h] @ k[0, s, h]) * v[0, s, h]
            if seg[t] == 0:
                acc += gam[h] ** (t + 1) * (q[0, t, h] @ h0[0, h])
            expect[0, t, h] = acc
    assert rel_err(o.detach(), expect.detach()) < 1e-12


def test_decays_are_one_minus_two_to_minus_five_minus_h():
    expect = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(12)], dtype=torch.float64)
    assert torch.allclose(decay_log_gammas(12).double().exp(), expect, rtol=1e-7, atol=0)


@pytest.mark.parametrize("T", [1, 16, 37, 64, 100])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunkwise_matches_parallel_outputs_and_grads(T, chunk_size):
    inputs = make_inputs(T=T, seed=T)
    ref = outputs_and_grads(retention_parallel, *inputs)
    got = outputs_and_grads(retention_chunkwise, *inputs, chunk_size=chunk_size)
    for name, a, b in zip(["o", "state", "dq", "dk", "dv", "dh0"], got, ref):
        assert rel_err(a, b) < RTOL, f"{name}: {rel_err(a, b)}"


@pytest.mark.parametrize("T", [1, 23, 50])
def test_recurrent_matches_parallel_outputs_and_grads(T):
    inputs = make_inputs(T=T, seed=100 + T)
    ref = outputs_and_grads(retention_parallel, *inputs)
    got = outputs_and_grads(retention_recurrent, *inputs)
    for name, a, b in zip(["o", "state", "dq", "dk", "dv", "dh0"], got, ref):
        assert rel_err(a, b) < RTOL, f"{name}: {rel_err(a, b)}"


def test_chunkwise_without_resets_or_state_matches_parallel():
    inputs = make_inputs(T=70, resets=False, state=False)
    q, k, v, _, _ = inputs
    o_ref, _ = retention_parallel(q, k, v, decay_log_gammas(3))
    o, S = retention_chunkwise(q, k, v, decay_log_gammas(3), chunk_size=16)
    assert S is None
    assert rel_err(o, o_ref) < RTOL


def test_final_state_continues_the_sequence():
    # running [0, 30) then [30, 61) from the carried state == running [0, 61) at once
    q, k, v, _, reset = make_inputs(T=61, state=False)
    g = decay_log_gammas(3)
    full, _ = retention_chunkwise(q, k, v, g, reset, chunk_size=16)
    a, S = retention_chunkwise(q[:, :30], k[:, :30], v[:, :30], g, reset[:, :30], None, True, chunk_size=16)
    b, _ = retention_chunkwise(q[:, 30:], k[:, 30:], v[:, 30:], g, reset[:, 30:], S, chunk_size=16)
    assert rel_err(torch.cat([a, b], 1), full) < RTOL


@pytest.mark.parametrize("fn", [retention_parallel, retention_chunkwise, retention_recurrent])
def test_packed_documents_do_not_see_each_other(fn):
    q, k, v, _, _ = make_inputs(B=1, T=45, state=False, resets=False)
    g = decay_log_gammas(3)
    starts = [0, 7, 30, 31]  # includes a one-token document
    reset = torch.zeros(1, 45, dtype=torch.bool)
    reset[0, starts] = True
    o, _ = fn(q, k, v, g, reset)
    for s, e in zip(starts, starts[1:] + [45]):
        alone, _ = retention_parallel(q[:, s:e], k[:, s:e], v[:, s:e], g)
        assert rel_err(o[:, s:e], alone) < RTOL


def test_dispatcher_uses_pytorch_chunkwise_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    q, k, v, h0, reset = make_inputs(T=20)
    o, S = retention(q, k, v, decay_log_gammas(3), reset, h0, True, chunk_size=8)
    o_ref, S_ref = retention_parallel(q, k, v, decay_log_gammas(3), reset, h0, True)
    assert rel_err(o, o_ref) < RTOL and rel_err(S, S_ref) < RTOL
    with pytest.raises(ValueError, match="unknown retention backend"):
        resolve_backend("cuda-magic", torch.device("cpu"))


def test_chunkwise_keeps_bf16_inputs_math_in_fp32():
    q, k, v, _, reset = make_inputs(T=40, state=False)
    qb, kb, vb = (x.detach().bfloat16() for x in (q, k, v))
    o, _ = retention_chunkwise(qb, kb, vb, decay_log_gammas(3), reset, chunk_size=16)
    o_ref, _ = retention_parallel(qb.float(), kb.float(), vb.float(), decay_log_gammas(3), reset)
    assert o.dtype == torch.bfloat16
    # only the final rounding to bf16 differs: the math ran on the same (bf16-valued) inputs in fp32
    assert rel_err(o.float(), o_ref) < 2**-7
