"""Device choice: CUDA when present, else CPU; overridable by config or ``--device``. And the host
allocator's setting for CPU tensors (:func:`keep_freed_memory`, applied when the package is imported)."""

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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 128 << 20
TRIM_THRESHOLD = 512 << 20


def keep_freed_memory() -> bool:
    """Let glibc reuse freed CPU tensors' memory instead of unmapping it (Linux/glibc; else a no-op).

    glibc serves every block over its mmap threshold (at most 32 MiB, by default) with a fresh
    ``mmap`` and unmaps it on free, so each such tensor faults its pages in again, zeroed by the
    kernel. The demo's logits are 16 x 256 x 2048 fp32 = 32 MiB, allocated several times a step.
    ``python bench/cpu_paths.py`` prints both against glibc's defaults (2-core VM, 2026-12-02: a
    32 MiB ``empty`` + ``fill_`` 8.7x faster, the demo's LM head forward + backward 2.1x). Blocks up to ``MMAP_THRESHOLD`` now come from the heap, and up to ``TRIM_THRESHOLD``
    of free memory stays mapped at its top (RSS stays higher after a peak; the peak itself does not
    change). Set ``DISTILL_DAG_MALLOC=system`` to keep glibc's defaults. Returns whether it applied.
    """
    if os.environ.get("DISTILL_DAG_MALLOC", "").lower() == "system":
        return False
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt thresholds)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok)
    except (OSError, AttributeError):
        return False
