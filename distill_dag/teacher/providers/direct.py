"""The direct teacher: a Hugging Face causal LM in this process, scored without gradients.

``topk`` runs one forward over ``input_ids`` [B, T] and returns, per position, the top-k of
``log_softmax(logits)`` over the FULL vocabulary in fp32 (the model itself runs in bf16 on CUDA,
fp32 on the CPU), sorted descending: position ``t`` is the distribution of token ``t + 1``.

Packed rows: ``position_ids`` restart at 0 at every document start. We pass them with
``attention_mask=None`` so that transformers builds a per-document causal mask from them
(``find_packed_sequence_indices``): a token never attends to the previous document. Padding sits at
the end of a row, so causality already keeps it out of every real position.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from distill_dag.io import sha256_dir
from distill_dag.loss.topk import TeacherTopK
from distill_dag.safe_read import sha256_regular
from distill_dag.teacher.model import load_teacher


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Content hash of a model's weights (names, dtypes, shapes, bytes), for in-memory teachers."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _path_sha256(p: str | Path) -> str | None:
    """The content hash of a local teacher (folder or file); None for a Hub name (nothing local).

    Bounded: a path that exists but is not a regular file or folder (a FIFO, a link to ``/dev/zero``) is
    refused naming it, instead of hashed forever or passed over as a Hub name."""

    p = Path(p)
    if p.is_dir():
        return sha256_dir(p)
    if os.path.lexists(p):
        return sha256_regular(p, what="teacher weights file")
    return None


class DirectTeacher:
    """Top-k of a causal LM held in memory.

    Args:
        model: a causal LM whose ``forward(input_ids, position_ids=...)`` returns ``.logits`` [B, T, V].
        k: how many entries per position.
        device: where the model runs (batches are moved there).
        name: model id for ``identity()`` (hub name or local path); ``adapter_path`` likewise.
        chunk_tokens: positions per log_softmax/top-k chunk, so the fp32 copy of the logits never
            exceeds ``chunk_tokens x V`` (at vocab 128k a [B*T, V] fp32 tensor is the memory peak).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        k: int,
        device: torch.device | str = "cpu",
        *,
        name: str | None = None,
        adapter_path: str | Path | None = None,
        chunk_tokens: int = 2048,
    ) -> None:
        self.model = model
        self.k = int(k)
        self.device = torch.device(device)
        self.name = name
        self.adapter_path = str(adapter_path) if adapter_path else None
        self.chunk_tokens = chunk_tokens
        cfg = getattr(model, "config", None)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"teacher k={self.k} must be in [1, vocab_size={self.vocab_size}]")
        self._identity: dict[str, Any] | None = None

    @classmethod
    def from_config(
        cls,
        teacher_cfg: Any,
        k: int,
        device: torch.device | str,
        *,
        model_path: str | Path | None = None,
        adapter_path: str | Path | None = None,
    ) -> "DirectTeacher":
        """Load with :func:`distill_dag.teacher.model.load_teacher` (frozen, eval, bf16 on CUDA)."""

        device = torch.device(device)
        model = load_teacher(teacher_cfg, device, model_path=model_path, adapter_path=adapter_path)
        return cls(
            model,
            k,
            device,
            name=str(model_path or teacher_cfg.model_name_or_path),
            adapter_path=adapter_path or teacher_cfg.adapter_path,
        )

    @torch.no_grad()
    def topk(self, batch: dict[str, torch.Tensor]) -> TeacherTopK:
        """``batch["input_ids"]`` [B, T] (and optional ``position_ids`` [B, T]) -> TeacherTopK [B, T, k] on CPU."""
        input_ids = batch["input_ids"].to(self.device, torch.long)
        pos = batch.get("position_ids")
        kw: dict[str, Any] = {"use_cache": False}
        if pos is not None:
            kw["position_ids"] = pos.to(self.device, torch.long)
        logits = self.model(input_ids=input_ids, **kw).logits  # [B, T, V]
        B, T, V = logits.shape
        flat = logits.reshape(B * T, V)
        idx_out = torch.empty(B * T, self.k, dtype=torch.long, device=self.device)
        lp_out = torch.empty(B * T, self.k, dtype=torch.float32, device=self.device)
        for s in range(0, B * T, self.chunk_tokens):
            # fp32 before the softmax: bf16 log-probs carry ~3 significant digits, not enough for KL
            lp = torch.log_softmax(flat[s : s + self.chunk_tokens].float(), dim=-1)
            v, i = lp.topk(self.k, dim=-1, sorted=True)
            lp_out[s : s + self.chunk_tokens] = v
            idx_out[s : s + self.chunk_tokens] = i
        return TeacherTopK(idx_out.reshape(B, T, self.k).cpu(), lp_out.reshape(B, T, self.k).cpu())

    def identity(self) -> dict[str, Any]:
        """Model id + hash of its weights (local dir, hub commit, or in-memory state) + adapter hash."""
        if self._identity is None:
            base = getattr(self.model, "get_base_model", None)
            model = base() if callable(base) and self.adapter_path else self.model
            weights = None
            if self.name and Path(self.name).exists():
                weights = _path_sha256(self.name)
            if weights is None:
                commit = getattr(getattr(model, "config", None), "_commit_hash", None)
                weights = f"hub:{commit}" if commit and self.name else state_dict_sha256(self.model)
            self._identity = {
                "provider": "direct",
                "model": self.name or type(model).__name__,
                "weights_sha256": weights,
                "adapter": self.adapter_path,
                "adapter_sha256": _path_sha256(self.adapter_path) if self.adapter_path else None,
                "vocab_size": self.vocab_size,
            }
        return dict(self._identity)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
