"""Issue 30, points 1, 2, 3 and 10: each attack of the hostile pass, replayed; the data survives and the
refusal names the folder, file or key.

1. ``distill tokenizer --output`` pointed at a data folder or ``.`` used to rename the folder away and
   delete it (its own inputs and an unrelated README included).
2. A rebuild from inputs that are all 0 bytes used to publish an empty dataset over a good one.
3. Source names ``a`` and ``a/`` shared ``raw/a/``; an absolute name wrote (and cleaned) outside
   ``data.root``.
10. A dangling ``*.jsonl`` link, a ``*.jsonl.gz`` and a FIFO were dropped without a word; a FIFO
    ``--input`` was reported as "does not exist"; a BPE trained on 0 rows exited 0.

The reference for "intact" is a snapshot (relative path -> sha256) of every file taken before the attack.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from distill_dag.cli import main
from distill_dag.config import ConfigError, PipelineConfig, SourceConfig, TokenizerConfig, config_from_dict
from distill_dag.data.manifest import MANIFEST, Manifest
from distill_dag.data.pack import TooFewRowsError, tokenize_to_parquet
from distill_dag.data.sources import gather_sources
from distill_dag.data.tokenizer import resolve_tokenizer
from distill_dag.io import MARKER


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) -> sha256 of its bytes: the state an attack must keep."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_symlink() or not p.is_file():
                out[str(p.relative_to(root))] = "special"
                continue
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def rows(n: int, tag: str = "doc") -> str:
    return "".join(json.dumps({"text": f"{tag} {i}: the quick brown fox jumps over the lazy dog " * 3}) + "\n"
                   for i in range(n))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


# ---- 1: outputs are owned --------------------------------------------------------------------
def test_1_tokenizer_output_over_its_input_folder_or_the_cwd_is_refused_and_nothing_is_deleted(tmp_path, monkeypatch,
                                                                                                capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "a.jsonl").write_text(rows(40))
    (tmp_path / "data" / "README.md").write_text("the team's notes, not ours\n")
    before = snapshot(tmp_path)

    for out in ("data", "."):
        rc, err = run_cli(capsys, "tokenizer", "--input", "data/raw", "--output", out, "--vocab-size", "300")
        assert rc == 1, err
        assert f"the output folder {Path(out).resolve()} is not empty and was not written by distill-dag" in err
        assert snapshot(tmp_path) == before, f"--output {out} changed files"

    # an existing file as --output: refused as a file, not replaced (it used to be renamed away)
    rc, err = run_cli(capsys, "tokenizer", "--input", "data/raw", "--output", "data/README.md", "--vocab-size", "300")
    assert rc == 1 and "exists and is a file" in err, err
    assert snapshot(tmp_path) == before

    # a fresh folder is published, marked; rebuilding over our own folder replaces it
    rc, err = run_cli(capsys, "tokenizer", "--input", "data/raw", "--output", "tok", "--vocab-size", "300")
    assert rc == 0, err
    assert (tmp_path / "tok" / MARKER).is_file() and (tmp_path / "tok" / "tokenizer.json").is_file()
    rc, err = run_cli(capsys, "tokenizer", "--input", "data/raw", "--output", "tok", "--vocab-size", "280")
    assert rc == 0, err
    assert len(json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]) == 280

    # a tokenizer folder of an earlier version (no marker) is recognised and replaced ...
    (tmp_path / "tok" / MARKER).unlink()
    rc, err = run_cli(capsys, "tokenizer", "--input", "data/raw", "--output", "tok", "--vocab-size", "300")
    assert rc == 0, err
    # ... but not once it holds a file we never write
    (tmp_path / "tok" / MARKER).unlink()
    (tmp_path / "tok" / "notes.txt").write_text("mine")
    kept = snapshot(tmp_path / "tok")
    rc, err = run_cli(capsys, "tokenizer", "--input", "data/raw", "--output", "tok", "--vocab-size", "280")
    assert rc == 1 and "notes.txt" in err, err
    assert snapshot(tmp_path / "tok") == kept
    assert snapshot(tmp_path / "data") == {k.removeprefix("data/"): v for k, v in before.items()}


def test_1_preprocess_into_a_folder_of_other_files_is_refused(tmp_path, small_corpus, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(rows(20))
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "gen-mine").mkdir()  # named like a generation: never ours to delete
    (notes / "gen-mine" / "x.txt").write_text("x")
    (notes / "train-00000.parquet").write_text("not a shard of ours")
    before = snapshot(notes)
    rc, err = run_cli(capsys, "preprocess", "--input", str(raw), "--output", str(notes), "--tokenizer",
                      str(small_corpus["tokenizer"]))
    assert rc == 1 and f"the output folder {notes} is not empty and was not written by distill-dag" in err, err
    assert snapshot(notes) == before


# ---- 2: a rebuild never publishes fewer rows than the floor -------------------------------------
def test_2_rebuild_from_all_empty_inputs_is_refused_and_the_previous_dataset_stays(tmp_path, small_corpus, capsys):
    raw, out, tok = tmp_path / "raw", tmp_path / "tok_out", small_corpus["tokenizer"]
    raw.mkdir()
    for i in range(3):
        (raw / f"p{i}.jsonl").write_text(rows(30, f"part{i}"))
    first = tokenize_to_parquet(raw, out, tok, 64, val_fraction=0.0)
    n_rows = first["totals"]["train"]["rows"]
    assert n_rows > 0
    dataset = {k: v for k, v in snapshot(out).items() if k == MANIFEST or k.startswith("gen-")}

    for i in range(3):
        (raw / f"p{i}.jsonl").write_bytes(b"")  # the attack: every input truncated to 0 bytes
    rc, err = run_cli(capsys, "preprocess", "--input", str(raw), "--output", str(out), "--tokenizer", str(tok),
                      "--max-seq-length", "64", "--val-fraction", "0")
    assert rc == 1, err
    assert "fewer than tokenize.min_rows=1" in err and f"{raw / 'p0.jsonl'} (0 bytes" in err, err
    assert f"The previous dataset ({n_rows:,} rows" in err, err
    after = {k: v for k, v in snapshot(out).items() if k == MANIFEST or k.startswith("gen-")}
    assert after == dataset
    assert Manifest.load(out).totals["train"]["rows"] == n_rows

    # a stated floor above what the inputs give is refused the same way (API: min_rows)
    (raw / "p0.jsonl").write_text(rows(2))
    with pytest.raises(TooFewRowsError, match=r"fewer than tokenize\.min_rows=1000"):
        tokenize_to_parquet(raw, out, tok, 64, val_fraction=0.0, min_rows=1000)
    assert {k: v for k, v in snapshot(out).items() if k == MANIFEST or k.startswith("gen-")} == dataset

    # a fresh build of 0 rows is an error naming the inputs, and publishes no manifest
    fresh = tmp_path / "fresh"
    (raw / "p0.jsonl").write_bytes(b"")
    with pytest.raises(TooFewRowsError, match=r"Nothing was published") as e:
        tokenize_to_parquet(raw, fresh, tok, 64, val_fraction=0.0)
    assert str(raw / "p1.jsonl") in str(e.value)
    assert not (fresh / MANIFEST).exists() and not list(fresh.glob("gen-*"))


# ---- 3: source names are single safe path components ---------------------------------------------
def test_3_source_names_that_are_paths_or_collide_are_refused_naming_the_key(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "part-00000.jsonl").write_text('{"text": "unrelated"}\n')
    before = snapshot(outside)
    base = {"data": {"root": str(tmp_path / "data")}}

    def refused(names: list[str]) -> str:
        d = {**base, "data": {**base["data"], "sources": [{"name": n, "kind": "stdlib", "max_bytes": 1000}
                                                            for n in names]}}
        with pytest.raises(ConfigError) as e:
            config_from_dict(d)
        return str(e.value)

    assert "key 'data.sources[1].name'" in refused(["a", "a/"])
    msg = refused(["a", "A"])
    assert "key 'data.sources[1].name': 'A' names the same folder as data.sources[0].name 'a'" in msg
    assert "key 'data.sources[0].name'" in refused([str(outside)])
    for bad in ("..", ".hidden", "_rejects", "x/../../y", "a\\b", "tab\tname", "é", "a" * 101):
        assert "key 'data.sources[0].name'" in refused([bad]), bad
    assert "key 'data.sources.0.name': String should have at least 1 character" in refused([""])
    config_from_dict({**base, "data": {**base["data"], "sources": [{"name": "code-v1.2_x", "kind": "stdlib"}]}})

    # a config assembled in code (no validation) is refused by the gather before it writes anything
    cfg = PipelineConfig()
    cfg.data.root = str(tmp_path / "data")
    cfg.data.sources = [SourceConfig.model_construct(name=str(outside), kind="stdlib", max_bytes=1000)]
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.name"):
        gather_sources(cfg)
    assert snapshot(outside) == before
    assert not (tmp_path / "data").exists()


def test_3_a_source_folder_holding_files_we_did_not_write_is_not_cleaned(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(rows(5))
    cfg = PipelineConfig()
    cfg.data.root = str(tmp_path / "data")
    cfg.data.sources = [SourceConfig(name="mine", kind="jsonl", path=str(src))]
    theirs = tmp_path / "data" / "raw" / "mine"
    theirs.mkdir(parents=True)
    (theirs / "part-00000.jsonl").write_text('{"text": "not gathered by us"}\n')
    before = snapshot(theirs)
    with pytest.raises(FileExistsError, match=f"the output folder {theirs} is not empty"):
        gather_sources(cfg)
    assert snapshot(theirs) == before
    (theirs / "part-00000.jsonl").unlink()  # an empty folder is taken, marked and gathered into
    assert gather_sources(cfg)["mine"]["rows"] == 5
    assert (theirs / MARKER).is_file()


# ---- 10: skipped inputs are listed with the reason ----------------------------------------------
def test_10_dangling_link_gz_and_fifo_inputs_are_listed_with_reasons(tmp_path, small_corpus, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.jsonl").write_text(rows(30))
    (raw / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with gzip.open(raw / "packed.jsonl.gz", "wt") as f:
        f.write(rows(30, "gz"))
    os.mkfifo(raw / "pipe.jsonl")
    out = tmp_path / "out"
    rc, text = run_cli(capsys, "preprocess", "--input", str(raw), "--output", str(out), "--tokenizer",
                       str(small_corpus["tokenizer"]), "--max-seq-length", "64")
    assert rc == 0, text
    expect = {str(raw / "dangling.jsonl"): "dangling symbolic link", str(raw / "packed.jsonl.gz"): "compressed (.gz)",
              str(raw / "pipe.jsonl"): "FIFO (named pipe)"}
    listed = {s["path"]: s["reason"] for s in Manifest.load(out).skipped_inputs}
    assert set(listed) == set(expect)
    for path, why in expect.items():
        assert why in listed[path]
        assert f"    {path}: " in text  # the report names each one
    assert set(Manifest.load(out).inputs) == {"good.jsonl"}

    # a FIFO given as --input is named as a FIFO (not "does not exist"), and never opened (no hang)
    rc, err = run_cli(capsys, "preprocess", "--input", str(raw / "pipe.jsonl"), "--output", str(tmp_path / "o2"),
                      "--tokenizer", str(small_corpus["tokenizer"]))
    assert rc == 1 and "is a FIFO (named pipe), not a regular file" in err and "does not exist" not in err, err

    # the jsonl source of the gather lists them as well, and `distill download` prints them
    cfg = PipelineConfig()
    cfg.data.root = str(tmp_path / "data")
    cfg.data.sources = [SourceConfig(name="s", kind="jsonl", path=str(raw))]
    res = gather_sources(cfg)["s"]
    assert res["rows"] == 30
    assert {s["path"] for s in res["skipped_inputs"]} == set(expect)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "data2"), "sources": [
        {"name": "s", "kind": "jsonl", "path": str(raw)}]}}))
    rc, text = run_cli(capsys, "download", "--config", str(tmp_path / "c.yaml"))
    assert rc == 0, text
    assert all(f"  not read: {path}: " in text for path in expect), text

    # so does the tokenizer, which trains on the one good file
    with pytest.warns(UserWarning, match=r"tokenizer: 3 raw file\(s\) under .* not read.*FIFO"):
        resolve_tokenizer(TokenizerConfig(vocab_size=300), raw, tmp_path / "tok")


def test_10_a_tokenizer_trained_on_no_rows_fails_naming_the_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "empty.jsonl").write_bytes(b"")
    (raw / "bad.jsonl").write_text('{"title": "no text field"}\nnot json\n')
    with gzip.open(raw / "real.jsonl.gz", "wt") as f:
        f.write(rows(10))
    rc, err = run_cli(capsys, "tokenizer", "--input", "raw", "--output", "tok", "--vocab-size", "300")
    assert rc == 1, err
    assert "holds no usable row" in err and f"{raw / 'empty.jsonl'} (0 bytes)" in err, err
    assert f"not read: {raw / 'real.jsonl.gz'} (compressed (.gz)" in err, err
    assert not (tmp_path / "tok").exists() and not list(tmp_path.glob(".tok.*"))
