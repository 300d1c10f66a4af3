"""Device choice: CUDA when present, else CPU; overridable by config or ``--device``. Mixed precision
(``train.autocast``: :func:`autocast`). And the host allocator's setting for CPU tensors
(:func:`keep_freed_memory`, applied when the package is imported)."""

from __future__ import annotations

import os
from pathlib import Path


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


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 ``amx_bf16`` / ``avx512_bf16``, Arm ``bf16``),
    from ``/proc/cpuinfo``'s flags (False when it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    return False


def autocast_enabled(device: "torch.device", setting: str = "auto") -> bool:  # noqa: F821
    """``train.autocast``: auto = bf16 autocast on CUDA and on CPUs with native bf16 (emulated bf16 is
    slower than fp32 there), bfloat16 = on wherever torch autocasts, off = float32 throughout."""
    if setting == "off":
        return False
    if setting == "bfloat16":
        return device.type in ("cuda", "cpu")
    if setting != "auto":
        raise ValueError(f"train.autocast must be auto, bfloat16 or off, got {setting!r}")
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def autocast(device: "torch.device", setting: str = "auto") -> "torch.autocast":  # noqa: F821
    """The training forward's context: bf16 autocast when :func:`autocast_enabled` (weights, optimizer
    and the loss math stay fp32; retention runs in fp32 inside the model)."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_enabled(device, setting))


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
