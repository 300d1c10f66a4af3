"""Reading whole files whose size we do not control: configs, ``base:`` files, checkpoints' JSON, weights
we hash.

``stat().st_size`` says nothing about what ``read()`` will return: ``/dev/zero`` reports 0 bytes and never
ends, a FIFO reports 0 and blocks until a writer comes, ``/proc`` files report 0 and hold text. So every
read here

- opens with ``O_NONBLOCK`` (a FIFO without a writer opens at once instead of blocking) and checks on the
  open descriptor (``fstat``, no race with a rename) that it is a regular file, after following
  symlinks: a symlink to ``/dev/zero`` is refused as a character device;
- reads at most ``limit + 1`` bytes, so a file that grows past the bound while we read (or lies about its
  size) is refused without being held in memory.

Every error is an :class:`UnsafeFileError` (a ``ValueError``) whose message starts with the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 << 20  # a checkpoint's config.json / run.json / checksums.json is kilobytes
MAX_WEIGHTS_BYTES = 1 << 40  # hashing stops past 1 TiB: no weights file we produce comes near it
_CHUNK = 1 << 20


class UnsafeFileError(ValueError):
    """A file that is not a regular file, is larger than its bound, or cannot be read; names the path."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, what: str = "file") -> int:
    """A read-only descriptor of ``path`` (symlinks followed), refused unless it is a regular file.

    ``O_NONBLOCK`` keeps the open itself from blocking on a FIFO; it is cleared again once the file is
    known to be regular (it has no effect on regular files anyway)."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise UnsafeFileError(f"{p}: is a directory, not a {what}") from None
    except OSError as err:
        raise UnsafeFileError(f"{p}: cannot open the {what} ({err.strerror or err})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{p}: {_kind(st.st_mode)}, not a regular file; give the path of a real {what} "
                                  "(a symlink is followed to what it points at)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The whole content of the regular file ``path``, refused (naming it) above ``limit`` bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafeFileError(f"{os.fspath(path)}: {size:,} bytes is too large for a {what} (limit {limit:,})")
        parts, got = [], 0
        while True:
            block = os.read(fd, min(_CHUNK, limit + 1 - got))
            if not block:
                break
            parts.append(block)
            got += len(block)
            if got > limit:  # it grew while we read, or its size lied
                raise UnsafeFileError(f"{os.fspath(path)}: more than {limit:,} bytes (it grew while being read); "
                                      f"too large for a {what}")
        return b"".join(parts)
    except OSError as err:
        raise UnsafeFileError(f"{os.fspath(path)}: cannot read the {what} ({err.strerror or err})") from None
    finally:
        os.close(fd)


def read_text_bounded(path: str | os.PathLike, limit: int, what: str = "file") -> str:
    data = read_bounded(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnsafeFileError(f"{os.fspath(path)}: not UTF-8 text (byte {err.start}): not a {what}") from None


def read_json_bounded(path: str | os.PathLike, limit: int = MAX_JSON_BYTES, what: str = "JSON file") -> Any:
    text = read_text_bounded(path, limit, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise UnsafeFileError(f"{os.fspath(path)}: not valid JSON ({err})") from None


def sha256_regular(path: str | os.PathLike, limit: int = MAX_WEIGHTS_BYTES, what: str = "file") -> str:
    """sha256 of a regular file of at most ``limit`` bytes; a device, FIFO or endless file is refused
    instead of hashed forever."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafeFileError(f"{os.fspath(path)}: {size:,} bytes is above the {limit:,} bytes a {what} may have")
        h, got = hashlib.sha256(), 0
        while block := os.read(fd, _CHUNK):
            got += len(block)
            if got > limit:
                raise UnsafeFileError(f"{os.fspath(path)}: more than {limit:,} bytes (it grew while being hashed)")
            h.update(block)
        return h.hexdigest()
    except OSError as err:
        raise UnsafeFileError(f"{os.fspath(path)}: cannot read the {what} ({err.strerror or err})") from None
    finally:
        os.close(fd)


def check_regular_files(folder: str | os.PathLike, limit: int = MAX_WEIGHTS_BYTES) -> None:
    """Every entry of ``folder`` (not recursive) is a regular file (symlinks followed) or a folder, and
    none is above ``limit`` bytes: what a loader may then open and read to the end."""
    for p in sorted(Path(folder).iterdir()):
        try:
            st = p.stat()
        except OSError as err:
            raise UnsafeFileError(f"{p}: cannot stat it ({err.strerror or err}); a dangling symlink?") from None
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{p}: {_kind(st.st_mode)}, not a regular file; a checkpoint folder holds only "
                                  "files (a symlink is followed to what it points at): replace it with the real file")
        if st.st_size > limit:
            raise UnsafeFileError(f"{p}: {st.st_size:,} bytes is above the {limit:,} bytes a checkpoint file may have")
