"""Loading the teacher: a Hugging Face causal LM by hub name or local path, optional peft adapter.

Used by the direct provider, the teacher server, teacher finetuning and evaluation alike.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from distill_dag.config import TeacherConfig


def attn_implementation() -> str:
    """flash-attention 2 when it is installed and CUDA is there, SDPA otherwise (the CPU path)."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def teacher_dtype(cfg: TeacherConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_tiny_teacher(vocab_size: int, init_tiny: dict[str, Any], seed: int = 0) -> "torch.nn.Module":
    """A random-init tiny ``LlamaForCausalLM`` (the demo teacher before it is finetuned)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(max_position_embeddings=4096, tie_word_embeddings=True)
    kw.update(init_tiny)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **kw))


def load_teacher(
    cfg: TeacherConfig,
    device: torch.device,
    *,
    model_path: str | Path | None = None,
    adapter_path: str | Path | None = None,
    trainable: bool = False,
) -> "torch.nn.Module":
    """Load the teacher model (``model_path`` overrides ``cfg.model_name_or_path``) with its adapter.

    Frozen and in eval mode unless ``trainable``; bf16 on CUDA, fp32 on CPU unless ``cfg.dtype``.
    """
    from transformers import AutoModelForCausalLM

    name = str(model_path or cfg.model_name_or_path or "")
    if not name:
        raise ValueError("teacher.model_name_or_path is not set (and no finetuned teacher path was given)")
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=teacher_dtype(cfg, device), attn_implementation=attn_implementation()
    )
    adapter = adapter_path or cfg.adapter_path
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    model.to(device)
    if not trainable:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def finetuned_teacher(cfg: Any) -> tuple[Path | None, Path | None]:
    """(model dir, adapter dir) written by ``teacher_adapters`` when it ran, else (None, None).

    ``full`` finetuning writes ``final_model/``; ``lora`` writes ``final_adapter/``. An explicit
    ``teacher.adapter_path`` in the config wins over the finetuned adapter.
    """
    root = cfg.teacher_ft_dir
    model, adapter = root / "final_model", root / "final_adapter"
    return (model if model.is_dir() else None,
            adapter if adapter.is_dir() and not cfg.teacher.adapter_path else None)
