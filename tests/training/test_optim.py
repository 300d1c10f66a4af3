"""Optimizer split (Muon vs AdamW), state round trip, and the LR schedule."""

import copy
import io
import math
import re

import pytest
import torch
from support import tiny_llama
from torch import nn

from distill_dag.config import TrainConfig
from distill_dag.training.optim import build_optimizers, build_schedulers, make_lr_lambda, split_parameters

BLOCK_MATRIX = re.compile(r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight")


def _llama(tied: bool, seed: int = 0):
    return tiny_llama(97, seed, hidden_size=32, intermediate_size=64, tie_word_embeddings=tied).train()


class _Toy(nn.Module):
    """A RetNet-like toy: embedding, blocks with biased linears, a norm, a 2-D per-head decay, LM head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(16, 16), "out": nn.Linear(16, 16, bias=False), "norm": nn.LayerNorm(16)})
            for _ in range(2)
        )
        self.decay = nn.Parameter(torch.randn(4, 1))  # 2-D but not a weight matrix
        self.head = nn.Linear(16, 50, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b["norm"](x + b["out"](torch.tanh(b["proj"](x))) * self.decay.mean())
        return self.head(x)


def _cfg(**kw):
    base = dict(optimizer="muon", learning_rate=1e-2, muon_learning_rate=0.02, weight_decay=0.1,
                warmup_steps=3, max_steps=13, min_lr_ratio=0.1)
    base.update(kw)
    return TrainConfig(**base)


def _names(opt):
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    return ids


@pytest.mark.parametrize("tied", [False, True])
def test_muon_gets_exactly_the_block_matrices_of_a_llama(tied):
    model = _llama(tied)
    opts = build_optimizers(model, _cfg())
    assert opts.names == ["muon", "adamw"]
    by_id = {id(p): n for n, p in model.named_parameters()}
    muon_names = {by_id[i] for i in _names(opts.by_name("muon"))}
    expected = {n for n, _ in model.named_parameters() if BLOCK_MATRIX.fullmatch(n)}
    assert muon_names == expected and len(expected) == 14
    adam_names = {by_id[i] for i in _names(opts.by_name("adamw"))}
    assert "model.embed_tokens.weight" in adam_names
    if not tied:
        assert "lm_head.weight" in adam_names
    assert adam_names | muon_names == set(by_id.values()) and not adam_names & muon_names
    no_decay = next(g for g in opts.by_name("adamw").param_groups if g["group"] == "no_decay")
    assert {by_id[id(p)] for p in no_decay["params"]} == {n for n in by_id.values() if "norm" in n}
    assert no_decay["weight_decay"] == 0.0


def test_muon_never_moves_embedding_or_lm_head():
    model = _llama(tied=False)
    # AdamW frozen: only Muon can move anything (model_copy: the config itself refuses a zero LR)
    opts = build_optimizers(model, _cfg().model_copy(update={"learning_rate": 0.0}))
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 97, (2, 12))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opts.step()
        opts.zero_grad()
    after = model.state_dict()
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == bool(BLOCK_MATRIX.fullmatch(name)), name


def test_toy_retnet_like_model_split_and_plain_adamw_option():
    model = _Toy()
    groups = split_parameters(model)
    assert {n for n, _ in groups["muon"]} == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("proj", "out")}
    assert {n for n, _ in groups["no_decay"]} == {"decay"} | {
        f"blocks.{i}.{x}" for i in range(2) for x in ("proj.bias", "norm.weight", "norm.bias")
    }
    assert {n for n, _ in groups["decay"]} == {"embed.weight", "head.weight"}
    opts = build_optimizers(model, _cfg(optimizer="adamw"))
    assert opts.names == ["adamw"] and isinstance(opts[0], torch.optim.AdamW)
    decay = next(g for g in opts[0].param_groups if g["group"] == "decay")
    assert len(decay["params"]) == 6 and decay["weight_decay"] == 0.1


def _train(model, opts, scheds, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 97, (2, 10), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opts.step()
        opts.zero_grad()
        scheds.step()


def test_optimizer_and_scheduler_state_round_trip_continues_bitwise():
    cfg = _cfg()
    model = _llama(tied=False)
    opts = build_optimizers(model, cfg)
    scheds = build_schedulers(opts, cfg)
    _train(model, opts, scheds, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opts.state_dict(model), "sched": scheds.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert any("momentum_buffer" in s for s in ckpt["optim"]["muon"]["state"].values())
    assert any("exp_avg_sq" in s for s in ckpt["optim"]["adamw"]["state"].values())

    resumed = _llama(tied=False, seed=123)
    resumed.load_state_dict(ckpt["model"])
    ropts = build_optimizers(resumed, cfg)
    rscheds = build_schedulers(ropts, cfg)
    ropts.load_state_dict(ckpt["optim"], resumed)
    rscheds.load_state_dict(ckpt["sched"])
    _train(model, opts, scheds, 3, seed=2)
    _train(resumed, ropts, rscheds, 3, seed=2)
    for (n, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    assert scheds.get_last_lr() == rscheds.get_last_lr()


def test_load_refuses_a_different_optimizer_set():
    model = _llama(tied=True)
    state = build_optimizers(model, _cfg(optimizer="adamw")).state_dict(model)
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizers(model, _cfg()).load_state_dict(state, model)


def test_lr_schedule_is_warmup_then_cosine_to_min_ratio():
    cfg = _cfg(warmup_steps=4, max_steps=24, min_lr_ratio=0.1)
    f = make_lr_lambda(cfg)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(24) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 30))


def test_lr_multiplier_composes_with_the_schedule_at_every_step():
    cfg = _cfg(warmup_steps=2, max_steps=20, min_lr_ratio=0.1)
    boost = {5: 3.0, 6: 2.5, 7: 2.0, 8: 1.5}  # any step -> factor function
    model = _llama(tied=True)
    opts = build_optimizers(model, cfg)
    scheds = build_schedulers(opts, cfg, multiplier=lambda s: boost.get(s, 1.0))
    plain = make_lr_lambda(cfg)
    seen = []
    for s in range(12):
        seen.append(opts.by_name("adamw").param_groups[0]["lr"])
        assert opts.by_name("muon").param_groups[0]["lr"] == pytest.approx(
            cfg.muon_learning_rate * plain(s) * boost.get(s, 1.0))
        opts.step()
        scheds.step()
    assert seen == pytest.approx([cfg.learning_rate * plain(s) * boost.get(s, 1.0) for s in range(12)])


# ---- Muon's Newton-Schulz dtype ----------------------------------------------------------------
def _muon_reference(w0, grads, *, lr, wd, mom, nesterov, steps=5, coeffs=(3.4445, -4.7750, 2.0315)):
    """Muon written out from its definition (Keller Jordan's post, torch's docs), in float64."""
    a, b, c = coeffs
    w, buf = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64)
    for g in grads:
        g = g.double()
        buf = mom * buf + (1 - mom) * g
        u = (1 - mom) * g + mom * buf if nesterov else buf
        x = u.T if u.shape[0] > u.shape[1] else u
        x = x / max(x.norm().item(), 1e-7)
        for _ in range(steps):
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        o = x.T if u.shape[0] > u.shape[1] else x
        w = w * (1 - lr * wd) - lr * math.sqrt(max(1.0, w0.shape[0] / w0.shape[1])) * o
    return w


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_fp32_muon_is_the_muon_update_of_its_definition(shape, nesterov):
    from distill_dag.training.optim import Muon

    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(*shape, generator=g)
    grads = [torch.randn(*shape, generator=g) for _ in range(4)]
    p = nn.Parameter(w0.clone())
    opt = Muon([p], ns_dtype=torch.float32, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
    ref = _muon_reference(w0, grads, lr=0.02, wd=0.1, mom=0.9, nesterov=nesterov)
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-5)


def test_bf16_muon_is_torchs_step_bit_for_bit_and_fp32_stays_within_bf16_rounding_of_it():
    from distill_dag.training.optim import Muon

    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(32, 12, generator=g)
    grads = [torch.randn(32, 12, generator=g) for _ in range(3)]
    params = [nn.Parameter(w0.clone()) for _ in range(3)]
    opts = [torch.optim.Muon([params[0]], lr=0.02), Muon([params[1]], lr=0.02, ns_dtype=torch.bfloat16),
            Muon([params[2]], lr=0.02, ns_dtype=torch.float32)]
    for gr in grads:
        for p, o in zip(params, opts):
            p.grad = gr.clone()
            o.step()
    assert torch.equal(params[0], params[1])
    step_ref, step_fp32 = params[0].detach() - w0, params[2].detach() - w0
    assert (step_fp32 - step_ref).norm() / step_ref.norm() < 0.03  # bf16 keeps ~3 significant digits
    assert opts[2].state_dict()["state"][0].keys() == opts[0].state_dict()["state"][0].keys()
    opts[0].load_state_dict(opts[2].state_dict())  # checkpoints move between the two


def test_muon_ns_dtype_auto_is_bf16_only_where_the_hardware_has_it_and_config_refuses_other_values(monkeypatch):
    from pydantic import ValidationError

    from distill_dag.training.optim import ns_dtype_for

    from distill_dag.training import optim

    amd = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    spr = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert not optim.cpu_has_native_bf16(amd) and optim.cpu_has_native_bf16(spr)
    assert optim.cpu_has_native_bf16("Features\t: fp asimd bf16 i8mm\n") and not optim.cpu_has_native_bf16("")
    monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: False)
    assert ns_dtype_for("auto", torch.device("cpu")) == torch.float32
    assert build_optimizers(_Toy(), _cfg()).by_name("muon").ns_dtype == torch.float32
    monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: True)
    assert ns_dtype_for("auto", torch.device("cpu")) == torch.bfloat16
    assert ns_dtype_for("auto", torch.device("cuda")) == torch.bfloat16
    assert ns_dtype_for("float32", torch.device("cuda")) == torch.float32
    with pytest.raises(ValidationError, match="muon_ns_dtype"):
        _cfg(muon_ns_dtype="float16")
