"""Helpers shared by tests (importable as ``support``: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path


def stdlib_jsonl(path: Path, max_bytes: int, start: int = 0) -> Path:
    """Write stdlib modules (sorted, UTF-8 ones) as JSONL documents: a real, deterministic corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in sorted(root.glob("*.py"))[start:]:
            try:
                text = p.read_text(encoding="utf-8")[:8000]
            except (UnicodeDecodeError, OSError):
                continue
            f.write(json.dumps({"id": p.name, "text": text, "source": "stdlib"}) + "\n")
            total += len(text)
            if total >= max_bytes:
                break
    return path
