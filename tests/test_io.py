"""Atomic writes publish files and folders with the modes plain open()/mkdir() would give (umask),
not mkstemp's private 0600 / 0700."""

from __future__ import annotations

import os

from distill_dag.io import atomic_dir, atomic_path, write_json_atomic


def test_atomic_writes_get_the_umask_modes_of_plain_files(tmp_path):
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        (tmp_path / "plain_dir").mkdir()
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        write_json_atomic(tmp_path / "b.json", {"k": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.json") == mode(plain) == 0o644
    assert mode(tmp_path / "d") == mode(tmp_path / "plain_dir") == 0o755
