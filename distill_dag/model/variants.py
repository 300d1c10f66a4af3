"""Named RetNet student sizes and their parameter counts.

Per layer: retention 8 d^2 (q, k: d x d; v, gate: d x 2d; out: 2d x d) + gated FFN 3 d f + norms; plus the
embedding V x d (the LM head shares it when tied). With the Llama-3.2 vocabulary (128256, tied):

=======  =====  ======  =====  ====  =============  ===========
variant  d      layers  heads  f     key/value dim  parameters
=======  =====  ======  =====  ====  =============  ===========
tiny     128    2       4      256   32 / 64        tests, CPU demo
350M     1024   15      8      2048  128 / 256      351.6M
500M     1280   16      10     2048  128 / 256      499.8M
=======  =====  ======  =====  ====  =============  ===========

Key head dims stay at 128: public chunk-retention kernels slow down sharply at 256.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from distill_dag.safe_read import check_regular_files, read_json_bounded

if TYPE_CHECKING:  # the config schema checks overrides without importing torch (see override_errors)
    from distill_dag.model.retnet import RetNetConfig

VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "350M": dict(hidden_size=1024, num_hidden_layers=15, num_attention_heads=8, intermediate_size=2048),
    "500M": dict(hidden_size=1280, num_hidden_layers=16, num_attention_heads=10, intermediate_size=2048),
}


# What student.overrides may set, with bounds checked at config time (distill_dag/config/schema.py), before any
# tensor exists: a width of 1e6 or a chunk of 1e9 would otherwise try to allocate terabytes first.
# (kind, low, high); floats must be finite and > low when low is 0.
MAX_CHUNK_SIZE = 4096  # the chunkwise form holds [chunk, chunk] decay masks per head
OVERRIDE_BOUNDS: dict[str, tuple[type, float, float]] = {
    "hidden_size": (int, 8, 16384),
    "num_hidden_layers": (int, 1, 256),
    "num_attention_heads": (int, 1, 512),
    "intermediate_size": (int, 1, 65536),
    "value_factor": (int, 1, 8),
    "chunk_size": (int, 1, MAX_CHUNK_SIZE),
    "rms_norm_eps": (float, 0.0, 1.0),
    "group_norm_eps": (float, 0.0, 1.0),
    "rope_theta": (float, 0.0, 1e12),
    "initializer_range": (float, 0.0, 10.0),
}
# fields student.overrides must not set: the run decides them
_FIXED = {"vocab_size": "the vocabulary comes from the tokenizer (tokenizer.vocab_size, or the hub tokenizer's): "
                        "remove it from student.overrides",
          "retention_backend": "set student.retention_backend instead"}
# the non-embedding parameters a student may have: 16x the largest variant (500M); more is a typo
MAX_NON_EMBEDDING_PARAMS = 16 * 500_000_000


def non_embedding_params(fields: dict[str, Any]) -> int:
    """Retention (2 + 3 * value_factor) d^2 + gated FFN 3 d f per layer (norms left out)."""
    d, f, vf, n = (int(fields[k]) for k in ("hidden_size", "intermediate_size", "value_factor", "num_hidden_layers"))
    return n * ((2 + 3 * vf) * d * d + 3 * d * f)


def override_errors(variant: str, overrides: Any, chunk_size: int, key: str = "student.overrides"
                    ) -> list[tuple[str, str]]:
    """``(key, message)`` for every value of ``student.overrides`` the student cannot be built with: unknown
    or run-decided fields, wrong types, values out of :data:`OVERRIDE_BOUNDS`, a width not divisible by the
    heads, a model above :data:`MAX_NON_EMBEDDING_PARAMS`; then, when all of that holds, whatever
    ``RetNetConfig`` itself refuses. Nothing is allocated."""
    if not isinstance(overrides, dict):
        return [(key, f"must be a mapping of RetNetConfig fields, got {type(overrides).__name__}")]
    errs: list[tuple[str, str]] = []
    for name, v in overrides.items():
        k = f"{key}.{name}"
        if not isinstance(name, str):
            errs.append((key, f"field names are strings, got {name!r}"))
        elif name in _FIXED:
            errs.append((k, _FIXED[name]))
        elif name in OVERRIDE_BOUNDS:
            kind, lo, hi = OVERRIDE_BOUNDS[name]
            ok_type = (type(v) is int) if kind is int else (type(v) in (int, float))
            if not ok_type:
                errs.append((k, f"must be {'an integer' if kind is int else 'a number'}, got "
                                f"{type(v).__name__} {v!r:.40}"))
            elif kind is float and not math.isfinite(v):
                errs.append((k, "must be a finite number"))
            elif (v <= lo if kind is float and lo == 0 else v < lo) or v > hi:
                low = f"> {lo}" if kind is float and lo == 0 else f">= {lo}"
                errs.append((k, f"{v!r} is out of bounds: must be {low} and <= {hi}"))
    if errs:
        return errs
    fields = {**VARIANTS.get(variant, VARIANTS["tiny"]), "value_factor": 2, "chunk_size": chunk_size, **overrides}
    if fields["hidden_size"] % fields["num_attention_heads"]:
        return [(f"{key}.hidden_size", f"{fields['hidden_size']} is not divisible by num_attention_heads "
                                       f"{fields['num_attention_heads']}: pick a head count that divides it")]
    n = non_embedding_params(fields)
    if n > MAX_NON_EMBEDDING_PARAMS:
        return [(key, f"{n:,} non-embedding parameters (hidden_size x num_hidden_layers x intermediate_size x "
                      f"value_factor) is above the bound {MAX_NON_EMBEDDING_PARAMS:,} (16x the 500M variant)")]
    if not overrides:
        return []
    try:  # the remaining fields (and types transformers' strict dataclass checks) through RetNetConfig itself
        from distill_dag.model.retnet import RetNetConfig  # lazy: keeps the config schema, which checks student.* through it, free of torch

        unknown = sorted(set(overrides) - set(RetNetConfig.__dataclass_fields__))
        if unknown:
            own = sorted(set(RetNetConfig.__annotations__) - set(_FIXED))  # not PretrainedConfig's plumbing
            return [(f"{key}.{unknown[0]}", f"not a RetNetConfig field (the student's fields: {', '.join(own)})")]
        student_config(variant if variant in VARIANTS else "tiny", 256, **{"chunk_size": chunk_size, **overrides})
    except Exception as err:  # noqa: BLE001 - any refusal of the config is a config error naming the key
        first = (str(err).splitlines() or [""])[0].replace("; ", ", ")  # "; " separates keys in config errors
        return [(key, f"RetNetConfig refuses it: {type(err).__name__}: {first}")]
    return []


def student_config(variant: str, vocab_size: int, **overrides: Any) -> "RetNetConfig":
    """The RetNetConfig of a named variant (``tiny``, ``350M``, ``500M``), with ``overrides`` of any field."""
    from distill_dag.model.retnet import RetNetConfig  # lazy: keeps the config schema, which checks student.* through it, free of torch

    if variant not in VARIANTS:
        raise ValueError(f"unknown student variant {variant!r} (student.variant); choose one of {', '.join(VARIANTS)}")
    fields = dict(VARIANTS[variant], vocab_size=vocab_size, tie_word_embeddings=True)
    unknown = set(overrides) - set(RetNetConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown RetNetConfig field(s) in student.overrides: {', '.join(sorted(unknown))} "
            f"(valid: {', '.join(sorted(RetNetConfig.__dataclass_fields__))})"
        )
    fields.update(overrides)
    return RetNetConfig(**fields)


def student_model_config(student_cfg: Any, vocab_size: int) -> RetNetConfig:
    """The RetNetConfig a :class:`distill_dag.config.StudentConfig` section builds from scratch: the variant, its
    overrides, and with ``attention_layers`` listed, a hybrid's ``layer_types`` (auto needs a teacher)."""
    fields = {"chunk_size": student_cfg.chunk_size, "retention_backend": student_cfg.retention_backend,
              **student_cfg.overrides}
    if getattr(student_cfg, "retention_window", None):
        fields["retention_window"] = student_cfg.retention_window
    layers = getattr(student_cfg, "attention_layers", [])
    if layers and layers != "auto":
        from distill_dag.model.convert import hybrid_layer_types  # lazy: keeps the config schema, which checks student.* through it, free of torch

        depth = int(fields.get("num_hidden_layers", VARIANTS[student_cfg.variant]["num_hidden_layers"]))
        fields.update(layer_types=hybrid_layer_types(depth, list(layers), student_cfg.attention_window),
                      attention_window=student_cfg.attention_window)
    return student_config(student_cfg.variant, vocab_size, **fields)


def build_student(student_cfg: Any, vocab_size: int) -> "RetNetForCausalLM":  # noqa: F821
    """A freshly initialised student from a :class:`distill_dag.config.StudentConfig` section."""
    from distill_dag.model.retnet import RetNetForCausalLM  # lazy: keeps the config schema, which checks student.* through it, free of torch

    cfg = student_model_config(student_cfg, vocab_size)
    model = RetNetForCausalLM(cfg)
    if student_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(config: RetNetConfig) -> dict[str, int]:
    """Parameter counts of a config, built on the meta device (no memory): embedding, per-block parts,
    LM head (0 when tied), ``total`` (unique parameters) and ``non_embedding``."""
    import torch

    from distill_dag.model.retnet import RetNetForCausalLM  # lazy: keeps the config schema, which checks student.* through it, free of torch

    with torch.device("meta"):
        model = RetNetForCausalLM(config)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    blocks = list(model.model.layers)
    block = blocks[0]
    ret = next((b for b in blocks if hasattr(b, "retention")), None)
    att = next((b for b in blocks if hasattr(b, "attention")), None)
    embedding = n(model.model.embed_tokens)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return {
        "embedding": embedding,
        "lm_head": 0 if tied else model.lm_head.weight.numel(),
        "retention_per_layer": n(ret.retention) + n(ret.retention_norm) if ret is not None else 0,
        "attention_per_layer": n(att.attention) + n(att.attention_norm) if att is not None else 0,
        "attention_layers": len(config.attention_layers),
        "ffn_per_layer": n(block.ffn) + n(block.ffn_norm),
        "layers": config.num_hidden_layers,
        "blocks": n(model.model.layers),
        "final_norm": n(model.model.norm),
        "non_embedding": total - embedding - (0 if tied else model.lm_head.weight.numel()),
        "total": total,
    }


def generation_cache_bytes(config: RetNetConfig, context: int, kv_bytes: int = 2) -> dict[str, int]:
    """Bytes one sequence's generation cache holds after ``context`` tokens (batch 1).

    Retention layers: a float32 state of ``H x K x V`` per layer, whatever the context (``state``). Attention
    layers: keys and values ``2 x H_kv x K x n`` at ``kv_bytes`` per element (bf16: 2), with n = the context, or
    ``min(context, attention_window)`` for a sliding layer (``kv``). ``per_token``: what one more token adds."""
    H, K = config.num_attention_heads, config.head_dim
    V = config.value_dim // H
    state = kv = per_token = 0
    for t in config.layer_types:
        if t == "linear_attention":
            state += H * K * V * 4
            if config.retention_window:  # the window branch's K/V, H heads (retention repeats K/V heads)
                kv += 2 * H * K * min(context, int(config.retention_window)) * kv_bytes
        else:
            held = context if t == "full_attention" else min(context, int(config.attention_window))
            kv += 2 * config.kv_heads * K * held * kv_bytes
            per_token += 2 * config.kv_heads * K * kv_bytes if held == context else 0
    return {"state": state, "kv": kv, "total": state + kv, "per_token": per_token}


# Architecture fields a saved model's config.json may hold, bounded before anything is allocated: a
# crafted config.json (num_hidden_layers: 10000000) would otherwise build layers until memory runs out.
_SAVED_BOUNDS = {"hidden_size": 65536, "num_hidden_layers": 1024, "num_attention_heads": 1024,
                 "num_key_value_heads": 1024, "intermediate_size": 1 << 18, "vocab_size": 1 << 21,
                 "max_position_embeddings": 1 << 22, "value_factor": 8, "chunk_size": MAX_CHUNK_SIZE}


def check_saved_model(folder: Any) -> dict[str, Any]:
    """Refuse a saved model folder before loading it: every entry a regular file (a symlink to
    ``/dev/zero`` or a FIFO would be read or hashed forever), ``config.json`` read with a byte bound, its
    width/depth fields integers within :data:`_SAVED_BOUNDS`, and a RetNet student within
    :data:`MAX_NON_EMBEDDING_PARAMS`. Returns the config dict; errors name the file and the key."""
    from pathlib import Path


    folder = Path(folder)
    check_regular_files(folder)
    path = folder / "config.json"
    cfg = read_json_bounded(path, what="model config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the top level must be a JSON object, got {type(cfg).__name__}")
    for name, hi in _SAVED_BOUNDS.items():
        v = cfg.get(name)
        if v is None:
            continue
        if type(v) is not int or not 1 <= v <= hi:
            raise ValueError(f"{path}: key '{name}' is {v!r:.40}, outside [1, {hi}]: not a model this pipeline "
                             "builds (a crafted or corrupt config.json?); re-save the model or pick another checkpoint")
    if cfg.get("model_type") == "retnet":
        fields = {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256, "value_factor": 2,
                  **{k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "value_factor")
                     if k in cfg}}
        n = non_embedding_params(fields)
        if n > MAX_NON_EMBEDDING_PARAMS:
            raise ValueError(f"{path}: {n:,} non-embedding parameters (hidden_size x num_hidden_layers x "
                             f"intermediate_size) is above the bound {MAX_NON_EMBEDDING_PARAMS:,} of a student")
    return cfg
