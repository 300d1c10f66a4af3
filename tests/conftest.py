"""Session fixtures shared by the integration tests: a real (small) tokenized corpus built by the
project's own data code from this Python's standard library, and a tiny Llama teacher on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import stdlib_jsonl


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict[str, Path]:
    """``{"raw", "tokenizer", "tokenized"}``: ~400 kB of stdlib text, a 512-token BPE, 64-token rows."""
    from distill_dag.config import TokenizerConfig
    from distill_dag.data.pack import tokenize_to_parquet
    from distill_dag.data.tokenizer import resolve_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    raw = root / "raw"
    stdlib_jsonl(raw / "stdlib.jsonl", 400_000)
    tok_dir, tok_hash = resolve_tokenizer(TokenizerConfig(vocab_size=512, train_bytes=400_000), raw, root / "tokenizer")
    tokenize_to_parquet(raw, root / "tokenized", tok_dir, 64, val_fraction=0.2, rows_per_shard=512,
                        tokenizer_hash=tok_hash)
    return {"root": root, "raw": raw, "tokenizer": tok_dir, "tokenized": root / "tokenized"}


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, small_corpus) -> Path:
    """A random-init tiny LlamaForCausalLM saved with save_pretrained, vocab of the small corpus."""
    from distill_dag.data.manifest import Manifest
    from distill_dag.distill.teacher_model import build_tiny_teacher

    vocab = Manifest.load(small_corpus["tokenized"]).vocab_size
    model = build_tiny_teacher(vocab, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2), seed=0)
    out = tmp_path_factory.mktemp("teacher") / "tiny_llama"
    model.save_pretrained(out)
    return out
