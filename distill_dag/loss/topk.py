"""The one teacher interface. Three providers implement it: direct, cached, network.

Alignment convention: ``indices[b, t]`` / ``logprobs[b, t]`` describe the teacher's distribution for
the token AFTER position ``t`` (computed from the teacher's logits at position ``t``), exactly like a
causal LM's ``logits[b, t]``. Losses shift once, dropping the last position.

Log-probs are at temperature 1 and normalised over the FULL vocabulary (so ``exp(logprobs).sum(-1)``
is the top-k mass, <= 1). The loss applies the temperature to teacher and student alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from distill_dag.errors import TeacherError

__all__ = ["TeacherError", "TeacherProvider", "TeacherTopK", "check_vocab"]


@dataclass
class TeacherTopK:
    indices: torch.Tensor  # [B, T, k] int64, sorted by descending log-prob
    logprobs: torch.Tensor  # [B, T, k] float32, log p_teacher(token | prefix) at T=1

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def to(self, device: torch.device | str) -> "TeacherTopK":
        return TeacherTopK(self.indices.to(device), self.logprobs.to(device))


class TeacherProvider(Protocol):
    """``topk(batch)`` where ``batch`` holds ``input_ids`` [B, T] (long), ``attention_mask`` [B, T],
    ``position_ids`` [B, T] and, from the data loader, ``shard`` [B] / ``row`` [B] (long) that locate
    each row in ``tokenized_parquet`` (the cached provider reads by them)."""

    k: int
    vocab_size: int

    def topk(self, batch: dict[str, torch.Tensor]) -> TeacherTopK: ...

    def identity(self) -> dict[str, Any]:
        """What the distribution depends on (model id, adapter hash, ...), for lineage and caches."""
        ...

    def close(self) -> None: ...


def check_vocab(teacher_vocab: int, student_vocab: int) -> None:
    """Teacher and student must score the same token ids; refuse before any compute."""
    if teacher_vocab != student_vocab:
        raise TeacherError(
            f"teacher vocabulary ({teacher_vocab}) != student vocabulary ({student_vocab}): both must score the "
            "same token ids. The student's vocabulary is not set by hand (student.overrides.vocab_size is "
            "refused): it follows the tokenizer the shards were built with (tokenized_parquet's manifest.json). "
            "Set tokenizer.name_or_path to the teacher's tokenizer (its model folder or Hub name) and rebuild "
            "the data with `distill preprocess --force`, or use a teacher that shares the data's tokenizer"
        )
