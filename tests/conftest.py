"""Session fixtures shared by the integration tests: a real (small) tokenized corpus built by the
project's own data code from this Python's standard library, and a tiny Llama teacher on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import stdlib_tokenizer, tiny_llama


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict[str, Path]:
    """``{"raw", "tokenizer", "tokenized"}``: ~400 kB of stdlib text, a 512-token BPE, 64-token rows."""
    from distill_dag.data.pack import tokenize_to_parquet

    root = tmp_path_factory.mktemp("corpus")
    raw, tok_dir, tok_hash = stdlib_tokenizer(root, vocab_size=512, max_bytes=400_000)
    tokenize_to_parquet(raw, root / "tokenized", tok_dir, 64, val_fraction=0.2, rows_per_shard=512,
                        tokenizer_hash=tok_hash)
    return {"root": root, "raw": raw, "tokenizer": tok_dir, "tokenized": root / "tokenized"}


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, small_corpus) -> Path:
    """``support.tiny_llama`` saved with save_pretrained, vocab of the small corpus."""
    from distill_dag.data.manifest import Manifest

    out = tmp_path_factory.mktemp("teacher") / "tiny_llama"
    tiny_llama(Manifest.load(small_corpus["tokenized"]).vocab_size).save_pretrained(out)
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls: on 2 shared cores intra-op threading costs far more than it gains. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
