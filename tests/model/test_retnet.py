"""RetNet student: forms agree at model level, documents stay apart, padding is inert, HF round-trip and
generation with a constant-size recurrent state, loss convention, checkpointing, autocast, variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import distill_dag  # noqa: F401  (registers the Auto classes)
from distill_dag.model.retnet import RetNetCache, RetNetForCausalLM, causal_lm_loss
from distill_dag.model.variants import VARIANTS, count_parameters, student_config

VOCAB = 97
RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def tiny(seed: int = 0, **overrides) -> RetNetForCausalLM:
    torch.manual_seed(seed)
    overrides.setdefault("chunk_size", 16)
    model = RetNetForCausalLM(student_config("tiny", VOCAB, **overrides))
    # random norm affines so the test covers them too (init leaves them at 1 / 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, mode, x, **kw):
    model.config.retention_mode = mode
    model.zero_grad()
    out = model(x, **kw)
    w = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(7))
    (out.logits * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("T", [5, 16, 41, 80])
def test_chunkwise_matches_parallel_logits_and_grads(T):
    model = tiny()
    x = ids(2, T)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, : T // 3] = 0  # left padding on one row
    ref, gref = logits_and_grads(model, "parallel", x, attention_mask=mask)
    got, ggot = logits_and_grads(model, "chunkwise", x, attention_mask=mask)
    assert rel_err(got, ref) < RTOL
    for n in gref:
        assert rel_err(ggot[n], gref[n]) < RTOL, n


def test_recurrent_form_matches_parallel_logits_and_grads():
    model = tiny()
    x = ids(2, 29)
    pos = torch.cat([torch.arange(10), torch.arange(19)]).expand(2, -1)
    ref, gref = logits_and_grads(model, "parallel", x, position_ids=pos)
    got, ggot = logits_and_grads(model, "recurrent", x, position_ids=pos)
    assert rel_err(got, ref) < RTOL
    for n in gref:
        assert rel_err(ggot[n], gref[n]) < RTOL, n


def test_token_by_token_decoding_with_cache_matches_parallel():
    model = tiny().eval()
    model.config.retention_mode = "parallel"
    x = ids(2, 33)
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
        model.config.retention_mode = "chunkwise"
        cache = RetNetCache(model.config)
        prefix = model(x[:, :20], cache=cache, use_cache=True).logits  # chunkwise prefill
        steps = [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(20, 33)]
    got = torch.cat([prefix] + steps, dim=1)
    assert rel_err(got, ref) < RTOL


@pytest.mark.parametrize("mode", ["chunkwise", "parallel", "recurrent"])
def test_packed_row_equals_documents_run_one_by_one(mode):
    model = tiny().eval()
    model.config.retention_mode = mode
    lengths = [7, 20, 1, 13]  # not multiples of the chunk size; a one-token document
    docs = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    row = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model.model(row, position_ids=pos).last_hidden_state
        start = 0
        for d, n in zip(docs, lengths):
            alone = model.model(d).last_hidden_state
            assert rel_err(packed[:, start : start + n], alone) < RTOL
            start += n


def test_document_continued_from_previous_row_keeps_its_positions():
    # a row that starts mid-document (positions 300..) and then starts a new document at position 0
    model = tiny().eval()
    a, b = ids(1, 12, seed=3), ids(1, 9, seed=4)
    pos = torch.cat([torch.arange(300, 312), torch.arange(9)])[None]
    with torch.no_grad():
        packed = model.model(torch.cat([a, b], 1), position_ids=pos).last_hidden_state
        alone_b = model.model(b).last_hidden_state
        # rotation is relative: the same document at positions 0.. gives the same states
        alone_a = model.model(a).last_hidden_state
    assert rel_err(packed[:, 12:], alone_b) < RTOL
    assert rel_err(packed[:, :12], alone_a) < 1e-4


def test_padding_does_not_change_real_tokens():
    model = tiny().eval()
    x = ids(1, 15)
    with torch.no_grad():
        ref = model(x).logits
        right = model(F.pad(x, (0, 6)), attention_mask=F.pad(torch.ones_like(x), (0, 6))).logits[:, :15]
        left = model(F.pad(x, (6, 0)), attention_mask=F.pad(torch.ones_like(x), (6, 0))).logits[:, 6:]
    assert rel_err(right, ref) < RTOL
    assert rel_err(left, ref) < RTOL


def test_labels_loss_is_mean_ce_with_one_shift():
    model = tiny()
    x = ids(2, 12)
    labels = x.clone()
    labels[0, :4] = -100
    labels[1, 9] = -100
    out = model(x, labels=labels)
    logp = out.logits.log_softmax(-1)
    terms = [
        -logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(11) if labels[b, t + 1] != -100
    ]
    assert torch.allclose(out.loss, torch.stack(terms).mean(), rtol=1e-6)
    assert causal_lm_loss(out.logits, torch.full_like(labels, -100)).item() == 0.0


def test_base_model_returns_last_hidden_state_and_head_is_tied():
    model = tiny()
    x = ids(2, 9)
    h = model.model(x, attention_mask=torch.ones_like(x)).last_hidden_state
    assert h.shape == (2, 9, 128)
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (VOCAB, 128)
    assert head.weight is model.get_input_embeddings().weight
    assert torch.allclose(head(h), model(x).logits)
    untied = RetNetForCausalLM(student_config("tiny", VOCAB, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_save_pretrained_round_trips_through_auto_model(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny().eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "retnet"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RetNetForCausalLM
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = ids(2, 21)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def greedy_without_cache(model, x, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = model(x, use_cache=False).logits[:, -1].argmax(-1)
        x = torch.cat([x, nxt[:, None]], 1)
    return x


def test_generate_carries_recurrent_state_and_matches_full_recompute():
    model = tiny(seed=2).eval()
    x = ids(2, 18)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy_without_cache(model, x, 10))
    cache = out.cache
    assert isinstance(cache, RetNetCache)
    H, K, Vh = 4, 32, 64
    for layer in cache.layers:
        assert layer.recurrent_states[0].shape == (2, H, K, Vh)  # no sequence dimension


def test_generation_state_size_does_not_grow_with_context():
    model = tiny().eval()
    sizes = []
    for T in (8, 200):
        cache = RetNetCache(model.config)
        with torch.no_grad():
            model(ids(1, T), cache=cache, use_cache=True)
            model(ids(1, 1), cache=cache, use_cache=True)
        sizes.append(sum(l.recurrent_states[0].numel() for l in cache.layers))
    assert sizes[0] == sizes[1]


def test_generate_with_left_padding_matches_unpadded_rows():
    model = tiny(seed=5).eval()
    a, b = ids(1, 14, seed=8), ids(1, 9, seed=9)
    batch = torch.cat([a, F.pad(b, (5, 0))], 0)
    mask = torch.cat([torch.ones(1, 14), F.pad(torch.ones(1, 9), (5, 0))], 0).long()
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone_b = model.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], greedy_without_cache(model, a, 6)[0])
    assert torch.equal(out[1, 5:], alone_b[0])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny()
    x = ids(2, 30)
    ref, gref = logits_and_grads(model, "chunkwise", x)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    got, ggot = logits_and_grads(model, "chunkwise", x)
    assert rel_err(got, ref) < RTOL
    for n in gref:
        assert rel_err(ggot[n], gref[n]) < RTOL, n


def test_bf16_autocast_is_finite_and_close_to_fp32():
    model = tiny()
    x = ids(2, 40)
    ref = model(x, labels=x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert abs(out.loss.item() - ref.item()) < 0.05
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_variants_have_the_parameter_counts_their_names_say():
    for name, target in [("350M", 350e6), ("500M", 500e6)]:
        cfg = student_config(name, 128256)
        counts = count_parameters(cfg)
        assert abs(counts["total"] - target) / target < 0.02, (name, counts["total"])
        assert cfg.head_dim <= 128 and cfg.tie_word_embeddings and counts["lm_head"] == 0
        d, L, f, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, 128256
        # independent count: 8 d^2 retention + 3 d f FFN + norms (2 RMS of d, group norm weight+bias of 2d)
        analytic = V * d + L * (8 * d * d + 3 * d * f + 2 * d + 4 * d) + d
        assert counts["total"] == analytic
    assert set(VARIANTS) == {"tiny", "350M", "500M"}
    with pytest.raises(ValueError, match="unknown student variant"):
        student_config("1B", 100)
    with pytest.raises(ValueError, match="num_layers"):
        student_config("tiny", 100, num_layers=3)


def test_tiny_student_learns_on_cpu():
    model = tiny(seed=3)
    x = ids(2, 48, seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(x, labels=x).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # starts at chance (ln V) and memorises the two rows
    assert abs(losses[0] - math.log(VOCAB)) < 0.5 and losses[-1] < 0.5


def test_model_info_cli_prints_parameter_counts(capsys):
    from distill_dag.cli import main

    assert main(["model-info", "--variant", "500M"]) == 0
    out = capsys.readouterr().out
    assert "500M" in out and "499,836,160" in out
