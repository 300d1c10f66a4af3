"""`distill preprocess` on a folder of JSONL with bad rows: reported, not fatal; reruns skip."""

from __future__ import annotations

import json

from distill_dag.cli import main
from distill_dag.data.manifest import Manifest


def test_preprocess_reports_bad_rows_and_skips_unchanged_inputs(tmp_path, word_tokenizer, capsys):
    (tmp_path / "in/sub").mkdir(parents=True)
    (tmp_path / "in/top.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n{not json\n")
    (tmp_path / "in/sub/deep.jsonl").write_bytes(b'{"text": "d e"}\n\xff\n')
    args = ["preprocess", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--recursive",
            "--max-seq-length", "4", "--tokenizer", str(word_tokenizer), "--val-fraction", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tokenized 2 input(s)" in out and "2 bad rows skipped" in out and "rejects.jsonl" in out
    m = Manifest.load(tmp_path / "out")
    assert sorted(m.inputs) == ["sub/deep.jsonl", "top.jsonl"] and m.max_seq_length == 4
    rejects = [json.loads(x) for x in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert sorted((r["file"].split("/in/")[1], r["line"]) for r in rejects) == [("sub/deep.jsonl", 2), ("top.jsonl", 2)]

    assert main(args + ["--skip-existing"]) == 0
    assert "is up to date" in capsys.readouterr().out

    assert main([a for a in args if a != "--recursive"]) == 0  # top level only
    assert sorted(Manifest.load(tmp_path / "out").inputs) == ["top.jsonl"]


def test_preprocess_without_a_tokenizer_says_how_to_fix(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  root: {tmp_path / 'data'}\n")
    assert main(["preprocess", "--config", str(cfg), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2
    assert "--tokenizer LOCAL_TOKENIZER_DIR" in capsys.readouterr().err
