"""Device choice: CUDA when present, else CPU; overridable by config or ``--device``."""

from __future__ import annotations

import os


def pick_device(requested: str = "auto") -> "torch.device":  # noqa: F821
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available; use --device cpu")
        # Fragmentation at vocab 128k is the usual OOM; the allocator handles it when told early.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return torch.device(requested)
