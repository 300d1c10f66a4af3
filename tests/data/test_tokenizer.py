"""Tokenizer resolution: trained BPE or a local directory; special tokens; a hash stable across processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distill_dag.config import TokenizerConfig
from distill_dag.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, resolve_tokenizer, tokenizer_hash


def test_trained_bpe_has_eos_and_pad_inside_the_vocab(bpe_tokenizer):
    d, h = bpe_tokenizer
    tok = load_tokenizer(d)
    assert len(tok) == 512
    assert (tok.eos_token, tok.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert 0 <= tok.eos_token_id < len(tok) and 0 <= tok.pad_token_id < len(tok)
    assert tok.eos_token_id != tok.pad_token_id
    text = "def f(x):\n    return x  # caf\u00e9\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    assert h == tokenizer_hash(d)


def _hash_in_subprocess(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "random", "PATH": "/usr/bin:/bin"})
    return out.stdout.strip().splitlines()[-1]


def test_hash_is_stable_across_processes_and_retraining(tmp_path, stdlib_raw, bpe_tokenizer):
    d, h = bpe_tokenizer
    code_hash = f"from distill_dag.data.tokenizer import tokenizer_hash; print(tokenizer_hash({str(d)!r}))"
    assert _hash_in_subprocess(code_hash) == h
    code_train = (
        "from distill_dag.config import TokenizerConfig; from distill_dag.data.tokenizer import resolve_tokenizer; "
        f"print(resolve_tokenizer(TokenizerConfig(vocab_size=512, train_bytes=600_000), {str(stdlib_raw)!r}, "
        f"{str(tmp_path / 'again')!r})[1])"
    )
    assert _hash_in_subprocess(code_train) == h  # training is deterministic: same corpus, same tokenizer


def test_hash_changes_with_the_vocabulary(tmp_path, stdlib_raw, bpe_tokenizer):
    _, h = resolve_tokenizer(TokenizerConfig(vocab_size=600, train_bytes=600_000), stdlib_raw, tmp_path / "t600")
    assert h != bpe_tokenizer[1]


def test_resolve_reuses_a_directory_built_from_the_same_inputs(tmp_path, stdlib_raw):
    cfg = TokenizerConfig(vocab_size=300, train_bytes=100_000)
    d, h = resolve_tokenizer(cfg, stdlib_raw, tmp_path / "tok")
    stamp = (d / "tokenizer.json").stat().st_mtime_ns
    assert resolve_tokenizer(cfg, stdlib_raw, tmp_path / "tok") == (d, h)
    assert (d / "tokenizer.json").stat().st_mtime_ns == stamp


def test_local_tokenizer_without_pad_gets_eos_as_pad(tmp_path, word_tokenizer):
    from transformers import AutoTokenizer

    src = AutoTokenizer.from_pretrained(str(word_tokenizer))
    src.pad_token = None
    src.save_pretrained(tmp_path / "nopad")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "nopad")).pad_token is None
    d, h = resolve_tokenizer(TokenizerConfig(name_or_path=str(tmp_path / "nopad")), None, tmp_path / "resolved")
    tok = load_tokenizer(d)
    assert tok.pad_token_id == tok.eos_token_id == 0
    assert len(tok) == len(src)  # no new token was added
    assert json.loads((d / "distill_tokenizer.json").read_text())["name_or_path"] == str(tmp_path / "nopad")


def test_training_without_raw_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize raw_jsonl first"):
        resolve_tokenizer(TokenizerConfig(), tmp_path / "missing", tmp_path / "tok")
