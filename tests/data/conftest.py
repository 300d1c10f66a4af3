"""Fixtures of the data tests: tiny real tokenizers and a small stdlib corpus (built by the real code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# the word-level vocabulary of `word_tokenizer`: one id per letter, so packed rows can be computed by hand
WORDS = {"<|endoftext|>": 0, "<|pad|>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e": 6, "p": 7, "q": 8, "r": 9, "s": 10,
         "[UNK]": 11}


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory) -> Path:
    """A WordLevel tokenizer (whitespace split) saved as a PreTrainedTokenizerFast: EOS 0, pad 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(WORDS, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path_factory.mktemp("wordtok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                            unk_token="[UNK]").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def stdlib_raw(tmp_path_factory) -> Path:
    """~600 kB of the real stdlib corpus gathered by the stdlib source, in 3 JSONL files of 2 folders."""
    from distill_dag.data.sources import decode_python_source, stdlib_files

    root = tmp_path_factory.mktemp("stdlib_raw")
    texts = [(rel, decode_python_source(p.read_bytes())[0]) for rel, p in stdlib_files(600_000)]
    thirds = [texts[i::3] for i in range(3)]
    for name, part in zip(["a/docs.jsonl", "b/docs.jsonl", "b/more.jsonl"], thirds):
        write_jsonl(root / name, [{"text": t, "id": rel, "source": name.split("/")[0]} for rel, t in part if t.strip()])
    return root


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, stdlib_raw) -> tuple[Path, str]:
    """A 512-token byte-level BPE trained by resolve_tokenizer on `stdlib_raw`: (dir, hash)."""
    from distill_dag.config import TokenizerConfig
    from distill_dag.data.tokenizer import resolve_tokenizer

    return resolve_tokenizer(TokenizerConfig(vocab_size=512, train_bytes=600_000), stdlib_raw,
                             tmp_path_factory.mktemp("bpe") / "tokenizer")
