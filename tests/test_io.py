"""Atomic writes publish files and folders with the modes plain open()/mkdir() give under this
process's umask, not mkstemp's private 0600 / 0700; and they replace or clean only folders of ours."""

from __future__ import annotations

import json
import os

import pytest

from distill_dag.io import (MARKER, MARKER_BYTES, ForeignOutputError, atomic_dir, atomic_path, claim_dir, ownership,
                            write_json_atomic)


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


# ---- owned output folders (issue 30, point 1) ----------------------------------------------------
def _tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


def test_atomic_dir_refuses_a_foreign_folder_before_its_body_runs_and_deletes_nothing(tmp_path):
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "data.bin").write_bytes(b"\x00" * 10)
    (target / "README.md").write_text("theirs")
    before = _tree(tmp_path)
    ran = []
    with pytest.raises(ForeignOutputError, match=f"the output folder {target} is not empty and was not written by "
                                                 "distill-dag .*README.md, sub"):
        with atomic_dir(target, "test writer") as tmp:
            ran.append(tmp)
    assert ran == [] and _tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "symlink to a folder", "dangling symlink", "fifo"])
def test_atomic_dir_refuses_a_path_that_is_not_a_folder(tmp_path, kind):
    target = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("k")
    if kind == "file":
        target.write_text("a file of theirs")
    elif kind == "symlink to a folder":
        target.symlink_to(tmp_path / "elsewhere")
    elif kind == "dangling symlink":
        target.symlink_to(tmp_path / "missing")
    else:
        os.mkfifo(target)
    before = _tree(tmp_path)
    with pytest.raises(ForeignOutputError, match=f"the output {target} exists and is "):
        with atomic_dir(target):
            pass
    assert _tree(tmp_path) == before


def test_atomic_dir_replaces_only_its_own_empty_or_marked_folders_and_marks_what_it_publishes(tmp_path):
    target = tmp_path / "out"
    target.mkdir()  # an empty folder holds nothing to lose
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / MARKER).read_bytes() == MARKER_BYTES and ownership(target) == "ours"
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        # a marker copied in from another output of ours (a checkpoint into final/) has the same bytes
        (tmp / MARKER).write_bytes(MARKER_BYTES)
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "b"]
    assert not list(tmp_path.glob(".out.*"))  # neither the temp folder nor the replaced one is left


def test_atomic_dir_rechecks_at_the_rename_and_never_clears_a_foreign_leftover(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ForeignOutputError):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("x")
            target.mkdir()  # someone else's folder appears while the body runs
            (target / "theirs.txt").write_text("t")
    assert _tree(target) == {"theirs.txt": b"t"} and not list(tmp_path.glob(".out.*.tmp"))

    ours = tmp_path / "ours"
    with atomic_dir(ours) as tmp:
        (tmp / "x").write_text("x")
    old = tmp_path / ".ours.old"  # the name a replace moves the old folder to: here, a stranger's
    old.mkdir()
    (old / "precious").write_text("p")
    with pytest.raises(ForeignOutputError, match=str(old)):
        with atomic_dir(ours) as tmp:
            (tmp / "y").write_text("y")
    assert (old / "precious").read_text() == "p" and (ours / "x").exists()


def test_folders_of_earlier_versions_are_recognised_only_when_our_index_accounts_for_every_file(tmp_path):
    ckpt = tmp_path / "step-0000010"  # a checkpoint: checksums.json lists every file
    ckpt.mkdir()
    for n in ("model.safetensors", "config.json", "run.json"):
        (ckpt / n).write_text(n)
    (ckpt / "checksums.json").write_text(json.dumps({n: "0" * 64 for n in ("model.safetensors", "config.json",
                                                                           "run.json")}))
    assert ownership(ckpt) == "legacy"
    (ckpt / "notes.txt").write_text("mine")
    assert ownership(ckpt) == "foreign"

    tok = tmp_path / "tokenizer"  # a tokenizer: distill_tokenizer.json and tokenizer files only
    tok.mkdir()
    (tok / "distill_tokenizer.json").write_text(json.dumps({"key": "k", "hash": "h", "name_or_path": "bpe"}))
    (tok / "tokenizer.json").write_text("{}")
    assert ownership(tok) == "legacy"
    (tok / "sub").mkdir()
    assert ownership(tok) == "foreign"

    run = tmp_path / "teacher"  # teacher finetuning's weights: metrics.json beside them names the folder
    (run / "final_model").mkdir(parents=True)
    (run / "final_model" / "config.json").write_text("{}")
    (run / "final_model" / "model.safetensors").write_text("w")
    assert ownership(run / "final_model") == "foreign"  # a model folder saved by hand looks the same
    (run / "metrics.json").write_text(json.dumps({"final_model": str(run / "final_model")}))
    assert ownership(run / "final_model") == "legacy"
    with atomic_dir(run / "final_model") as tmp:
        (tmp / "model.safetensors").write_text("w2")
    assert ownership(run / "final_model") == "ours"


def test_claim_dir_marks_a_new_or_empty_folder_and_refuses_one_of_other_files(tmp_path):
    assert claim_dir(tmp_path / "new" / "deep", "t") == tmp_path / "new" / "deep"
    assert (tmp_path / "new" / "deep" / MARKER).read_bytes() == MARKER_BYTES
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "f").write_text("f")
    with pytest.raises(ForeignOutputError, match="no .distill-dag.json"):
        claim_dir(theirs, "t")
    assert sorted(p.name for p in theirs.iterdir()) == ["f"]
    assert claim_dir(theirs, "t", legacy=lambda d: (d / "f").exists()) == theirs  # the caller's own layout
    assert ownership(theirs) == "ours"


def test_claim_dir_writes_through_a_link_to_a_folder_but_atomic_dir_never_replaces_a_link(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "disk")
    claim_dir(tmp_path / "link", "t")
    assert (tmp_path / "disk" / MARKER).is_file() and (tmp_path / "link").is_symlink()
    with pytest.raises(ForeignOutputError, match="is a symbolic link"):
        with atomic_dir(tmp_path / "link"):
            pass
    assert (tmp_path / "link").is_symlink() and (tmp_path / "disk" / MARKER).is_file()
