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

from typing import Any

from distill_dag.model.retnet import RetNetConfig

VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "350M": dict(hidden_size=1024, num_hidden_layers=15, num_attention_heads=8, intermediate_size=2048),
    "500M": dict(hidden_size=1280, num_hidden_layers=16, num_attention_heads=10, intermediate_size=2048),
}


def student_config(variant: str, vocab_size: int, **overrides: Any) -> RetNetConfig:
    """The RetNetConfig of a named variant (``tiny``, ``350M``, ``500M``), with ``overrides`` of any field."""
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


def build_student(student_cfg: Any, vocab_size: int) -> "RetNetForCausalLM":  # noqa: F821
    """A freshly initialised student from a :class:`distill_dag.config.StudentConfig` section."""
    from distill_dag.model.retnet import RetNetForCausalLM

    cfg = student_config(
        student_cfg.variant,
        vocab_size,
        **{"chunk_size": student_cfg.chunk_size, "retention_backend": student_cfg.retention_backend, **student_cfg.overrides},
    )
    model = RetNetForCausalLM(cfg)
    if student_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(config: RetNetConfig) -> dict[str, int]:
    """Parameter counts of a config, built on the meta device (no memory): embedding, per-block parts,
    LM head (0 when tied), ``total`` (unique parameters) and ``non_embedding``."""
    import torch

    from distill_dag.model.retnet import RetNetForCausalLM

    with torch.device("meta"):
        model = RetNetForCausalLM(config)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    block = model.model.layers[0]
    embedding = n(model.model.embed_tokens)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return {
        "embedding": embedding,
        "lm_head": 0 if tied else model.lm_head.weight.numel(),
        "retention_per_layer": n(block.retention) + n(block.retention_norm),
        "ffn_per_layer": n(block.ffn) + n(block.ffn_norm),
        "layers": config.num_hidden_layers,
        "blocks": n(model.model.layers),
        "final_norm": n(model.model.norm),
        "non_embedding": total - embedding - (0 if tied else model.lm_head.weight.numel()),
        "total": total,
    }
