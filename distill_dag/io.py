"""Files written by every stage: atomic writes and content hashes (one implementation for all)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` as a whole.

    An existing ``path`` is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(DIR_MODE)
    try:
        yield tmp
        # the files' data must be on disk before the name is: else a power cut can leave a complete-looking
        # directory of empty files
        for f in sorted(tmp.rglob("*")):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}):
            _fsync_dir(d)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
