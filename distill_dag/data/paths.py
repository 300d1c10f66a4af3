"""Finding the JSONL inputs of a stage: files, directories (optionally recursive) and globs.

Names starting with ``_`` or ``.`` are bookkeeping (rejects, progress, caches, locks) and are never
inputs. The tokenize stage also never reads its own output tree: with the output directory inside
an input directory, the files under it are left out (:func:`discover_inputs` reports them).

Nothing that looks like an input is dropped without a word: a ``*.jsonl`` that is a dangling link or
not a regular file (a FIFO, a device), and a ``*.jsonl.gz`` (or another ``*.jsonl.<suffix>``), are
returned as :class:`Skipped` with the reason, and every stage lists them in its report. Compressed
files are not read: the inputs' sha256 (the cache and build keys, the manifest) is of the bytes read.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from distill_dag.io import describe_path, sha256_file

COMPRESSED = frozenset({".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip", ".7z"})


def _hidden(rel: Path) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.parts)


@dataclass(frozen=True)
class Skipped:
    """A path that looks like an input but is not read, and why."""

    path: Path
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def skip_reason(q: Path) -> str | None:
    """Why ``q`` (named like an input) is not read, or None when it is a readable ``*.jsonl`` file."""
    name = q.name
    if name.endswith(".jsonl"):
        if q.is_symlink() and not q.exists():
            return f"a dangling symbolic link (to {os.readlink(q)}): its target does not exist"
        if not q.is_file():
            return f"{describe_path(q) if not q.is_symlink() else 'a link to ' + describe_path(q.resolve())}, not a regular file"
        return None
    stem, dot, suffix = name.rpartition(".")
    if dot and stem.endswith(".jsonl"):
        return _compressed(suffix) if f".{suffix.lower()}" in COMPRESSED else f"named *.jsonl.{suffix}, not *.jsonl: not read"
    return None


def _compressed(suffix: str) -> str:
    return (f"compressed (.{suffix}): not read, only plain JSONL is; decompress it (e.g. gunzip / unxz / zstd -d) "
            "to include it")


def scan_jsonl_paths(spec: str | os.PathLike, recursive: bool = True,
                     base: Path | None = None) -> tuple[list[Path], list[Skipped]]:
    """A file, a directory (``*.jsonl`` inside, recursively if asked) or a glob -> (sorted files, skipped).

    Names starting with ``_`` or ``.`` (bookkeeping: rejects, progress, caches) are neither read nor
    reported. ``skipped``: what looks like an input and is not read (:func:`skip_reason`), including
    ``spec`` itself when it exists but is no regular file or folder (a FIFO, a dangling link).
    """
    p = Path(spec)
    if not p.is_absolute() and base is not None:
        p = base / p
    if p.is_file():  # named explicitly: any name but a compressed one is read as JSONL
        if p.suffix.lower() in COMPRESSED:
            return [], [Skipped(p, _compressed(p.suffix[1:]))]
        return [p], []
    files: list[Path] = []
    skipped: list[Skipped] = []
    if p.is_dir():
        for q in (p.rglob("*") if recursive else p.glob("*")):
            if _hidden(q.relative_to(p)) or (q.is_dir() and not q.is_symlink()):
                continue
            why = skip_reason(q)
            if why is None and q.name.endswith(".jsonl"):
                files.append(q)
            elif why is not None:
                skipped.append(Skipped(q, why))
        return sorted(files), sorted(skipped, key=lambda x: x.path)
    if os.path.lexists(p):  # neither a regular file nor a folder: a FIFO, a device, a dangling link
        why = skip_reason(p) if p.name.endswith(".jsonl") else None
        return [], [Skipped(p, why or f"{describe_path(p)}, not a regular file or folder")]
    patterns = [str(p)] + ([f"{p}.*"] if str(p).endswith(".jsonl") else [])  # the .jsonl.gz beside the .jsonl
    hits = {Path(h) for pat in patterns for h in globlib.glob(pat, recursive=recursive)}
    for h in hits:
        if h.name.startswith(("_", ".")) or (h.is_dir() and not h.is_symlink()):
            continue
        why = skip_reason(h)
        if why is None and h.is_file():
            files.append(h)
        elif why is not None:
            skipped.append(Skipped(h, why))
    return sorted(files), sorted(skipped, key=lambda x: x.path)


def resolve_jsonl_paths(spec: str | os.PathLike, recursive: bool = True, base: Path | None = None) -> list[Path]:
    """The files of :func:`scan_jsonl_paths` (what is skipped is not returned: use that to report it)."""
    return scan_jsonl_paths(spec, recursive, base)[0]


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
    the files left out because they lie in the output tree; and what looks like an input but is not read
    (dangling links, FIFOs, compressed files: :func:`skip_reason`)."""

    files: list[InputFile]
    output_inside: list[Path]
    excluded: list[Path]
    skipped: list[Skipped] = field(default_factory=list)

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
    skipped: list[Skipped] = []
    for spec in specs:
        if not os.path.lexists(spec):
            raise FileNotFoundError(f"input {spec} does not exist (give a JSONL file or a directory of them)")
        p = Path(spec).resolve()
        if p.is_dir():
            roots.append(p)
        elif p.is_file():
            roots.append(p.parent)
        else:  # a FIFO would block the run, a device never ends: an input is a regular file or a folder
            raise ValueError(f"input {spec} is {describe_path(spec)}, not a regular file or a folder: it cannot be "
                             "read as JSONL (give a .jsonl file or a directory of them)")
        if out is not None and is_within(p, out):
            raise ValueError(f"input {spec} is inside the output directory {out}: the run would read what it "
                             "writes. Give an output directory outside the inputs")
        if out is not None and recursive and p.is_dir() and is_within(out, p):
            inside.append(p)
        got, skip = scan_jsonl_paths(p, recursive=recursive)
        for f in got:
            (excluded if out is not None and is_within(f.resolve(), out) else files).append(f)
        skipped += [s for s in skip if out is None or not is_within(s.path.parent.resolve(), out)]
    files = sorted(set(files))
    root = Path(os.path.commonpath([str(r) for r in roots])) if roots else Path(".")
    found = [InputFile(f.relative_to(root).as_posix(), f, sha256_file(f), f.stat().st_size) for f in files]
    return Discovered(sorted(found, key=lambda x: x.key), inside, sorted(set(excluded)),
                      sorted(set(skipped), key=lambda x: x.path))
