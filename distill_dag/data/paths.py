"""Finding the JSONL inputs of a stage: files, directories (optionally recursive) and globs.

Names starting with ``_`` or ``.`` are bookkeeping (rejects, progress, caches, locks) and are never
inputs. The tokenize stage also never reads its own output tree: with the output directory inside
an input directory, the files under it are left out (:func:`discover_inputs` reports them).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from distill_dag.io import sha256_file


def _hidden(rel: Path) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.parts)


def resolve_jsonl_paths(spec: str | os.PathLike, recursive: bool = True, base: Path | None = None) -> list[Path]:
    """A file, a directory (``*.jsonl`` inside, recursively if asked) or a glob -> sorted files.

    Names starting with ``_`` or ``.`` (bookkeeping: rejects, progress, caches) are skipped.
    """
    p = Path(spec)
    if not p.is_absolute() and base is not None:
        p = base / p
    if p.is_file():
        return [p]
    if p.is_dir():
        it = p.rglob("*.jsonl") if recursive else p.glob("*.jsonl")
        return sorted(q for q in it if q.is_file() and not _hidden(q.relative_to(p)))
    hits = [Path(h) for h in globlib.glob(str(p), recursive=recursive)]
    return sorted(h for h in hits if h.is_file() and not h.name.startswith(("_", ".")))


def is_within(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or below it (both resolved)."""
    return path == root or root in path.parents


@dataclass
class InputFile:
    key: str  # path relative to the input root (posix): unique per file
    path: Path
    sha256: str  # of the content at discovery; the reader hashes what it reads and compares
    bytes: int

    @property
    def cache_stem(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.key)[-80:]
        return f"{safe}-{hashlib.sha256(self.key.encode()).hexdigest()[:10]}"


@dataclass
class Discovered:
    """The inputs found; the input directories that hold the output directory (read recursively);
    and the files left out because they lie in the output tree."""

    files: list[InputFile]
    output_inside: list[Path]
    excluded: list[Path]

    def warning(self, out: str | os.PathLike) -> str | None:
        if not self.output_inside:
            return None
        left = f" ({len(self.excluded)} .jsonl file(s) there left out, e.g. {self.excluded[0]})" if self.excluded else ""
        return (f"the output directory {out} is inside the input directory {self.output_inside[0]} read "
                f"recursively: its files are never read as inputs{left}. Keep outputs outside the inputs")


def discover_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], recursive: bool = True,
                    exclude: str | os.PathLike | None = None) -> Discovered:
    """JSONL files of a directory / file / list of them, keyed by path relative to their common root.

    ``exclude`` (the stage's output directory) is never read: files under it are left out and listed
    in ``excluded``. An output directory that *is* an input directory, or an input file inside the
    output, is refused (``ValueError``): the run would read what it writes.
    """
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out = Path(exclude).resolve() if exclude is not None else None
    files: list[Path] = []
    roots: list[Path] = []
    excluded: list[Path] = []
    inside: list[Path] = []
    for spec in specs:
        p = Path(spec).resolve()
        if p.is_dir():
            roots.append(p)
        elif p.is_file():
            roots.append(p.parent)
        else:
            raise FileNotFoundError(f"input {spec} does not exist (give a JSONL file or a directory of them)")
        if out is not None and is_within(p, out):
            raise ValueError(f"input {spec} is inside the output directory {out}: the run would read what it "
                             "writes. Give an output directory outside the inputs")
        if out is not None and recursive and p.is_dir() and is_within(out, p):
            inside.append(p)
        for f in resolve_jsonl_paths(p, recursive=recursive):
            (excluded if out is not None and is_within(f.resolve(), out) else files).append(f)
    files = sorted(set(files))
    root = Path(os.path.commonpath([str(r) for r in roots])) if roots else Path(".")
    found = [InputFile(f.relative_to(root).as_posix(), f, sha256_file(f), f.stat().st_size) for f in files]
    return Discovered(sorted(found, key=lambda x: x.key), inside, sorted(set(excluded)))
