"""Atomic writes publish files and folders with the modes plain open()/mkdir() give under this
process's umask, not mkstemp's private 0600 / 0700."""

from __future__ import annotations

from distill_dag.io import atomic_dir, atomic_path, write_json_atomic


def test_atomic_writes_get_the_modes_of_plain_files_and_folders(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    (tmp_path / "plain_dir").mkdir()
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    write_json_atomic(tmp_path / "b.json", {"k": 1})
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")

    def mode(p):
        return p.stat().st_mode & 0o777

    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.json") == mode(tmp_path / "d" / "f") == mode(plain)
    assert mode(tmp_path / "d") == mode(tmp_path / "plain_dir")
