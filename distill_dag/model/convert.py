"""Teacher -> RetNet weight transfer: a RetNet shaped like the teacher, carrying every teacher weight it can.

The recipe of LoLCATs / MOHAWK / RADLADS for RetNet: the student takes the teacher's width, depth, FFN,
vocabulary and head count; everything but the token mixer is copied verbatim, and the mixer's Q/K/V/O
projections are copied too, so that after a short per-layer alignment (``distill_dag.student.align``)
retention only has to learn what softmax attention did differently. One table per teacher family
(:data:`FAMILIES`, keyed by ``config.model_type``); each lists, for every teacher parameter, where it goes
in the student and how it is reshaped. A teacher parameter that is not in the table is an error, never
silently dropped (e.g. Q/K/V biases of Qwen2-style teachers, which retention has no place for).

Llama family (``LlamaForCausalLM``), per layer ``i``::

    model.layers.i.input_layernorm.weight           -> model.layers.i.retention_norm.weight   copy
    model.layers.i.self_attn.q_proj.weight          -> model.layers.i.retention.q_proj.weight copy
    model.layers.i.self_attn.k_proj.weight          -> model.layers.i.retention.k_proj.weight repeat K/V groups
    model.layers.i.self_attn.v_proj.weight          -> model.layers.i.retention.v_proj.weight repeat K/V groups, value layout
    model.layers.i.self_attn.o_proj.weight          -> model.layers.i.retention.o_proj.weight value layout
    model.layers.i.post_attention_layernorm.weight  -> model.layers.i.ffn_norm.weight         copy
    model.layers.i.mlp.{gate,up,down}_proj.weight   -> model.layers.i.ffn.{gate,up,down}_proj.weight copy
    model.embed_tokens.weight, model.norm.weight, lm_head.weight -> same names               copy

New (initialised as in a fresh RetNet): ``retention.g_proj`` (swish gate), ``retention.group_norm``; the
per-head decays ``gamma_h = 1 - 2^(-5-h)`` are fixed by the head count, not parameters.

Why it fits: the student's RMSNorm, SwiGLU FFN, pre-norm residual and LM head compute exactly Llama's
functions; its rotation ``rotate`` pairs (x_i, x_{i+K/2}) with ``theta^(-2i/K)`` as Llama's
``rotate_half`` RoPE does (same ``rope_theta``); keys are scaled by ``K^-0.5`` like Llama's scores. Grouped
K/V heads (GQA): student head ``h`` takes teacher K/V head ``h // (H / H_kv)`` (transformers' ``repeat_kv``).

Value dimension. RetNet's paper uses ``value_factor = 2`` (value dim 2d); Llama's V is d. Converted
students default to ``value_factor = 1``: V and O are copied as they are, the gate is d x d and each head's
group norm covers the teacher head's Dh values, so no teacher weight is padded or dropped.
``value_factor = 2`` is supported too: each student head's 2*Dh values hold the teacher head's Dh values
first and Dh zero rows after them (V rows zero, the matching O columns zero), so the extra half adds
nothing at the start and grows during training. Both layouts make the student's Q/K/V/O compute the
teacher's attention when softmax replaces retention (:class:`SoftmaxAttention`, the tests' check).

RoPE scaling (Llama-3's ``rope_type: llama3``) is not reproduced: the student rotates with plain
``rope_theta`` frequencies; :class:`Conversion` ``notes`` says so, and the alignment stage absorbs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from distill_dag.model.retnet import RetNetConfig, RetNetForCausalLM, rotate


class ConversionError(ValueError):
    """A teacher that cannot be converted; the message names the parameter or config field."""


@dataclass(frozen=True)
class ParamMap:
    """One teacher parameter -> one student parameter. ``how``: copy | repeat_kv | value_in | value_out."""

    teacher: str
    student: str
    how: str = "copy"


@dataclass
class Conversion:
    """What :func:`convert_teacher` did: the mapping used, the student parameters left new, and notes."""

    family: str
    mapping: list[ParamMap]
    new_params: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "mapping": [[m.teacher, m.student, m.how] for m in self.mapping],
            "new_params": self.new_params,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------
# Llama family
# --------------------------------------------------------------------------------------------
def _llama_rope_theta(tc: Any) -> tuple[float, str]:
    rp = getattr(tc, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(tc, "rope_theta", None))
    if theta is None:
        raise ConversionError("teacher config has no rope_theta (rope_parameters.rope_theta); cannot set the rotation")
    return float(theta), str(rp.get("rope_type", "default"))


def llama_student_fields(tc: Any, value_factor: int) -> tuple[dict[str, Any], list[str]]:
    """RetNetConfig fields that follow a LlamaConfig ``tc``, and notes on what is not reproduced."""
    d, H = int(tc.hidden_size), int(tc.num_attention_heads)
    head_dim = int(getattr(tc, "head_dim", None) or d // H)
    if head_dim * H != d:
        raise ConversionError(
            f"teacher head_dim {head_dim} x num_attention_heads {H} != hidden_size {d}: RetNet's key head dim is "
            "hidden_size / heads, so such a teacher's Q/K cannot be copied"
        )
    Hkv = int(getattr(tc, "num_key_value_heads", None) or H)
    if H % Hkv:
        raise ConversionError(f"teacher num_attention_heads {H} is not a multiple of num_key_value_heads {Hkv}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(tc, flag, False):
            raise ConversionError(f"teacher config {flag}=True: the RetNet student has no biases to receive them")
    if getattr(tc, "hidden_act", "silu") != "silu":
        raise ConversionError(f"teacher hidden_act {tc.hidden_act!r}: the student's gated FFN uses silu")
    theta, rope_type = _llama_rope_theta(tc)
    notes = []
    if rope_type != "default":
        notes.append(f"teacher rope_type {rope_type!r} is not reproduced: the student rotates with plain rope_theta={theta}")
    if getattr(tc, "attention_dropout", 0.0):
        notes.append("teacher attention_dropout is ignored (retention has none)")
    fields = dict(
        vocab_size=int(tc.vocab_size),
        hidden_size=d,
        num_hidden_layers=int(tc.num_hidden_layers),
        num_attention_heads=H,
        intermediate_size=int(tc.intermediate_size),
        value_factor=int(value_factor),
        rms_norm_eps=float(tc.rms_norm_eps),
        rope_theta=theta,
        initializer_range=float(getattr(tc, "initializer_range", 0.02)),
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        pad_token_id=getattr(tc, "pad_token_id", None),
        bos_token_id=getattr(tc, "bos_token_id", None),
        eos_token_id=getattr(tc, "eos_token_id", None),
        num_key_value_heads=Hkv,  # the attention layers a hybrid keeps use the teacher's K/V heads as they are
    )
    return fields, notes


def llama_param_map(tc: Any, layer_types: list[str] | None = None) -> list[ParamMap]:
    """Every parameter of a ``LlamaForCausalLM`` with config ``tc`` and where it goes in the RetNet.

    ``layer_types`` (the student's): a layer kept as softmax attention takes the teacher's attention verbatim
    (Q/K/V/O and its input norm, K/V heads as they are); a retention layer takes Q/K/V/O reshaped for retention.
    """
    m = [ParamMap("model.embed_tokens.weight", "model.embed_tokens.weight")]
    for i in range(int(tc.num_hidden_layers)):
        t, s = f"model.layers.{i}.", f"model.layers.{i}."
        if layer_types is not None and layer_types[i] != "linear_attention":
            m += [ParamMap(t + "input_layernorm.weight", s + "attention_norm.weight")]
            m += [ParamMap(t + f"self_attn.{x}_proj.weight", s + f"attention.{x}_proj.weight") for x in "qkvo"]
            m += [ParamMap(t + "post_attention_layernorm.weight", s + "ffn_norm.weight")]
            m += [ParamMap(t + f"mlp.{x}_proj.weight", s + f"ffn.{x}_proj.weight") for x in ("gate", "up", "down")]
            continue
        m += [
            ParamMap(t + "input_layernorm.weight", s + "retention_norm.weight"),
            ParamMap(t + "self_attn.q_proj.weight", s + "retention.q_proj.weight"),
            ParamMap(t + "self_attn.k_proj.weight", s + "retention.k_proj.weight", "repeat_kv"),
            ParamMap(t + "self_attn.v_proj.weight", s + "retention.v_proj.weight", "value_in"),
            ParamMap(t + "self_attn.o_proj.weight", s + "retention.o_proj.weight", "value_out"),
            ParamMap(t + "post_attention_layernorm.weight", s + "ffn_norm.weight"),
            ParamMap(t + "mlp.gate_proj.weight", s + "ffn.gate_proj.weight"),
            ParamMap(t + "mlp.up_proj.weight", s + "ffn.up_proj.weight"),
            ParamMap(t + "mlp.down_proj.weight", s + "ffn.down_proj.weight"),
        ]
    m += [ParamMap("model.norm.weight", "model.norm.weight"), ParamMap("lm_head.weight", "lm_head.weight")]
    return m


@dataclass(frozen=True)
class Family:
    """How one teacher family converts: its RetNet fields (+ notes) and its parameter table."""

    student_fields: Callable[[Any, int], tuple[dict[str, Any], list[str]]]
    param_map: Callable[[Any, list[str] | None], list[ParamMap]]


# model_type -> Family. Another family is one entry here: its fields function and its table (families with
# Llama's layout, e.g. Mistral, can reuse Llama's two functions once a test proves it).
FAMILIES: dict[str, Family] = {
    "llama": Family(llama_student_fields, llama_param_map),
}


def _family(tc: Any) -> tuple[str, Family]:
    mt = getattr(tc, "model_type", None)
    if mt not in FAMILIES:
        raise ConversionError(
            f"teacher model_type {mt!r} has no RetNet conversion (known: {', '.join(FAMILIES)}); "
            "add its table to distill_dag.model.convert.FAMILIES"
        )
    return mt, FAMILIES[mt]


# --------------------------------------------------------------------------------------------
# tensor transforms
# --------------------------------------------------------------------------------------------
def _repeat_kv(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """[H_kv * Dh, d] -> [H * Dh, d]: student head h gets teacher head h // (H / H_kv) (``repeat_kv``)."""
    rows, d = w.shape
    dh = rows // num_kv_heads
    return w.view(num_kv_heads, dh, d).repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(num_heads * dh, d)


def _value_rows(w: torch.Tensor, num_heads: int, value_factor: int) -> torch.Tensor:
    """[H * Dh, d] -> [H * vf * Dh, d]: each head's Dh rows first, (vf - 1) * Dh zero rows after."""
    rows, d = w.shape
    dh = rows // num_heads
    w = w.view(num_heads, dh, d)
    pad = w.new_zeros(num_heads, (value_factor - 1) * dh, d)
    return torch.cat([w, pad], dim=1).reshape(num_heads * value_factor * dh, d)


def _value_cols(w: torch.Tensor, num_heads: int, value_factor: int) -> torch.Tensor:
    """[d, H * Dh] -> [d, H * vf * Dh]: the O columns of each head's Dh values, zero columns after them."""
    d, cols = w.shape
    dh = cols // num_heads
    w = w.view(d, num_heads, dh)
    pad = w.new_zeros(d, num_heads, (value_factor - 1) * dh)
    return torch.cat([w, pad], dim=2).reshape(d, num_heads * value_factor * dh)


def transform(how: str, w: torch.Tensor, tc: Any, sc: RetNetConfig) -> torch.Tensor:
    """Apply one :class:`ParamMap` ``how`` to the teacher tensor ``w`` (teacher config tc, student config sc)."""
    H = sc.num_attention_heads
    Hkv = int(getattr(tc, "num_key_value_heads", None) or H)
    if how == "copy":
        return w
    if how == "repeat_kv":
        return _repeat_kv(w, H, Hkv)
    if how == "value_in":
        return _value_rows(_repeat_kv(w, H, Hkv), H, sc.value_factor)
    if how == "value_out":
        return _value_cols(w, H, sc.value_factor)
    raise ConversionError(f"unknown parameter transform {how!r}")


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------
def unwrap_teacher(teacher: nn.Module) -> nn.Module:
    """The plain causal LM: a peft-wrapped teacher is merged first (its adapter is part of the teacher)."""
    if hasattr(teacher, "merge_and_unload") and hasattr(teacher, "peft_config"):
        import copy

        return copy.deepcopy(teacher).merge_and_unload()
    return teacher


def student_config_from_teacher(teacher_config: Any, *, value_factor: int = 1, **overrides: Any) -> RetNetConfig:
    """The RetNetConfig whose shape follows ``teacher_config``; ``overrides`` may set non-shape fields
    (chunk_size, retention_backend, ...); a shape field that differs from the teacher's is an error."""
    _, fam = _family(teacher_config)
    fields, _ = fam.student_fields(teacher_config, value_factor)
    shape = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "num_key_value_heads"}
    for k, v in overrides.items():
        if k in shape and v != fields[k]:
            raise ConversionError(
                f"student.overrides.{k}={v!r} conflicts with the teacher's {fields[k]!r}: student.init "
                "from_teacher takes the shape from the teacher (remove the override)"
            )
        if k not in RetNetConfig.__dataclass_fields__:
            raise ConversionError(f"student.overrides.{k}: not a RetNetConfig field")
    fields.update(overrides)
    return RetNetConfig(**fields)


def convert_teacher(
    teacher: nn.Module, *, value_factor: int = 1, seed: int | None = 0, **overrides: Any
) -> tuple[RetNetForCausalLM, Conversion]:
    """A fp32 RetNet built from ``teacher`` (a ``LlamaForCausalLM``, possibly peft-wrapped) and the report.

    Every teacher parameter must appear in the family's table and every table entry must exist in the
    teacher, else :class:`ConversionError` lists the names. ``seed`` seeds the new parameters' init.
    """
    teacher = unwrap_teacher(teacher)
    tc = teacher.config
    family, fam = _family(tc)
    sc = student_config_from_teacher(tc, value_factor=value_factor, **overrides)
    _, notes = fam.student_fields(tc, value_factor)
    mapping = fam.param_map(tc, list(sc.layer_types))

    tstate = teacher.state_dict()
    mapped = {m.teacher for m in mapping}
    unmapped = sorted(set(tstate) - mapped)
    missing = sorted(mapped - set(tstate))
    if unmapped:
        raise ConversionError(f"teacher parameters with no place in the RetNet ({family} table): {unmapped[:8]}"
                              + (f" and {len(unmapped) - 8} more" if len(unmapped) > 8 else ""))
    if missing:
        raise ConversionError(f"the {family} table names teacher parameters this teacher lacks: {missing[:8]}")

    if seed is not None:
        torch.manual_seed(seed)
    student = RetNetForCausalLM(sc).float()
    sstate = student.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    for m in mapping:
        w = transform(m.how, tstate[m.teacher].detach().to("cpu", torch.float32), tc, sc)
        if m.student not in sstate:
            raise ConversionError(f"{m.teacher} maps to {m.student}, which the student does not have")
        if tuple(w.shape) != tuple(sstate[m.student].shape):
            raise ConversionError(f"{m.teacher} {tuple(w.shape)} does not fit {m.student} {tuple(sstate[m.student].shape)}")
        if m.student in new_state and not torch.equal(new_state[m.student], w):
            raise ConversionError(f"{m.student} would receive two different tensors (tied teacher weights differ?)")
        new_state[m.student] = w
    with torch.no_grad():
        params = dict(student.named_parameters(remove_duplicate=False))
        for name, w in new_state.items():
            params[name].copy_(w)
    if sc.tie_word_embeddings and not torch.equal(new_state["lm_head.weight"], new_state["model.embed_tokens.weight"]):
        raise ConversionError("teacher tie_word_embeddings=True but lm_head.weight differs from embed_tokens.weight")
    if sc.retention_window:  # the gate at zero: the retention branch starts silent, so the converted student starts
        with torch.no_grad():  # as the teacher with each converted layer's attention cut to the window
            for blk in student.model.layers:
                if hasattr(blk, "retention"):
                    blk.retention.g_proj.weight.zero_()
    filled = set(new_state)
    new_params = sorted(n for n, _ in student.named_parameters(remove_duplicate=False) if n not in filled)
    return student, Conversion(family=family, mapping=mapping, new_params=new_params, notes=notes)


# --------------------------------------------------------------------------------------------
# sanity hooks: put softmax attention back where retention is
# --------------------------------------------------------------------------------------------
def document_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """[B, T] positions (0 = document start) -> [B, 1, T, T] bool: j <= i and j in i's document."""
    T = positions.shape[1]
    doc = (positions == 0).long().cumsum(-1)  # document index per position
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return (same & causal)[:, None]


class SoftmaxAttention(nn.Module):
    """Causal softmax attention computed with a student retention module's own Q/K/V/O (no gate, no group
    norm, no decay): ``W_o softmax(rot(W_q x) rot(W_k x)^T / sqrt(K) + mask) W_v x``, per document.

    Swapped in for ``MultiScaleRetention`` (same call signature), a converted student computes the
    teacher's function: this proves the Q/K/V/O transfer (GQA repeat and value layout included).
    """

    def __init__(self, retention: nn.Module):
        super().__init__()
        self.r = retention

    def forward(self, x: torch.Tensor, positions: torch.Tensor, reset: Any, pad_mask: Any, cache: Any,
                *_: Any) -> torch.Tensor:
        """x [B, T, d]; positions [B, T]. ``reset``, ``pad_mask``, ``cache`` (and the block's doc ids) are
        accepted and unused."""
        r = self.r
        B, T, _ = x.shape
        H, K, Vh = r.num_heads, r.key_dim, r.head_value_dim
        q = rotate(r.q_proj(x).view(B, T, H, K).float(), positions, r.config.rope_theta)
        k = rotate(r.k_proj(x).view(B, T, H, K).float(), positions, r.config.rope_theta)
        v = r.v_proj(x).view(B, T, H, Vh).float()
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=document_causal_mask(positions)
        )
        return r.o_proj(o.transpose(1, 2).reshape(B, T, H * Vh).to(x.dtype))


class TeacherAttention(nn.Module):
    """A teacher layer's own attention module (and rotary embedding) behind the retention call signature.

    ``forward(x, positions, ...)`` runs the teacher's attention on ``x`` exactly as the teacher's decoder
    layer does (same mask builder, same kernel), so a converted student with every retention replaced by
    this reproduces the teacher's logits: the check that embeddings, norms, FFN, head and residual wiring
    were transferred exactly.
    """

    def __init__(self, teacher: nn.Module, layer_idx: int):
        super().__init__()
        base = unwrap_teacher(teacher).model
        self.attn = base.layers[layer_idx].self_attn
        self.rotary = base.rotary_emb
        self.tconfig = base.config

    def forward(self, x: torch.Tensor, positions: torch.Tensor, reset: Any, pad_mask: Any, cache: Any,
                *_: Any) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=self.tconfig, inputs_embeds=x, attention_mask=None, cache=None,
                                  position_ids=positions)
        out, _ = self.attn(hidden_states=x, position_embeddings=self.rotary(x, positions), attention_mask=mask,
                           position_ids=positions)
        return out


def swap_retention(student: RetNetForCausalLM, modules: list[nn.Module]) -> list[nn.Module]:
    """Replace each block's ``retention`` with ``modules[i]``; returns the originals (to swap back)."""
    blocks = student.model.layers
    if len(modules) != len(blocks):
        raise ValueError(f"{len(modules)} modules for {len(blocks)} blocks")
    old = [b.retention for b in blocks]
    for b, m in zip(blocks, modules):
        b.retention = m
    return old


# --------------------------------------------------------------------------------------------
# hybrids: put the teacher's own attention back in chosen layers
# --------------------------------------------------------------------------------------------
def hybrid_layer_types(num_layers: int, attention_layers: list[int], window: int | None) -> list[str]:
    """``layer_types`` of a student whose ``attention_layers`` are softmax attention (sliding when ``window``)."""
    bad = [i for i in attention_layers if not 0 <= i < num_layers]
    if bad:
        raise ConversionError(f"student.attention_layers {bad}: the student has layers 0..{num_layers - 1}")
    kind = "sliding_attention" if window else "full_attention"
    keep = set(attention_layers)
    return [kind if i in keep else "linear_attention" for i in range(num_layers)]


def hybridize(student: RetNetForCausalLM, teacher: nn.Module, attention_layers: list[int],
              window: int | None = None) -> tuple[RetNetForCausalLM, list[ParamMap]]:
    """A copy of a converted ``student`` whose ``attention_layers`` are the teacher's attention, verbatim.

    Every other weight (retention layers, FFNs, norms, embeddings, head) is the student's, so a stage-1
    aligned student keeps its alignment. Returns the new student and the teacher tensors copied into it.
    """
    teacher = unwrap_teacher(teacher)
    tc = teacher.config
    _, fam = _family(tc)
    L = student.config.num_hidden_layers
    fields = student.config.to_dict()
    for k in ("model_type", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype"):
        fields.pop(k, None)
    fields.update(layer_types=hybrid_layer_types(L, list(attention_layers), window), attention_window=window,
                  num_key_value_heads=int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads))
    sc = RetNetConfig(**fields)
    p0 = next(student.parameters())
    new = RetNetForCausalLM(sc).to(device=p0.device, dtype=p0.dtype)
    kept = [m for m in fam.param_map(tc, list(sc.layer_types))
            if any(m.student.startswith(f"model.layers.{i}.attention") for i in attention_layers)]
    tstate = teacher.state_dict()
    sstate = student.state_dict()
    with torch.no_grad():
        params = dict(new.named_parameters(remove_duplicate=False))
        for name, p in params.items():
            if name in sstate and sstate[name].shape == p.shape:
                p.copy_(sstate[name])
        for m in kept:
            params[m.student].copy_(transform(m.how, tstate[m.teacher], tc, sc))
    missing = [n for n in params if n not in sstate and n not in {m.student for m in kept}]
    if missing:
        raise ConversionError(f"hybridize left student parameters without weights: {missing[:6]}")
    return new, kept
