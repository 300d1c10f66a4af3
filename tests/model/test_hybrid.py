"""Hybrid RetNet students: softmax attention layers beside retention (config.layer_types)."""

import pytest
import torch

from distill_dag.model.retnet import RetNetCache, RetNetConfig, RetNetForCausalLM


def _hybrid(types, window=None, kv=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = RetNetConfig(vocab_size=97, hidden_size=32, num_hidden_layers=len(types), num_attention_heads=4,
                       num_key_value_heads=kv, intermediate_size=64, layer_types=types, attention_window=window,
                       chunk_size=8, **kw)
    return RetNetForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("window", [None, 5])
def test_hybrid_generation_step_by_step_equals_full_forward_past_the_window(window):
    kind = "sliding_attention" if window else "full_attention"
    model = _hybrid(["linear_attention", kind, "linear_attention"], window=window)
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = RetNetCache(model.config)
        steps = [model(ids[:, :7], cache=cache, use_cache=True).logits]  # a prefill, then one token at a time
        for t in range(7, 23):
            steps.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    if window:  # the rolling buffer holds at most the window
        assert cache.layers[1].keys.shape[-2] == window


def test_hybrid_generate_equals_greedy_argmax_of_full_forward():
    model = _hybrid(["full_attention", "linear_attention"])
    prompt = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        ref = prompt
        for _ in range(12):
            nxt = model(ref, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("window", [None, 6])
def test_attention_layers_never_cross_a_packed_document_boundary(window):
    kind = "sliding_attention" if window else "full_attention"
    model = _hybrid([kind, "linear_attention", kind], window=window)
    a, b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(11), torch.arange(9)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=pos, use_cache=False).logits
        alone_a = model(a, use_cache=False).logits
        alone_b = model(b, use_cache=False).logits
    torch.testing.assert_close(together[:, :11], alone_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together[:, 11:], alone_b, rtol=1e-4, atol=1e-4)


def test_attention_layers_never_attend_into_padding():
    model = _hybrid(["full_attention", "linear_attention"])
    ids = torch.randint(0, 97, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = model(padded, attention_mask=mask, use_cache=False).logits[:, 4:]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_config_json_lists_layer_types_and_round_trips(tmp_path):
    model = _hybrid(["linear_attention", "sliding_attention"], window=4)
    model.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == ["linear_attention", "sliding_attention"]
    assert saved["attention_window"] == 4
    back = RetNetForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("bad, msg", [
    (dict(layer_types=["linear_attention"]), "one per layer"),
    (dict(layer_types=["linear_attention", "conv"]), "conv"),
    (dict(layer_types=["linear_attention", "sliding_attention"]), "attention_window"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_bad_layer_types_are_refused_naming_the_field(bad, msg):
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=msg):
        RetNetConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **bad)


@pytest.mark.parametrize("types", [["linear_attention", "linear_attention"], ["linear_attention", "full_attention"]])
def test_retention_window_generation_equals_full_forward_past_the_window(types):
    model = _hybrid(types, retention_window=4)
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = RetNetCache(model.config)
        steps = [model(ids[:, :6], cache=cache, use_cache=True).logits]
        for t in range(6, 19):
            steps.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.layers[0].window_kv.keys.shape[-2] == 4  # a rolling buffer beside the fixed-size state


def test_retention_window_keeps_documents_and_padding_apart():
    model = _hybrid(["linear_attention", "linear_attention"], retention_window=6)
    a, b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 9))
    pos = torch.cat([torch.arange(11), torch.arange(9)])[None]
    with torch.no_grad():
        together = model(torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(together[:, :11], model(a, use_cache=False).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together[:, 11:], model(b, use_cache=False).logits, rtol=1e-4, atol=1e-4)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
        torch.testing.assert_close(model(padded, attention_mask=mask, use_cache=False).logits[:, 3:],
                                   model(b, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_retention_window_branch_is_softmax_attention_over_the_window():
    # with the gate at zero the retention branch vanishes (silu(0) = 0): the layer is o_proj(SWA(q, k, v)),
    # which an independent reference computes with an explicit loop over the window
    model = _hybrid(["linear_attention"], retention_window=3, kv=None)
    r = model.model.layers[0].retention
    with torch.no_grad():
        r.g_proj.weight.zero_()
    x = torch.randn(1, 7, 32)
    pos = torch.arange(7)[None]
    with torch.no_grad():
        got = r(x, pos, None, None, None)
        from distill_dag.model.retnet import rotate

        H, K, Vh = r.num_heads, r.key_dim, r.head_value_dim
        q = rotate(r.q_proj(x).view(1, 7, H, K), pos, model.config.rope_theta)
        k = rotate(r.k_proj(x).view(1, 7, H, K), pos, model.config.rope_theta)
        v = r.v_proj(x).view(1, 7, H, Vh)
        rows = []
        for t in range(7):
            lo = max(0, t - 2)
            w = torch.softmax(torch.einsum("hk,shk->hs", q[0, t], k[0, lo:t + 1]) / K**0.5, -1)
            rows.append(torch.einsum("hs,shv->hv", w, v[0, lo:t + 1]).reshape(-1))
        want = r.o_proj(torch.stack(rows)[None])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
