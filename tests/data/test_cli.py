"""`distill preprocess` on a folder of JSONL with bad rows: reported, not fatal; reruns skip."""

from __future__ import annotations

import json

from distill_dag.cli import main
from distill_dag.data.manifest import Manifest


def test_preprocess_reports_bad_rows_and_skips_unchanged_inputs(tmp_path, word_tokenizer, capsys):
    (tmp_path / "in/sub").mkdir(parents=True)
    (tmp_path / "in/top.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n{not json\n")
    (tmp_path / "in/sub/deep.jsonl").write_bytes(b'{"text": "d e"}\n\xff\n')
    args = ["preprocess", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--max-reject-rate", "1",
            "--max-seq-length", "8", "--tokenizer", str(word_tokenizer), "--val-fraction", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tokenized 2 input(s)" in out and "2 bad rows skipped" in out and "rejects.jsonl" in out
    m = Manifest.load(tmp_path / "out")
    assert sorted(m.inputs) == ["sub/deep.jsonl", "top.jsonl"] and m.max_seq_length == 8
    rejects = [json.loads(x) for x in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert sorted((r["file"].split("/in/")[1], r["line"]) for r in rejects) == [("sub/deep.jsonl", 2), ("top.jsonl", 2)]

    assert main(args) == 0  # skip_existing is the config's default, as for the asset
    assert "is up to date" in capsys.readouterr().out

    assert main(args + ["--no-recursive"]) == 0  # top level only
    assert sorted(Manifest.load(tmp_path / "out").inputs) == ["top.jsonl"]


def test_preprocess_without_a_tokenizer_says_how_to_fix(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  root: {tmp_path / 'data'}\n")
    assert main(["preprocess", "--config", str(cfg), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "distill preprocess --tokenizer DIR" in err and "tokenizer.name_or_path" in err


def test_preprocess_and_tokenize_stage_run_the_stage_with_the_same_config_defaults(tmp_path, word_tokenizer,
                                                                                   monkeypatch):
    """One entry point: the CLI without flags and the asset's call (tokenize_stage(cfg)) cannot drift."""
    from distill_dag.config import load_config
    from distill_dag.data import pack

    calls = []
    monkeypatch.setattr(pack, "tokenize_to_parquet", lambda *a, **k: calls.append((a, k)) or {
        "up_to_date": True, "reused": [], "rejects": 0, "totals": {s: {"shards": 0, "rows": 0, "tokens": 0, "docs": 0}
                                                                    for s in ("train", "val")}})
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"data:\n  root: {tmp_path / 'data'}\n")
    assert main(["preprocess", "--config", str(cfg_file), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--tokenizer", str(word_tokenizer)]) == 0
    pack.tokenize_stage(load_config(cfg_file), inputs=tmp_path / "in", output_dir=tmp_path / "out",
                        tokenizer_dir=word_tokenizer)
    (cli_a, cli_k), (stage_a, stage_k) = calls
    for k in (cli_k, stage_k):
        k.pop("log"), k.pop("progress")
    assert [str(x) for x in cli_a] == [str(x) for x in stage_a] and cli_k == stage_k
    cfg = load_config(cfg_file)
    assert cli_k["recursive"] is True and cli_k["skip_existing"] is cfg.tokenize.skip_existing
    assert cli_k["max_reject_rate"] == cfg.data.max_reject_rate and cli_k["batch_docs"] == cfg.tokenize.batch_docs


def test_preprocess_fails_on_bad_rows_over_the_configured_rate_like_the_asset(tmp_path, word_tokenizer, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/x.jsonl").write_text(json.dumps({"text": "a b"}) + "\n{broken\n")
    args = ["preprocess", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--max-seq-length", "8", "--tokenizer", str(word_tokenizer)]
    assert main(args) == 1
    assert "1 of 2 rows rejected" in capsys.readouterr().err and not (tmp_path / "out/manifest.json").exists()
