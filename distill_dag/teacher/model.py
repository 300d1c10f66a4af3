"""Loading the teacher: a Hugging Face causal LM by hub name or local path, optional peft adapter.

Used by the direct provider, the teacher server, teacher finetuning and evaluation alike.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill_dag.config import TeacherConfig
from distill_dag.io import sha256_json


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


FINAL_MODEL, FINAL_ADAPTER = "final_model", "final_adapter"  # what teacher_adapters writes in teacher_ft.output_dir


def finetuned_output(cfg: Any) -> Path:
    """Where ``teacher_adapters`` writes the finetuned teacher: ``final_adapter/`` for ``teacher_ft.mode``
    lora, ``final_model/`` for full."""
    return cfg.teacher_ft_dir / (FINAL_ADAPTER if cfg.teacher_ft.mode == "lora" else FINAL_MODEL)


def finetuned_teacher(cfg: Any) -> tuple[Path | None, Path | None]:
    """(model dir, adapter dir) written by ``teacher_adapters`` when it ran, else (None, None).

    ``full`` finetuning writes ``final_model/``; ``lora`` writes ``final_adapter/``. An explicit
    ``teacher.adapter_path`` in the config wins over the finetuned adapter.
    """
    root = cfg.teacher_ft_dir
    model, adapter = root / FINAL_MODEL, root / FINAL_ADAPTER
    return (model if model.is_dir() else None,
            adapter if adapter.is_dir() and not cfg.teacher.adapter_path else None)


@dataclass(frozen=True)
class ResolvedTeacher:
    """The teacher a stage loads, as :func:`resolve_teacher` finds it."""
    model: str | Path | None  # teacher_adapters' final_model/ when it exists, else teacher.model_name_or_path
    adapter: str | None  # teacher.adapter_path, else teacher_adapters' final_adapter/ when it exists
    finetuned: bool = False  # model is teacher_adapters' final_model/

    @property
    def key(self) -> str:
        """Where ``model`` comes from, as messages name it."""
        return "the finetuned teacher (teacher_ft.output_dir)" if self.finetuned else "teacher.model_name_or_path"


def resolve_teacher(cfg: Any) -> ResolvedTeacher:
    """The teacher's model and adapter for the student stages (and the logit cache): the configured
    ``teacher.*`` with ``teacher_adapters``' output (:func:`finetuned_teacher`) filled in when it ran."""
    model_dir, adapter_dir = finetuned_teacher(cfg)
    return ResolvedTeacher(model=model_dir if model_dir is not None else cfg.teacher.model_name_or_path,
                           adapter=str(adapter_dir) if adapter_dir is not None else cfg.teacher.adapter_path,
                           finetuned=model_dir is not None)


def distillation_teacher(cfg: Any) -> ResolvedTeacher:
    """:func:`resolve_teacher` for the student stages: a run that loads the teacher in this process
    (``train.teacher_mode`` direct, not CE-only) and has none at all is refused before any work."""
    paths = resolve_teacher(cfg)
    if paths.model is None and cfg.train.teacher_mode == "direct" and not cfg.train.pretrain_ce_only:
        raise FileNotFoundError(
            f"teacher.model_name_or_path is null (a tiny demo teacher) and {cfg.teacher_ft_dir / FINAL_MODEL} "
            "does not exist: finetune the teacher first (distill finetune-teacher, or the teacher_adapters asset)"
        )
    return paths


# ---- the teacher's fingerprint: cheap identity of its files -------------------------------------------------
# Which files decide the teacher's log-probs: its config and weights (and an adapter's). Tokenizer files do
# not: the cache and the student see token ids.
_FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_FINGERPRINT_JSON = ("config.json", "adapter_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_WHOLE_BELOW = 8 << 20  # files up to this size (configs, indexes, LoRA adapters) are hashed whole
_SAMPLES, _SAMPLE_BYTES = 64, 4096  # larger weight files: this many blocks spread over the file
_MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header


def _file_fingerprint(path: Path) -> dict[str, Any]:
    """size + (whole-file sha256, or safetensors header + sampled blocks) of one regular file.

    Why samples and not only the header and sizes: a retrained teacher keeps its header (names, dtypes,
    shapes, offsets) and its size byte for byte; training changes every weight, so 64 blocks spread over
    the file differ. 256 KiB read per file instead of the whole file (GBs)."""
    import hashlib
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # /dev/zero behind a symlink would never end
            raise ValueError(f"{path} is not a regular file; a teacher's files must be regular files")
        size = st.st_size
        h = hashlib.sha256()
        if size <= _WHOLE_BELOW:
            data = os.pread(fd, size + 1, 0)
            if len(data) != size:
                raise ValueError(f"{path} changed size while it was read ({size} -> {len(data)} bytes)")
            h.update(data)
            return {"bytes": size, "sha256": h.hexdigest()}
        if path.suffix == ".safetensors":
            head = os.pread(fd, 8, 0)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path}: not a safetensors file (header length {n} for {size} bytes)")
            h.update(os.pread(fd, n, 8))
        for i in range(_SAMPLES):
            h.update(os.pread(fd, _SAMPLE_BYTES, (size - _SAMPLE_BYTES) * i // (_SAMPLES - 1)))
        return {"bytes": size, "sampled_sha256": h.hexdigest()}
    finally:
        os.close(fd)


def local_model_dir(name: str | Path | None) -> Path | None:
    """The local folder of a teacher: the path itself, or a Hub name's snapshot in the Hugging Face cache
    (no network); None when there is none."""
    if not name:
        return None
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(name).startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(name), "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: not a Hub teacher either
        return None
    return Path(found).parent if isinstance(found, str) else None


def dir_fingerprint(folder: Path) -> dict[str, Any]:
    """``{file name: _file_fingerprint}`` of the files of ``folder`` that decide a teacher's outputs."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.name in _FINGERPRINT_JSON or f.suffix in _FINGERPRINT_SUFFIXES:
            out[f.name] = _file_fingerprint(f)
    if not out:
        raise ValueError(f"{folder} holds no config.json or weights (*.safetensors, *.bin); not a model folder")
    return out


def teacher_fingerprint(model: str | Path | None, adapter: str | Path | None = None) -> dict[str, Any] | None:
    """A cheap identity of a teacher on disk: ``{"model", "adapter", "hash"}``.

    ``hash`` covers config.json, weight indexes and each weights file's size, safetensors header and sampled
    blocks (whole files below 8 MiB), of the model and of the adapter; it does not depend on where the
    folders are. ``hash`` is None when the model is not on this machine (a Hub name not in the local cache):
    then only the names are known. None when no model is given."""
    if not model:
        return None
    parts: dict[str, Any] = {}
    d = local_model_dir(model)
    if d is not None:
        parts["model"] = dir_fingerprint(d)
        if adapter:
            a = Path(adapter).expanduser()
            if not a.is_dir():
                raise FileNotFoundError(f"teacher adapter {a} (teacher.adapter_path) is not a folder")
            parts["adapter"] = dir_fingerprint(a)
    return {"model": str(model), "adapter": str(adapter) if adapter else None,
            "hash": sha256_json(parts) if parts else None}


def identity_fingerprint(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """:func:`teacher_fingerprint` of the teacher a provider's ``identity()`` names: the direct provider's model
    and adapter, or those a ``distill serve-teacher`` server reports; None when it names no model folder
    (a vLLM server, an in-memory model)."""
    if not identity:
        return None
    inner = identity.get("teacher") if isinstance(identity.get("teacher"), dict) else identity
    model, adapter = inner.get("model"), inner.get("adapter")
    if not model or local_model_dir(model) is None:
        return None
    try:
        return teacher_fingerprint(model, adapter)
    except (OSError, ValueError):  # the server's folders are not (all) visible from here
        return None
