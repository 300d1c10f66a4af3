"""issue 17: the CLI where the user stands. Run from a temporary directory outside the checkout, relative
paths on the command line land there; paths inside a config are relative to the config file; bundled
configs are reachable by name; `distill tokenizer` builds what `preprocess` needs; `--help` is fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import cfg_dict, stdlib_jsonl

from distill_dag.cli import main
from distill_dag.config import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DISTILL = [str(Path(sys.executable).with_name("distill"))]


def test_help_imports_neither_torch_nor_transformers():
    code = ("import contextlib, io, sys\nfrom distill_dag.cli import build_parser\n"
            "for argv in (['--help'], ['train', '--help'], ['tokenizer', '--help'], ['migrate-config', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            build_parser().parse_args(argv)\n        except SystemExit:\n            pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'dagster', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_import_distill_dag_still_registers_the_auto_classes_once_transformers_comes():
    code = ("import sys, distill_dag\nassert 'transformers' not in sys.modules\n"
            "from transformers import AutoConfig\nprint(type(AutoConfig.for_model('retnet')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "RetNetConfig"


def test_help_of_every_verb_exits_zero_and_documents_the_path_rule():
    r = subprocess.run(DISTILL + ["--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "relative to the current directory" in r.stdout
    for verb in ("tokenizer", "migrate-config", "cache-teacher-logits"):
        r = subprocess.run(DISTILL + [verb, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert "Muon" in subprocess.run(DISTILL + ["train", "--help"], capture_output=True, text=True).stdout


def test_relative_paths_land_in_the_current_directory_outside_the_checkout(tmp_path, monkeypatch, small_corpus,
                                                                          tiny_teacher_dir, capsys):
    """tokenizer -> preprocess -> train, every path relative, from a folder outside the checkout."""
    assert PROJECT_ROOT not in tmp_path.parents
    monkeypatch.chdir(tmp_path)
    stdlib_jsonl(tmp_path / "raw" / "docs.jsonl", 200_000)
    assert main(["tokenizer", "--input", "raw", "--output", "tok", "--vocab-size", "300"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert "vocabulary 300" in capsys.readouterr().out
    assert main(["preprocess", "--input", "raw", "--output", "data/tokenized", "--tokenizer", "tok",
                 "--max-seq-length", "64", "--val-fraction", "0.1"]) == 0
    assert (tmp_path / "data" / "tokenized" / "manifest.json").exists()

    # a config in a sub-folder: its paths are relative to it; the --output-dir flag to the cwd
    (tmp_path / "cfg").mkdir()
    d = cfg_dict(tmp_path, None, None, max_steps=2, save_interval=0, teacher_mode="direct", pretrain_ce_only=True)
    d["data"] = {"root": "../data"}
    d["train"].pop("output_dir")
    d["teacher_ft"]["output_dir"] = "ft"
    (tmp_path / "cfg" / "c.yaml").write_text(json.dumps(d))
    import shutil

    shutil.copytree(tmp_path / "tok", tmp_path / "data" / "tokenizer")
    assert main(["train", "--config", "cfg/c.yaml", "--output-dir", "rel_out"]) == 0
    assert (tmp_path / "rel_out" / "final").is_dir()
    assert not (PROJECT_ROOT / "rel_out").exists()


def test_bundled_config_by_name_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["model-info", "--config", "demo.yaml", "--vocab-size", "2048"]) == 0
    assert "RetNet tiny" in capsys.readouterr().out


@pytest.mark.parametrize("argv,key", [
    (["preprocess", "--input", "i", "--output", "o", "--max-seq-length", "0"], "tokenize.max_seq_length"),
    (["preprocess", "--input", "i", "--output", "o", "--max-seq-length", "-5"], "tokenize.max_seq_length"),
    (["preprocess", "--input", "i", "--output", "o", "--rows-per-shard", "-1"], "tokenize.rows_per_shard"),
    (["preprocess", "--input", "i", "--output", "o", "--val-fraction", "1.5"], "tokenize.val_fraction"),
    (["train", "--max-steps", "-5"], "train.max_steps"),
    (["train", "--learning-rate", "-0.1"], "train.learning_rate"),
    (["train", "--learning-rate", "nan"], "train.learning_rate"),
    (["cache-logits", "--k", "0"], "logit_cache.k"),
    (["tokenizer", "--vocab-size", "10"], "tokenizer.vocab_size"),
    (["serve-teacher", "--port", "70000"], "teacher.serve_port"),
])
def test_bad_flag_values_are_refused_naming_the_key(argv, key, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"key '{key}'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_learning_rate_scales_muon_too_and_says_so(tmp_path, monkeypatch, capsys):
    from distill_dag import cli

    seen = {}
    monkeypatch.setattr(cli, "_check_data", lambda cfg: None)
    import distill_dag.student.run as sr

    def fake_run(cfg):
        seen["train"] = cfg.train
        raise SystemExit(0)

    monkeypatch.setattr(sr, "run_student", fake_run)
    with pytest.raises(SystemExit):
        main(["train", "--config", "demo.yaml", "--learning-rate", "0.0015"])  # demo: AdamW 0.003, Muon 0.02
    assert seen["train"].learning_rate == 0.0015 and seen["train"].muon_learning_rate == pytest.approx(0.01)
    assert "Muon lr scaled by the same factor 0.5: 0.02 -> 0.01" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--config", "demo.yaml", "--learning-rate", "0.0015", "--muon-learning-rate", "0.05"])
    assert seen["train"].muon_learning_rate == 0.05
