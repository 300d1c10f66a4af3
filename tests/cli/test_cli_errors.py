"""issue 17: each listed failure prints one clear error (what, which file or key, how to fix it), exits
non-zero, and shows no Traceback unless --debug."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import cfg_dict

from distill_dag.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DISTILL = [str(Path(sys.executable).with_name("distill"))]


def _run(argv, cwd, **env):
    return subprocess.run(DISTILL + argv, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def _cfg(tmp_path, corpus, **train):
    d = cfg_dict(tmp_path, corpus, None, max_steps=2, save_interval=0, **train)
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(d))
    return p


def test_missing_manifest_no_traceback_and_debug_shows_it(tmp_path):
    r = _run(["train", "--config", "demo.yaml"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "manifest.json not found" in r.stderr and "distill preprocess" in r.stderr
    assert "data.tokenized_dir" in r.stderr
    r = _run(["train", "--config", "demo.yaml", "--debug"], tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_offline_catalog_download(tmp_path):
    r = _run(["download", "--config", "demo.yaml", "--category", "code"], tmp_path, HF_HUB_OFFLINE="1")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "Hub" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_missing_tokenizer(tmp_path, small_corpus, capsys):
    p = _cfg(tmp_path, small_corpus, pretrain_ce_only=True)
    d = json.loads(p.read_text())
    d["data"] = {"root": str(tmp_path / "elsewhere"), "tokenized_dir": str(small_corpus["tokenized"])}
    p.write_text(json.dumps(d))
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"no tokenizer in {tmp_path / 'elsewhere' / 'tokenizer'}" in err and "Traceback" not in err
    assert "--tokenizer DIR" in err and "tokenizer.name_or_path" in err


def test_teacher_server_down(tmp_path, small_corpus, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = _cfg(tmp_path, small_corpus, teacher_mode="network")
    d = json.loads(p.read_text())
    d["teacher"].update(url=f"http://127.0.0.1:{port}", max_retries=0, timeout_s=2, backoff_s=0)
    p.write_text(json.dumps(d))
    code = main(["train", "--config", str(p)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert str(port) in err and ("serve-teacher" in err or "teacher.url" in err), err


def test_teacher_topk_above_the_manifest_vocabulary_names_the_key(tmp_path, small_corpus, capsys):
    p = _cfg(tmp_path, small_corpus, teacher_topk=1000)  # the corpus' BPE has 512 tokens
    d = json.loads(p.read_text())
    d["tokenizer"] = {"name_or_path": "some/hub-tokenizer"}  # vocabulary unknown until the manifest is read
    p.write_text(json.dumps(d))
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "key 'train.teacher_topk': 1000 is above the vocabulary (512" in err
    assert not (tmp_path / "run").exists()  # before any compute


@pytest.mark.parametrize("exc", ["diverged", "cache_k"])
def test_divergence_and_cache_k_mismatch_are_one_line_errors(exc, tmp_path, small_corpus, monkeypatch, capsys):
    import distill_dag.student.run as sr
    from distill_dag.teacher.cache.codec import LogitCacheError
    from distill_dag.training.stability import TrainingDivergedError

    err_obj = {
        "diverged": TrainingDivergedError("step 7: 10 consecutive non-finite steps (loss=nan); the run has diverged. "
                                          "Lower train.learning_rate / train.muon_learning_rate"),
        "cache_k": LogitCacheError("data/c: the cache holds k=16 entries per position but k=64 was requested; set "
                                   "train.teacher_topk <= 16, or rebuild the cache with logit_cache.k >= 64"),
    }[exc]

    def boom(cfg):
        raise err_obj

    monkeypatch.setattr(sr, "run_student", boom)
    p = _cfg(tmp_path, small_corpus)
    assert main(["train", "--config", str(p)]) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("distill train: ") and str(err_obj) in err and "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["distill"])
    with pytest.raises(type(err_obj)):
        main(["train", "--config", str(p), "--debug"])


def test_an_unexpected_error_names_its_type_and_points_at_debug(tmp_path, small_corpus, monkeypatch, capsys):
    import distill_dag.student.run as sr

    monkeypatch.setattr(sr, "run_student", lambda cfg: {}["nope"])
    assert main(["train", "--config", str(_cfg(tmp_path, small_corpus))]) == 1
    err = capsys.readouterr().err
    assert "KeyError" in err and "--debug" in err and "Traceback" not in err


def test_config_errors_from_the_file_name_file_and_key(tmp_path):
    (tmp_path / "c.yaml").write_text("base: demo.yaml\ntrain:\n  grad_accum: 0\n  grad_accum: 1\n")
    r = _run(["train", "--config", "c.yaml"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "c.yaml: duplicate key 'grad_accum' at line 4" in r.stderr
