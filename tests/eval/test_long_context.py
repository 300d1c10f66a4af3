"""Long-context evaluation: NLL by context length and position, generation memory and ms/token.

The property RetNet is for: the student's recurrent state does not grow with the context, a Llama's
KV cache does (linearly)."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill_dag.eval.long_context import (
    bucket_edges,
    cache_bytes,
    generation_cost,
    long_context_perplexity,
    markdown,
    plot_long_context,
)
from support import tiny_llama

VOCAB = 96


def _student():
    from distill_dag.model.retnet import RetNetForCausalLM
    from distill_dag.model.variants import student_config

    torch.manual_seed(0)
    return RetNetForCausalLM(student_config("tiny", VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64)).eval()


@pytest.fixture(scope="module")
def models():
    return {"student": _student(), "teacher": tiny_llama(VOCAB, seed=1).eval()}


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (3000,), generator=g).tolist()


def test_student_state_is_flat_and_teacher_kv_cache_grows_linearly(models, stream):
    st = generation_cost(models["student"], stream, [32, 64, 128], new_tokens=3)
    te = generation_cost(models["teacher"], stream, [32, 64, 128], new_tokens=3)
    assert len({r["cache_bytes"] for r in st}) == 1 and st[0]["cache_bytes"] == st[0]["cache_bytes_end"] > 0
    kv = [r["cache_bytes"] for r in te]
    assert kv[1] == 2 * kv[0] and kv[2] == 4 * kv[0]  # K and V of every position
    assert te[0]["cache_bytes_end"] > te[0]["cache_bytes"]  # decoding appends to the cache
    assert all(r["ms_per_token"] > 0 and r["prefill_ms"] > 0 for r in st + te)


def test_cache_bytes_counts_each_tensor_once():
    t = torch.zeros(10, dtype=torch.float32)
    assert cache_bytes({"a": t, "b": [t, (t,)], "c": torch.zeros(3, dtype=torch.int64)}) == 40 + 24


def test_nll_by_length_is_the_once_shifted_ce_of_each_window(models, stream):
    r = long_context_perplexity(models, stream, 32, multiples=(1, 2, 4), contexts=2)
    assert r["lengths"] == [32, 64, 128] and r["bucket_edges"] == [0, 16, 32, 64, 128]
    x = torch.tensor(stream[:64]).view(2, 32)  # the two 1x windows: consecutive tokens
    for name, m in models.items():
        with torch.no_grad():
            logits = m(input_ids=x, position_ids=torch.arange(32)[None].expand(2, 32), use_cache=False).logits
        want = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1)).item()
        assert r["by_length"][name][0] == pytest.approx(want, rel=1e-5)
        assert len(r["by_position"][name]) == 4 and all(math.isfinite(v) for v in r["by_position"][name])


def test_bucket_edges_double_past_the_training_length():
    assert bucket_edges(256, 2048) == [0, 128, 256, 512, 1024, 2048]


def test_plot_and_tables_name_every_model(tmp_path, models, stream):
    r = long_context_perplexity(models, stream, 16, multiples=(1, 2), contexts=1)
    cost = {n: generation_cost(m, stream, [16, 32], new_tokens=2) for n, m in models.items()}
    png = plot_long_context(r, cost, tmp_path / "lc.png")
    assert png.stat().st_size > 5000
    md = markdown(r, cost)
    assert "| student |" in md and "| teacher |" in md and "32 (2x)" in md and "ms" in md
