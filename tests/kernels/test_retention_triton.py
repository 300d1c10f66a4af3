"""The Triton chunkwise retention kernel (forward and backward) against the parallel reference.

CPU: Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels at small shapes. The variable is read
when triton decorates the kernels, so the cases run in one subprocess that sets it before importing triton.
GPU (``-m gpu``, on the device machine): the compiled kernels, the same cases plus bf16 and model-sized
shapes, and flash-linear-attention's ``chunk_retention`` when installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# (name, B, T, H, K, V, chunk_size, resets, initial_state)
CASES = [
    ("resets_state_multichunk", 2, 45, 2, 16, 32, 16, True, True),
    ("ragged_tail_no_resets", 1, 33, 1, 16, 16, 16, False, False),
    ("multi_block_non_pow2_dims", 1, 40, 2, 40, 80, 16, True, True),
    ("single_token", 2, 1, 2, 16, 16, 16, True, True),
    ("chunk_32_reset_at_chunk_border", 1, 70, 1, 32, 16, 32, True, False),
]


def run_case(case, device="cpu", dtype=torch.float32):
    """Outputs and gradients of the Triton kernel and of the parallel reference (fp32 math) on one case."""
    from distill_dag.kernels.retention import decay_log_gammas, retention_parallel
    from distill_dag.kernels.retention.triton_chunk import retention_chunkwise_triton

    name, B, T, H, K, V, C, resets, state = case
    g = torch.Generator().manual_seed(len(name) * 31 + T)
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, V))
    h0 = torch.randn(B, H, K, V, generator=g) if state else None
    reset = None
    if resets:
        reset = torch.zeros(B, T, dtype=torch.bool)
        reset[:, torch.randint(0, T, (3,), generator=g)] = True
        if T > C:
            reset[0, C] = True  # a document starting exactly at a chunk border
    do = torch.randn(B, T, H, V, generator=g)
    dS = torch.randn(B, H, K, V, generator=g)
    log_decay = decay_log_gammas(H)

    def run(fn, cast, **kw):
        # fresh leaves per run (``.to`` may return the same tensor, whose .grad would then be shared)
        leaves = [x.to(device=device, dtype=cast).clone().requires_grad_(True) for x in (q, k, v)]
        h = h0.to(device).clone().requires_grad_(True) if h0 is not None else None
        r = reset.to(device) if reset is not None else None
        o, S = fn(*leaves, log_decay.to(device), r, h, True, **kw)
        ((o.float() * do.to(device)).sum() + (S * dS.to(device)).sum()).backward()
        grads = [x.grad for x in leaves] + ([h.grad] if h is not None else [])
        return [t.detach().float().cpu().clone() for t in [o, S, *grads]]

    got = run(retention_chunkwise_triton, dtype, chunk_size=C)
    # reference sees the same (possibly bf16-rounded) inputs, computes in fp32
    ref = run(lambda *a, **kw: retention_parallel(*[x.float() for x in a[:3]], *a[3:]), dtype)
    names = ["o", "state", "dq", "dk", "dv", "dh0"]
    return {n: ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for n, a, b in zip(names, got, ref)}


@pytest.fixture(scope="module")
def interpreted_errors():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_kernel_matches_reference_in_interpreter(interpreted_errors, case):
    errs = interpreted_errors["fp32"][case[0]]
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("case", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_triton_kernel_half_precision_operands_in_interpreter(interpreted_errors, case):
    # fp16 operands in the dots, fp32 accumulation and states (the interpreter's bf16 dot is broken:
    # numpy has no bfloat16, so bf16 is checked on the GPU only)
    errs = interpreted_errors["fp16"][case[0]]
    assert max(errs.values()) < 2e-3, errs


# ---------------------------------------------------------------------------------------------
# GPU (device machine): compiled kernels
# ---------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU_CASES = CASES + [
    ("model_500M_heads", 2, 1000, 10, 128, 256, 64, True, True),
    ("model_tiny_heads_long", 1, 4100, 4, 32, 64, 64, True, False),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_triton_kernel_matches_reference_on_gpu_fp32(case):
    errs = run_case(case, device="cuda", dtype=torch.float32)
    assert max(errs.values()) < 1e-4, errs  # compiled fp32 dots may reorder sums; TF32 stays off


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES[:3] + GPU_CASES[-2:], ids=[c[0] for c in GPU_CASES[:3] + GPU_CASES[-2:]])
def test_triton_kernel_matches_reference_on_gpu_bf16(case):
    errs = run_case(case, device="cuda", dtype=torch.bfloat16)
    assert max(errs.values()) < 3e-2, errs  # bf16 operands in the dots, fp32 accumulation


@pytest.mark.gpu
@needs_cuda
def test_model_triton_backend_matches_torch_backend_on_gpu():
    from distill_dag.model.retnet import RetNetForCausalLM
    from distill_dag.model.variants import student_config

    torch.manual_seed(0)
    cfg = student_config("tiny", 512, retention_backend="torch", chunk_size=64)
    model = RetNetForCausalLM(cfg).cuda()
    ids = torch.randint(0, 512, (2, 300), device="cuda")
    pos = torch.cat([torch.arange(120), torch.arange(180)]).expand(2, -1).cuda()
    out = {}
    for backend in ("torch", "triton"):
        model.config.retention_backend = backend
        model.zero_grad()
        loss = model(ids, position_ids=pos, labels=ids).loss
        loss.backward()
        out[backend] = (loss.item(), model.model.layers[0].retention.q_proj.weight.grad.clone())
    assert abs(out["torch"][0] - out["triton"][0]) < 1e-4
    a, b = out["triton"][1], out["torch"][1]
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-3


@pytest.mark.gpu
@needs_cuda
def test_fla_chunk_retention_matches_reference_on_gpu():
    pytest.importorskip("fla")
    from distill_dag.kernels.retention import decay_log_gammas, retention, retention_parallel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 300, 4, d, generator=g).cuda() for d in (64, 64, 128))
    reset = torch.zeros(1, 300, dtype=torch.bool, device="cuda")
    reset[0, [0, 77, 200]] = True
    o, _ = retention(q, k, v, decay_log_gammas(4).cuda(), reset, backend="fla")
    o_ref, _ = retention_parallel(q, k, v, decay_log_gammas(4).cuda(), reset)
    assert ((o.float() - o_ref).abs().max() / o_ref.abs().max()).item() < 1e-2


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1 set by the fixture)
    assert os.environ.get("TRITON_INTERPRET") == "1"
    fp32 = {c[0]: run_case(c) for c in CASES}
    fp16 = {c[0]: run_case(c, dtype=torch.float16) for c in CASES[:3]}
    print(json.dumps({"fp32": fp32, "fp16": fp16}))
