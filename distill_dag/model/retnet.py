"""RetNet student (Sun et al. 2023, "Retentive Network"), as a Hugging Face causal LM.

One file, top to bottom: config, norms, rotation, multi-scale retention, FFN, block, model, LM head.

- Multi-scale retention: per head h a decay ``gamma_h = 1 - 2^(-5-h)``; queries and keys rotated by position
  (the xPos-style ``e^{i n theta}`` of the paper; the decay is the retention mask itself); keys scaled by
  K^-0.5; value dimension ``value_factor * hidden_size`` (2x); per-head group norm; swish gate; output
  projection back to ``hidden_size``.
- Gated FFN (SwiGLU), pre-norm residual blocks (RMSNorm), tied or untied embeddings.
- Three retention forms (``config.retention_mode``): ``chunkwise`` (training; O(T), Triton on CUDA),
  ``parallel`` (O(T^2) reference), ``recurrent``; decoding with a cache always runs the recurrent step, so a
  generated token costs O(1) time and memory.
- Document boundaries: ``position_ids == 0`` starts a document; the retention state resets there in every
  form, so documents packed into one row never see each other. ``attention_mask == 0`` marks padding: its
  keys are zeroed, so padding never enters the state.
- Retention math runs in float32 with autocast off (``retention_in_fp32``); projections follow autocast.
- Generation carries a :class:`RetNetCache` (one [B, H, K, V] state per layer), not a KV cache.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # transformers >= 5 spells it PreTrainedConfig; PretrainedConfig is kept as an alias
    from transformers import PreTrainedConfig as PretrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig

from distill_dag.kernels.retention import (
    BACKENDS,
    decay_log_gammas,
    retention,
    retention_parallel,
    retention_recurrent,
)


# transformers' names for a layer's token mixer (configuration_utils.ALLOWED_LAYER_TYPES)
LAYER_TYPES = ("linear_attention", "full_attention", "sliding_attention")


@strict
class RetNetConfig(PretrainedConfig):
    r"""Configuration of :class:`RetNetForCausalLM`.

    hidden_size (d), num_hidden_layers, num_attention_heads (H; key head dim d/H, value head dim
    value_factor*d/H), intermediate_size (gated FFN width), value_factor (2 in the paper), rope_theta (rotation
    base), chunk_size (chunkwise form), retention_mode ("chunkwise" | "parallel" | "recurrent"),
    retention_backend ("auto" | "torch" | "triton" | "fla"; auto = Triton on CUDA, PyTorch elsewhere),
    retention_in_fp32 (cast q/k/v to fp32 before retention; False keeps the autocast dtype for the Triton
    dots, accumulation stays fp32).

    Hybrid students: ``layer_types`` names each layer's token mixer in transformers' vocabulary:
    ``linear_attention`` (multi-scale retention), ``full_attention`` (causal softmax attention) or
    ``sliding_attention`` (softmax attention over the last ``attention_window`` tokens). None = every layer
    retention (a pure RetNet). Attention layers use ``num_key_value_heads`` K/V heads (GQA, default: one per
    query head), the key head dim and the rotation of the retention layers, and Llama's projection shapes, so
    a teacher's attention is copied into them verbatim.

    ``retention_window`` (LoLCATs / Liger): every retention layer also attends, with softmax over its own Q/K/V, to
    the last ``retention_window`` tokens, and adds that to its gated retention output before ``o_proj``. Exact
    local attention where decaying retention is weakest; generation keeps a rolling K/V buffer of that many tokens
    beside the state, so memory per token stays constant.
    """

    model_type = "retnet"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    value_factor: int = 2
    rms_norm_eps: float = 1e-6
    group_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    chunk_size: int = 64
    retention_mode: str = "chunkwise"
    retention_backend: str = "auto"
    retention_in_fp32: bool = True
    layer_types: list[str] | None = None
    attention_window: int | None = None
    num_key_value_heads: int | None = None
    retention_window: int | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def validate_architecture(self):
        """Checked by transformers on construction: head dims must divide evenly and the mode must exist."""
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "value_factor"):
            v = getattr(self, name)  # 0 layers would train and publish an embedding-only "student"
            if type(v) is not int or v < 1:
                raise ValueError(f"RetNetConfig.{name} must be an integer >= 1 (student.overrides.{name}), got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"RetNetConfig: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides it"
            )
        if self.retention_mode not in ("chunkwise", "parallel", "recurrent"):
            raise ValueError(
                f"RetNetConfig.retention_mode {self.retention_mode!r}: use chunkwise, parallel or recurrent"
            )
        if self.retention_backend not in BACKENDS:
            raise ValueError(
                f"RetNetConfig.retention_backend {self.retention_backend!r}: use one of {', '.join(BACKENDS)}"
            )
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"RetNetConfig.chunk_size must be a positive int, got {self.chunk_size!r}")
        types = self.layer_types
        if len(types) != self.num_hidden_layers:
            raise ValueError(f"RetNetConfig.layer_types has {len(types)} entries for num_hidden_layers "
                             f"{self.num_hidden_layers}: give one per layer")
        bad = sorted({t for t in types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"RetNetConfig.layer_types {bad}: use {', '.join(LAYER_TYPES)}")
        if "sliding_attention" in types and not (isinstance(self.attention_window, int) and self.attention_window >= 1):
            raise ValueError("RetNetConfig.layer_types has sliding_attention but attention_window is "
                             f"{self.attention_window!r}: set a window of >= 1 tokens")
        if self.retention_window is not None and not (isinstance(self.retention_window, int)
                                                      and self.retention_window >= 1):
            raise ValueError(f"RetNetConfig.retention_window {self.retention_window!r}: null or a window of >= 1 tokens")
        if self.num_key_value_heads is not None and (self.num_key_value_heads < 1
                                                     or self.num_attention_heads % self.num_key_value_heads):
            raise ValueError(f"RetNetConfig.num_key_value_heads {self.num_key_value_heads} must divide "
                             f"num_attention_heads {self.num_attention_heads}")

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = ["linear_attention"] * self.num_hidden_layers
        else:
            self.layer_types = list(self.layer_types)
        super().__post_init__(**kwargs)

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the softmax attention layers (empty for a pure RetNet)."""
        return [i for i, t in enumerate(self.layer_types) if t != "linear_attention"]

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def value_dim(self) -> int:
        return self.value_factor * self.hidden_size


# --------------------------------------------------------------------------------------------
# generation state
# --------------------------------------------------------------------------------------------
class RetentionStateLayer(LinearAttentionLayer):
    """One layer's retention state [B, H, K, V] (float32), updated in place at every forward; with
    ``config.retention_window`` also the rolling K/V buffer of its sliding-window branch (``window_kv``)."""

    def __init__(self, window: int | None = None):
        super().__init__()
        self.window_kv = AttentionKVLayer(window) if window else None

    def reset(self) -> None:
        super().reset()
        if self.window_kv is not None:
            self.window_kv.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.window_kv is not None:
            self.window_kv.reorder_cache(beam_idx)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        out = super().update_recurrent_state(recurrent_states, state_idx, **kwargs)
        # transformers marks a linear layer as "has state" on its conv update; retention has no conv.
        self.has_previous_state[state_idx] = True
        return out


class AttentionKVLayer(DynamicLayer):
    """One softmax attention layer's keys and values [B, H_kv, S, K], with what the mask needs per key:
    its stream index (tokens since the cache began), its document id and whether it is a token (not padding).

    With ``window`` set it is a rolling buffer: only the last ``window`` keys are kept, since no later query
    can see further back. Without it, it grows by one key per token (what full attention costs).
    """

    def __init__(self, window: int | None = None):
        super().__init__()
        self.window = window
        self.key_index: torch.Tensor | None = None  # [S] long
        self.key_doc: torch.Tensor | None = None  # [B, S] long
        self.key_valid: torch.Tensor | None = None  # [B, S] bool

    def update_with_meta(
        self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, doc: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Append T new keys (k, v [B, H_kv, T, K]; index [T]; doc, valid [B, T]); return every key the new
        queries may see (the kept ones plus the new ones), then trim to the window."""
        keys, values = self.update(k, v)
        if self.key_index is None:
            self.key_index, self.key_doc, self.key_valid = index, doc, valid
        else:
            self.key_index = torch.cat([self.key_index, index])
            self.key_doc = torch.cat([self.key_doc, doc], dim=1)
            self.key_valid = torch.cat([self.key_valid, valid], dim=1)
        out = (keys, values, self.key_index, self.key_doc, self.key_valid)
        if self.window is not None and self.keys.shape[-2] > self.window:
            w = self.window
            self.keys, self.values = self.keys[..., -w:, :], self.values[..., -w:, :]
            self.key_index, self.key_doc, self.key_valid = (
                self.key_index[-w:], self.key_doc[:, -w:], self.key_valid[:, -w:])
        return out

    def reset(self) -> None:
        super().reset()
        self.key_index = self.key_doc = self.key_valid = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_doc is not None:
            self.key_doc = self.key_doc.index_select(0, beam_idx.to(self.key_doc.device))
            self.key_valid = self.key_valid.index_select(0, beam_idx.to(self.key_valid.device))


class RetNetCache(Cache):
    """One generation cache for the whole student: the retention state of every retention layer, the keys and
    values of every attention layer (a rolling buffer when windowed), the number of tokens seen (for positions
    when none are given) and each row's current document id (so attention never crosses a document start).

    A pure RetNet's cache does not grow with the context: that is what makes its generation O(1) per token.
    A hybrid's grows by its full-attention layers' K/V only.
    """

    def __init__(self, config: RetNetConfig | None = None, num_layers: int | None = None):
        types = list(config.layer_types) if config is not None else ["linear_attention"] * int(num_layers)
        if num_layers is not None and len(types) != num_layers:
            raise ValueError(f"RetNetCache: num_layers {num_layers} but the config has {len(types)} layer_types")
        window = config.attention_window if config is not None else None
        rwin = config.retention_window if config is not None else None
        layers = [RetentionStateLayer(rwin) if t == "linear_attention"
                  else AttentionKVLayer(window if t == "sliding_attention" else None) for t in types]
        super().__init__(layers=layers)
        self.seen_tokens = 0
        self.doc_count: torch.Tensor | None = None  # [B] long: document starts seen so far per row

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0
        self.doc_count = None


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class RetNetRMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32. x: [..., d]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class RetNetGroupLayerNorm(nn.Module):
    """Group norm with one group per head: layer norm over each head's value dim, affine over all of them.

    x: [B, T, H, Dv] -> [B, T, H * Dv] in float32 (each head's output scale differs with its decay; this makes
    them comparable, Sun et al. sec. 2.2).
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = F.layer_norm(xf, xf.shape[-1:], eps=self.eps).flatten(-2)
        return y * self.weight.float() + self.bias.float()


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+K/2}) by angle ``position * theta^(-2i/K)``. x: [B, T, H, K]; positions [B, T]."""
    K = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, K, 2, device=x.device, dtype=torch.float32) / K)  # [K/2]
    ang = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, K/2]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x[..., : K // 2], x[..., K // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MultiScaleRetention(nn.Module):
    """Multi-scale retention: ``out = W_o( swish(W_g x) * GroupNorm(Retention(rot(W_q x), rot(W_k x), W_v x)) )``."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        d, H = config.hidden_size, config.num_attention_heads
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = H
        self.key_dim = d // H
        self.head_value_dim = config.value_dim // H
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, config.value_dim, bias=False)
        self.g_proj = nn.Linear(d, config.value_dim, bias=False)
        self.o_proj = nn.Linear(config.value_dim, d, bias=False)
        self.o_proj._residual_out = True
        self.group_norm = RetNetGroupLayerNorm(H, self.head_value_dim, config.group_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        reset: torch.Tensor | None,
        pad_mask: torch.Tensor | None,
        cache: RetNetCache | None,
        doc: torch.Tensor | None = None,
        past: int = 0,
    ) -> torch.Tensor:
        """x [B, T, d]; positions [B, T] long; reset [B, T] bool or None; pad_mask [B, T] (1 = token) or None;
        doc [B, T] document ids and ``past`` (tokens already in ``cache``) for the sliding-window branch."""
        B, T, _ = x.shape
        H, K, Vh = self.num_heads, self.key_dim, self.head_value_dim
        q = self.q_proj(x).view(B, T, H, K)
        k = self.k_proj(x).view(B, T, H, K)
        v = self.v_proj(x).view(B, T, H, Vh)
        gate = self.g_proj(x)
        cfg = self.config
        with torch.autocast(device_type=x.device.type, enabled=False):
            rdt = torch.float32 if cfg.retention_in_fp32 else q.dtype
            q = rotate(q.float(), positions, cfg.rope_theta)
            k = rotate(k.float(), positions, cfg.rope_theta)
            local = (self._window(q, k, v.float(), positions, doc, pad_mask, cache, past)
                     if cfg.retention_window else None)
            k = k * K**-0.5
            if pad_mask is not None:
                k = k * pad_mask[:, :, None, None].to(k.dtype)  # padding never enters the state
            q, k, v = q.to(rdt), k.to(rdt), v.to(rdt)
            log_decay = decay_log_gammas(H, device=x.device)
            state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
            want_state = cache is not None
            if cfg.retention_mode == "recurrent" or (state is not None and T == 1):
                o, final = retention_recurrent(q, k, v, log_decay, reset, state, want_state)
            elif cfg.retention_mode == "parallel":
                o, final = retention_parallel(q, k, v, log_decay, reset, state, want_state)
            else:
                o, final = retention(
                    q, k, v, log_decay, reset, state, want_state, cfg.chunk_size, cfg.retention_backend
                )
            if cache is not None:
                cache.update_recurrent_state(final.detach(), self.layer_idx)
            o = self.group_norm(o)  # [B, T, H * Vh] float32
        out = F.silu(gate) * o.to(gate.dtype)
        if local is not None:
            out = out + local.to(out.dtype)
        return self.o_proj(out)

    def _window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                doc: torch.Tensor | None, pad_mask: torch.Tensor | None, cache: "RetNetCache | None",
                past: int) -> torch.Tensor:
        """The sliding-window branch: softmax attention of q [B, T, H, K] over the last ``retention_window``
        keys k [B, T, H, K] / values v [B, T, H, Vh] of the same document (rotated, unscaled: SDPA scales by
        K^-0.5), padding excluded. Returns [B, T, H * Vh] float32."""
        B, T, H, _ = q.shape
        if doc is None:
            doc = (positions == 0).long().cumsum(-1)
        valid = pad_mask.bool() if pad_mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        index = torch.arange(past, past + T, device=q.device)
        if cache is not None:
            kh, vh, k_index, k_doc, k_valid = cache.layers[self.layer_idx].window_kv.update_with_meta(
                kh, vh, index, doc, valid)
        else:
            k_index, k_doc, k_valid = index, doc, valid
        mask = attention_mask(index, k_index, doc, k_doc, k_valid, self.config.retention_window)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return o.transpose(1, 2).reshape(B, T, -1)


def attention_mask(
    q_index: torch.Tensor, k_index: torch.Tensor, q_doc: torch.Tensor, k_doc: torch.Tensor, k_valid: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool: query i sees key j iff j <= i, both are in the same document, j is a token (not
    padding) and, with a window, i - j < window. A query always sees itself, so a padding row stays finite.

    q_index [Tq], k_index [Tk]: stream indices; q_doc [B, Tq], k_doc / k_valid [B, Tk].
    """
    qi, kj = q_index[:, None], k_index[None, :]
    m = (kj <= qi)[None] & (k_doc[:, None, :] == q_doc[:, :, None]) & k_valid[:, None, :]
    if window is not None:
        m = m & (qi - kj < window)[None]
    return (m | (kj == qi)[None])[:, None]


def _flash_attn_varlen():
    """flash-attn's varlen kernel when it is installed (CUDA machines), else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class RetNetAttention(nn.Module):
    """Causal softmax attention with grouped K/V heads and rotary positions, Llama's layout:
    ``out = W_o softmax(rot(W_q x) rot(W_k x)^T / sqrt(K) + mask) W_v x`` with H query heads and H_kv K/V heads.

    The mask keeps documents apart exactly as retention does (no key before the query's document start, i.e.
    the last ``position_ids == 0``, and no padding), and with ``config.attention_window`` (a
    ``sliding_attention`` layer) a query sees only the last ``window`` tokens. SDPA everywhere; flash-attn's
    varlen kernel on CUDA when installed (half precision, no padding, no cache), one sequence per document.
    """

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        d, H, Hkv = config.hidden_size, config.num_attention_heads, config.kv_heads
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, d // H
        self.window = config.attention_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.q_proj = nn.Linear(d, H * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, Hkv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, Hkv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(H * self.head_dim, d, bias=False)
        self.o_proj._residual_out = True

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        doc: torch.Tensor,
        valid: torch.Tensor | None,
        cache: "RetNetCache | None",
        past: int = 0,
    ) -> torch.Tensor:
        """x [B, T, d]; positions [B, T] (rotation); doc [B, T] document id per token; valid [B, T] bool
        (False = padding) or None; ``past``: tokens already in ``cache`` (stream index of x's first token)."""
        B, T, _ = x.shape
        H, Hkv, K = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, K)
        k = self.k_proj(x).view(B, T, Hkv, K)
        v = self.v_proj(x).view(B, T, Hkv, K)
        q = rotate(q.float(), positions, self.config.rope_theta).to(v.dtype)
        k = rotate(k.float(), positions, self.config.rope_theta).to(v.dtype)
        if cache is None and valid is None:
            o = self._flash(q, k, v, doc) if x.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
            if o is not None:
                return self.o_proj(o.reshape(B, T, H * K))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, K]
        index = torch.arange(past, past + T, device=x.device)
        tok = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        if cache is not None:
            k, v, k_index, k_doc, k_valid = cache.layers[self.layer_idx].update_with_meta(k, v, index, doc, tok)
        else:
            k_index, k_doc, k_valid = index, doc, tok
        # one document per row, no padding, no window: the plain causal mask (SDPA's fast kernels); the document
        # check syncs with the device, so it runs only when the cheaper conditions already hold
        if cache is None and valid is None and self.window is None and bool((doc == doc[:, :1]).all()):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
        else:
            mask = attention_mask(index, k_index, doc, k_doc, k_valid, self.window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * K))

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor) -> torch.Tensor | None:
        """flash-attn varlen over the packed documents: q [B, T, H, K], k/v [B, T, H_kv, K] -> [B, T, H, K]."""
        fn = _flash_attn_varlen()
        if fn is None:
            return None
        B, T = doc.shape
        flat = (doc + torch.arange(B, device=doc.device)[:, None] * (T + 1)).reshape(-1)  # unique id per (row, doc)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([B * T])]).to(torch.int32)
        max_len = int((bounds[1:] - bounds[:-1]).max())
        window = (self.window - 1, 0) if self.window is not None else (-1, -1)
        o = fn(q.reshape(B * T, *q.shape[2:]), k.reshape(B * T, *k.shape[2:]), v.reshape(B * T, *v.shape[2:]),
               bounds, bounds, max_len, max_len, causal=True, window_size=window)
        return o.view(B, T, *o.shape[1:])


class RetNetMLP(nn.Module):
    """Gated FFN: ``W_down( silu(W_gate x) * W_up x )``."""

    def __init__(self, config: RetNetConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj._residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RetNetBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: ``x + Mixer(norm(x))`` then ``x + FFN(norm(x))``; the mixer is multi-scale
    retention (``retention_norm`` / ``retention``) or, in a hybrid's attention layers, softmax attention
    (``attention_norm`` / ``attention``), as ``config.layer_types[layer_idx]`` says."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.retention_norm = RetNetRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.retention = MultiScaleRetention(config, layer_idx)
        else:
            self.attention_norm = RetNetRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.attention = RetNetAttention(config, layer_idx)
        self.ffn_norm = RetNetRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = RetNetMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        reset: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        cache: RetNetCache | None = None,
        doc: torch.Tensor | None = None,
        past: int = 0,
    ) -> torch.Tensor:
        if self.layer_type == "linear_attention":
            mixed = self.retention(self.retention_norm(hidden_states), positions, reset, pad_mask, cache, doc, past)
        else:
            valid = pad_mask.bool() if pad_mask is not None else None
            mixed = self.attention(self.attention_norm(hidden_states), positions, doc, valid, cache, past)
        h = hidden_states + mixed
        return h + self.ffn(self.ffn_norm(h))


# safetensors writes its files 0600; published files get the mode open() would give (the process umask)
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


class RetNetPreTrainedModel(PreTrainedModel):
    config_class = RetNetConfig
    config: RetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetNetBlock"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and getattr(module, "_residual_out", False):
            # GPT-2 scheme: residual outputs shrink with depth so the residual stream's variance stays ~1
            init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, RetNetGroupLayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RetNetRMSNorm):
            init.ones_(module.weight)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained``, then the weight files get the umask's mode (0644 under umask 022)
        like every other file of the folder, instead of the 0600 that safetensors gives them."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        for f in Path(save_directory).glob("model*.safetensors*"):
            if f.is_file() and not f.is_symlink():
                f.chmod(_FILE_MODE)
        return out


class RetNetModel(RetNetPreTrainedModel):
    """Embeddings -> blocks -> final norm. Returns ``.last_hidden_state`` [B, T, d] (and ``.cache``)."""

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        # no padding_idx: padding is masked out of the state and the loss, and a pad id that is also EOS (as
        # in Llama's tokenizers) must keep learning its embedding
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([RetNetBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RetNetRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RetNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: RetNetCache | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, T]; attention_mask [B, T] (0 = padding); position_ids [B, T] (0 = document start).

        Without position_ids: positions count from the cache's seen tokens (or from the first unpadded token
        when a mask is given), and the only document start is the row's first token of a fresh sequence.
        """
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("RetNetModel: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        if use_cache and cache is None:
            cache = RetNetCache(self.config)
        if cache is not None and not isinstance(cache, RetNetCache):
            raise TypeError(
                f"RetNetModel needs a RetNetCache (recurrent state), got {type(cache).__name__}; "
                "pass cache=RetNetCache(model.config) or leave it None"
            )
        if cache is not None and not use_cache:
            cache = None
        past = cache.seen_tokens if cache is not None else 0

        pad_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be [B, T] (1 = token, 0 = padding), got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask[:, -T:]
            if not bool(attention_mask.all()):
                pad_mask = attention_mask
        if position_ids is None:
            if pad_mask is not None and past == 0:
                position_ids = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        position_ids = position_ids.to(device)
        starts = position_ids == 0
        doc = None
        if self.config.attention_layers or self.config.retention_window:  # softmax masks by document id
            prev = cache.doc_count if cache is not None and cache.doc_count is not None else None
            doc = starts.long().cumsum(-1) + (prev[:, None] if prev is not None else 0)
        reset = starts
        if past == 0 and not bool(reset[:, 1:].any()):
            reset = None  # one document per row and no state yet: nothing to reset

        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, position_ids, reset, pad_mask, cache=cache, doc=doc, past=past)
        h = self.norm(h)
        if cache is not None:
            cache.seen_tokens += T
            if doc is not None:
                cache.doc_count = doc[:, -1]
        return BaseModelOutputWithPast(last_hidden_state=h, cache=cache if use_cache else None)


class RetNetForCausalLM(RetNetPreTrainedModel, GenerationMixin):
    """RetNet with a linear LM head (tied to the embeddings when ``config.tie_word_embeddings``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.model = RetNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # The default would be a DynamicCache of KV tensors; retention carries a fixed-size state instead.
        if model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None:
            if generation_config.use_cache is not False:
                model_kwargs["cache"] = RetNetCache(self.config)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: RetNetCache | None = None,
        use_cache: bool | None = None,
        cache: RetNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, V] (float32) and, with ``labels`` [B, T] (unshifted, -100 ignored), the loss

        ``loss = sum_{t : labels[t+1] != -100} -log softmax(logits[t])[labels[t+1]] / #{t : labels[t+1] != -100}``

        (one shift: position t is scored against labels[t + 1]).
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels.to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy with ONE shift. logits [B, T, V]; labels [B, T] unshifted, -100 ignored.

    ``loss = mean over {t : labels[t+1] != -100} of -log softmax(logits[t])[labels[t+1]]`` (0 if none).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / (shift_labels != -100).sum().clamp(min=1)
