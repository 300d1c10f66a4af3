"""``make_teacher``: the one place that turns a config into a teacher provider.

``train.teacher_mode`` picks it: ``direct`` (the model in this process), ``cached`` (the logit cache
of ``logit_cache.dir``), ``network`` (``teacher.api``: ``topk`` for ``distill serve-teacher``, ``vllm``
for a stock vLLM server). The vocabulary is checked against the student's before any forward.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from distill_dag.loss.topk import TeacherError, TeacherProvider, check_vocab


def _teacher_config(name: str | Path | None) -> Any:
    """The teacher's config from its config.json, without loading weights (None when unknown: no name, an
    offline hub name, an odd path; callers then check after loading, or have nothing to warn about)."""
    if not name:
        return None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(name))
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return getattr(cfg, "text_config", None) or cfg


def _config_vocab(name: str | Path | None) -> int | None:
    """The teacher's vocab size from its config.json (None if unknown)."""
    return int(getattr(_teacher_config(name), "vocab_size", 0) or 0) or None


def teacher_max_positions(name: str | Path | None) -> int | None:
    """The teacher's ``max_position_embeddings`` from its config.json (None when unknown or not a local/cached
    model)."""
    n = getattr(_teacher_config(name), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def length_warning(name: str | Path | None, seq_len: int) -> str | None:
    """A warning when packed rows are longer than the teacher was trained for: its logits past
    ``max_position_embeddings`` are extrapolation, and the student learns them as targets."""
    n = teacher_max_positions(name)
    if n is None or seq_len <= n:
        return None
    return (f"warning: rows of {seq_len} tokens (tokenize.max_seq_length) are longer than the teacher {name}'s "
            f"max_position_embeddings {n}: its logits past position {n} are extrapolated, and the student learns "
            f"them; preprocess with --max-seq-length {n} or less, or use a teacher with a longer context")


URL_ENV = "DISTILL_TEACHER_URL"


def teacher_url(t: Any) -> str:
    """The network teacher's base URL: ``DISTILL_TEACHER_URL`` when set (the Dagster code location, the CLI and
    the cache stage alike), else ``teacher.url``."""
    return os.environ.get(URL_ENV, "").strip() or t.url


def make_teacher(
    cfg: Any,
    device: torch.device | str,
    student_vocab: int | None,
    *,
    model_path: str | Path | None = None,
    adapter_path: str | Path | None = None,
) -> TeacherProvider:
    """The provider for ``cfg.train.teacher_mode`` with ``k = cfg.train.teacher_topk``.

    ``model_path`` / ``adapter_path`` override ``teacher.model_name_or_path`` / ``teacher.adapter_path``
    (e.g. the output of ``teacher_adapters``). ``student_vocab=None`` skips the vocab check (caching).
    """
    mode, k, t = cfg.train.teacher_mode, cfg.train.teacher_topk, cfg.teacher
    token = os.environ.get(t.token_env) or None
    if mode == "direct":
        from distill_dag.teacher.providers.direct import DirectTeacher  # lazy: only the configured provider's dependencies load

        name = model_path or t.model_name_or_path
        if not name:
            raise TeacherError(
                "teacher.model_name_or_path is not set and no teacher model path was given: finetune the teacher "
                "first (`distill finetune-teacher`) or set teacher.model_name_or_path"
            )
        v = _config_vocab(name)
        if v is not None and student_vocab is not None:
            check_vocab(v, student_vocab)
        teacher: Any = DirectTeacher.from_config(t, k, device, model_path=name, adapter_path=adapter_path)
    elif mode == "cached":
        from distill_dag.teacher.providers.cached import CachedTeacher  # lazy: only the configured provider's dependencies load

        teacher = CachedTeacher(cfg.cache_dir, cfg.tokenized_dir, k, verify=cfg.logit_cache.verify)
    elif mode == "network":
        if t.api == "topk":
            from distill_dag.teacher.providers.network import NetworkTeacher  # lazy: only the configured provider's dependencies load

            teacher = NetworkTeacher(teacher_url(t), k, t.timeout_s, t.max_retries, t.backoff_s, t.batch_rows, token)
        else:
            from distill_dag.teacher.providers.vllm import VLLMTeacher  # lazy: only the configured provider's dependencies load

            # vLLM does not report the vocabulary: read it from the teacher's config, else trust the student's
            vocab = _config_vocab(model_path or t.model_name_or_path) or student_vocab
            teacher = VLLMTeacher(teacher_url(t), k, t.timeout_s, t.max_retries, t.backoff_s, t.batch_rows, token,
                                  model=t.vllm_model, vocab_size=vocab)
    else:  # pragma: no cover - the config's Literal forbids it
        raise TeacherError(f"train.teacher_mode {mode!r} is not one of direct, cached, network")
    if student_vocab is not None:
        try:
            check_vocab(teacher.vocab_size, student_vocab)
        except TeacherError:
            teacher.close()
            raise
    return teacher
