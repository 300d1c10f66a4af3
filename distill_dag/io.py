"""Files written by every stage: atomic writes and content hashes (one implementation for all)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from distill_dag.safe_read import read_bounded, read_json_bounded, sha256_regular

# mkstemp/mkdtemp create 0600 files and 0700 folders; what we publish gets the modes open() and
# mkdir() would give (the process umask), so others sharing a data root or run folder can read it
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync and rename it over ``path``.

    A reader never sees a half-written file: either the old file or the whole new one. On error the
    temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


# ---- owned output folders ---------------------------------------------------------------------
# Every folder this package publishes whole (atomic_dir) or writes in place (claim_dir) carries this
# file. A folder is replaced or cleaned only when it is ours: a mistyped --output (the input's parent,
# the current folder, a home directory) must never be renamed away and deleted.
MARKER = ".distill-dag.json"
# the same bytes in every folder: outputs are copied into one another (a checkpoint's files into final/,
# a tokenizer into a checkpoint) and hashed into data versions, so the marker names the writer only
MARKER_BYTES = (json.dumps({"written_by": "distill-dag", "marker_version": 1}, sort_keys=True) + "\n").encode()
# files of folders that earlier versions published before the marker existed (see _legacy_ours)
_CHECKSUMS = "checksums.json"
_UNLISTED = frozenset({_CHECKSUMS, "README.md", "model_card.json", "source.json"})
_TOKENIZER_META = "distill_tokenizer.json"
_TOKENIZER_FILES = frozenset({_TOKENIZER_META, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                              "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                              "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model"})
_WEIGHTS_FILES = _TOKENIZER_FILES - {_TOKENIZER_META} | {
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "adapter_config.json", "adapter_model.safetensors", "README.md"}
_SHARDED_WEIGHTS = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_WEIGHTS_KEYS = ("final_adapter", "final_model", "merged_model")  # teacher_finetune's metrics.json


class ForeignOutputError(FileExistsError):
    """An output path exists and is not a folder this package wrote: refused, nothing was deleted."""


def _has_marker(d: Path) -> bool:
    m = d / MARKER
    try:  # bounded: our marker is a few dozen bytes, a huge or endless file of that name is not ours
        return not m.is_symlink() and json.loads(read_bounded(m, 4096, "marker")).get("written_by") == "distill-dag"
    except (OSError, ValueError, AttributeError):  # UnsafeFileError is a ValueError
        return False


def _plain_files(d: Path) -> dict[str, Path] | None:
    """The folder's entries when every one is a regular file (no subfolder, link, pipe); else None."""
    out = {}
    for p in d.iterdir():
        if p.is_symlink() or not p.is_file():
            return None
        out[p.name] = p
    return out


def _read_json(p: Path) -> object:
    """A small JSON index file of ours, or None: bounded and regular-file only (a FIFO named
    ``metrics.json`` must not block the ownership check, nor a huge file fill memory)."""

    try:
        return read_json_bounded(p, 16 << 20, "JSON index")
    except (OSError, ValueError):
        return None


def _legacy_ours(d: Path) -> bool:
    """A folder published by a version of this package that wrote no marker, recognised conservatively:
    only regular files, no subfolder, and one of our own index files accounting for all of them:

    - ``checksums.json`` (checkpoints, ``final/``) lists every file but itself and the model card's
      ``README.md`` / ``model_card.json`` / ``source.json``, which are written after it;
    - ``distill_tokenizer.json`` (a tokenizer folder) with its ``key`` and ``hash``, and only the files
      ``save_pretrained`` writes for a tokenizer;
    - teacher finetuning's weights folders: only weight, config and tokenizer files, and the run's
      ``metrics.json`` beside the folder names it as its ``final_adapter`` / ``final_model`` /
      ``merged_model``.

    Anything else (a README of the user's, a data folder, a model folder saved by hand) is not ours.
    """
    files = _plain_files(d)
    if not files:
        return False
    if _CHECKSUMS in files:
        sums = _read_json(files[_CHECKSUMS])
        return isinstance(sums, dict) and all(n in sums or n in _UNLISTED for n in files)
    if _TOKENIZER_META in files:
        meta = _read_json(files[_TOKENIZER_META])
        return (isinstance(meta, dict) and {"key", "hash"} <= set(meta)
                and all(n in _TOKENIZER_FILES for n in files))
    if all(n in _WEIGHTS_FILES or _SHARDED_WEIGHTS.fullmatch(n) for n in files):
        metrics = _read_json(d.parent / "metrics.json")
        return isinstance(metrics, dict) and any(
            isinstance(metrics.get(k), str) and Path(metrics[k]).name == d.name for k in _WEIGHTS_KEYS)
    return False


def describe_path(path: str | os.PathLike) -> str:
    """What a path that is not a folder is, in words (for refusals)."""
    import stat

    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link (to {os.readlink(path)})" + ("" if path.exists() else ", dangling")
    for test, what in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(st.st_mode):
            return what
    return "not a regular file or folder"


def ownership(path: str | os.PathLike, legacy: Callable[[Path], bool] | None = None) -> str:
    """``"missing"``, ``"empty"``, ``"ours"`` (marker), ``"legacy"`` (:func:`_legacy_ours` or the
    caller's ``legacy`` test) or ``"foreign"`` (anything else: a file, a link, a folder of other files)."""
    p = Path(path)
    if not os.path.lexists(p):
        return "missing"
    if p.is_symlink() or not p.is_dir():
        return "foreign"
    if _has_marker(p):
        return "ours"
    if next(p.iterdir(), None) is None:
        return "empty"
    if _legacy_ours(p) or (legacy is not None and legacy(p)):
        return "legacy"
    return "foreign"


def check_ours(path: str | os.PathLike, what: str, legacy: Callable[[Path], bool] | None = None) -> str:
    """Refuse (:class:`ForeignOutputError`, nothing touched) an existing ``path`` this package may not
    replace or clean; return its :func:`ownership` otherwise. ``what`` names the writer in the message."""
    p = Path(path)
    state = ownership(p, legacy)
    if state != "foreign":
        return state
    if p.is_symlink() or not p.is_dir():
        raise ForeignOutputError(
            errno.EEXIST, f"{what}: the output {p} exists and is {describe_path(p)}, not a folder written by distill-dag; "
            "nothing was changed. Give an output path that does not exist yet (or remove that one yourself)", str(p))
    shown = sorted(q.name for q in p.iterdir())
    more = f", ... ({len(shown)} entries)" if len(shown) > 5 else ""
    raise ForeignOutputError(
        errno.EEXIST, f"{what}: the output folder {p} is not empty and was not written by distill-dag (it holds "
        f"{', '.join(shown[:5])}{more} and no {MARKER}); replacing it would delete those files, so nothing was "
        "changed. Give an output path that does not exist yet or an empty folder; if it is the output of an "
        f"earlier distill-dag version, delete it, or adopt it with: echo '{MARKER_BYTES.decode().strip()}' > "
        f"{p / MARKER}", str(p))


def claim_dir(path: str | os.PathLike, what: str, legacy: Callable[[Path], bool] | None = None) -> Path:
    """Make ``path`` an output folder of ours that a stage then writes in place: create it (or take an
    empty or legacy one) and mark it; a folder of foreign files is refused (:func:`check_ours`)."""
    p = Path(path)
    if p.is_symlink() and p.is_dir():  # written in place, so a linked folder (data on another disk) is fine
        p = p.resolve()
    state = check_ours(p, what, legacy)
    p.mkdir(parents=True, exist_ok=True)
    if state != "ours":
        write_bytes_atomic(p / MARKER, MARKER_BYTES)
    return p


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, what: str = "distill-dag") -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` as a whole, marked ours.

    An existing ``path`` is replaced only when it is ours (:func:`check_ours`: marked, empty, or
    written by an earlier version): anything else is refused before the body runs, and again just before
    the rename, and nothing is deleted. The replaced folder is moved aside first and deleted only after
    the new one is in place. ``what`` names the writer in a refusal.
    """
    path = Path(path)
    check_ours(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(DIR_MODE)
    try:
        yield tmp
        (tmp / MARKER).unlink(missing_ok=True)  # a copied-in marker (same bytes) is written afresh below
        (tmp / MARKER).write_bytes(MARKER_BYTES)
        (tmp / MARKER).chmod(FILE_MODE)
        # the files' data must be on disk before the name is: else a power cut can leave a complete-looking
        # directory of empty files
        for f in sorted(tmp.rglob("*")):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}):
            _fsync_dir(d)
        old = None
        if check_ours(path, what) != "missing":  # it may have appeared while the body ran
            old = path.with_name(f".{path.name}.old")
            if os.path.lexists(old):
                # a crash's leftover of an earlier replace: deleted only when it is ours as well
                check_ours(old, what)
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike, what: str = "file") -> str:
    """sha256 of a regular file (symlinks followed), bounded: a FIFO, a device (a link to ``/dev/zero``) or
    a file past :data:`~distill_dag.safe_read.MAX_WEIGHTS_BYTES` is refused at once, naming the path
    (:class:`~distill_dag.safe_read.UnsafeFileError`, a ``ValueError``), instead of being hashed forever.
    A read error (EIO) is refused the same way, naming the path, which ``read()``'s own error does not."""

    return sha256_regular(path, what=what)


def sha256_dir(path: str | os.PathLike) -> str:
    """Content hash of a directory: relative file names and file hashes, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def remove_temp_files(directory: str | os.PathLike, stems: set[str] | None = None) -> None:
    """Delete the ``.<name>.<random>.tmp`` files that a killed run's :func:`atomic_path` left behind
    (only those of files named ``<stem>.*`` when ``stems`` is given: other workers' live writes stay)."""
    for p in Path(directory).glob(".*.tmp"):
        if stems is not None and not any(p.name.startswith(f".{stem}.") for stem in stems):
            continue
        if p.is_file():
            p.unlink(missing_ok=True)


# ---- one writer per directory ------------------------------------------------------------------
LOCK = ".lock"


class DirectoryLockedError(RuntimeError):
    """Another process is writing the directory (it holds ``<dir>/.lock``)."""


@contextlib.contextmanager
def dir_lock(directory: str | os.PathLike, shared: bool = False, what: str = "run") -> Iterator[Path]:
    """Hold ``<directory>/.lock`` (``fcntl.flock``) for the duration: exclusive, or ``shared`` with
    other shared holders (e.g. workers that each fill their own cache files) but not with an
    exclusive one. Never waits: a held lock raises :class:`DirectoryLockedError` naming the directory
    and, for an exclusive holder, its pid. The kernel drops the lock when the holder dies, so a
    killed run never leaves a stale lock (the pid it wrote is then simply overwritten)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            who = f"pid {holder}" if holder.isdigit() else "held shared, by workers"
            raise DirectoryLockedError(
                f"another {what} is writing {d} ({who}); wait for it to finish, or give this run another "
                f"output directory (the lock is {path}; it is released when that process ends)"
            ) from None
        os.ftruncate(fd, 0)  # a killed holder's pid is stale now
        if not shared:
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            if not shared:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# ---- disk full ---------------------------------------------------------------------------------
class DiskFullError(OSError):
    """No space left while writing ``filename``; what was published before is untouched."""


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, raised by Python (``errno``) or by pyarrow (only in the message)."""
    if not isinstance(err, OSError):
        return False
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text
