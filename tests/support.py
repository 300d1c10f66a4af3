"""Helpers shared by tests (importable as ``support``: tests/ is on pytest's pythonpath).

Built on the product's own functions wherever it has one: stdlib text from
:mod:`distill_dag.data.sources` (the demo's corpus), the BPE from :mod:`distill_dag.data.tokenizer`,
tiny Llamas from :func:`distill_dag.teacher.model.build_tiny_teacher`, shard tables from
:func:`distill_dag.data.shards.rows_to_table`. Hand-built rows (:func:`make_rows`, :func:`pack`) follow
the tokenized_parquet contract (COMMON.md) independently of the product's packer: ``position_ids`` 0
at every document start, unshifted labels, padding with attention_mask 0 / labels -100.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB = 96  # default vocabulary of make_rows / write_data (and of the teacher tests' tiny_llama)
T = 16  # default row length of make_rows / write_data

# the tiny Llama shape of the tests (also the `teacher.init_tiny` of test configs)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


# ---- text, tokenizer ---------------------------------------------------------------------------
def stdlib_docs(max_chars: int, doc_chars: int = 8000, packages: bool = False) -> list[tuple[str, str]]:
    """``(relative path, text)`` of stdlib modules in the demo corpus' order, each cut to ``doc_chars``,
    until ``max_chars`` in all (the last document is whole): real text, the same on every run.

    ``packages``: also modules inside packages (the demo corpus' full set). Off, only top-level modules:
    the corpus the suite's corpus-dependent tests were written against (e.g. test_writers_killed needs an
    edit of one document to keep every shard's row count).
    """
    from distill_dag.data.sources import decode_python_source, stdlib_files

    docs, total = [], 0
    for rel, p in stdlib_files(sys.maxsize):  # every file: the budget here counts cut documents
        if not packages and "/" in rel:
            continue
        text = decode_python_source(p.read_bytes())[0][:doc_chars]
        if not text.strip():
            continue  # an empty __init__.py: nothing to train on (the product skips them too)
        docs.append((rel, text))
        total += len(text)
        if total >= max_chars:
            break
    return docs


def stdlib_jsonl(path: Path, max_bytes: int, doc_chars: int = 8000, packages: bool = False) -> Path:
    """:func:`stdlib_docs` as JSONL documents (``id``, ``text``, ``source``) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rel, text in stdlib_docs(max_bytes, doc_chars, packages):
            f.write(json.dumps({"id": rel, "text": text, "source": "stdlib"}) + "\n")
    return path


def stdlib_tokenizer(root: Path, vocab_size: int = 512, max_bytes: int = 400_000) -> tuple[Path, Path, str]:
    """``<root>/raw/stdlib.jsonl`` (:func:`stdlib_jsonl`) and the project's byte-level BPE trained on it
    in ``<root>/tokenizer`` -> ``(raw dir, tokenizer dir, tokenizer hash)``."""
    from distill_dag.config import TokenizerConfig
    from distill_dag.data.tokenizer import resolve_tokenizer

    raw = stdlib_jsonl(root / "raw" / "stdlib.jsonl", max_bytes).parent
    tok_dir, tok_hash = resolve_tokenizer(TokenizerConfig(vocab_size=vocab_size, train_bytes=max_bytes), raw,
                                          root / "tokenizer")
    return raw, tok_dir, tok_hash


# ---- models ------------------------------------------------------------------------------------
def tiny_llama(vocab_size: int, seed: int = 0, embed_scale: float = 1.0, **config):
    """A random-init ``LlamaForCausalLM`` of :data:`TINY_LLAMA` shape (``config`` overrides), in eval mode.

    ``embed_scale`` multiplies the (tied) embeddings: above 1 the next-token distribution is sharper
    than the 0.02-std init gives, so a top-k is far from uniform.
    """
    from distill_dag.teacher.model import build_tiny_teacher

    model = build_tiny_teacher(vocab_size, {**TINY_LLAMA, **config}, seed=seed).eval()
    if embed_scale != 1.0:
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(embed_scale)
    return model


# ---- packed rows and shards --------------------------------------------------------------------
def pack(docs: list[list[int]], eos_id: int, seq_len: int) -> dict[str, list[list[int]]]:
    """Pack documents (EOS appended to each) into rows of ``seq_len``; the tail row is padded."""
    stream: list[tuple[int, int]] = []  # (token, position in its document)
    for d in docs:
        ids = d + [eos_id]
        stream.extend((t, i) for i, t in enumerate(ids))
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": []}
    for s in range(0, len(stream), seq_len):
        chunk = stream[s : s + seq_len]
        pad = seq_len - len(chunk)
        ids = [t for t, _ in chunk]
        rows["input_ids"].append(ids + [eos_id] * pad)
        rows["attention_mask"].append([1] * len(chunk) + [0] * pad)
        rows["labels"].append(ids + [-100] * pad)
        rows["position_ids"].append([p for _, p in chunk] + [0] * pad)
    return rows


def make_rows(n: int, seq_len: int = T, vocab: int = VOCAB, seed: int = 0, pad_last: int = 0) -> dict[str, np.ndarray]:
    """n packed rows of random tokens ``[n, seq_len]``: documents of random length, position_ids
    restarting at each document start; the last ``pad_last`` positions of the last row padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, seq_len)).astype(np.int32)
    pos = np.zeros((n, seq_len), dtype=np.int32)
    p = 3  # the first row continues a document from a previous row: it does not start at 0
    for r in range(n):
        for t in range(seq_len):
            if rng.random() < 0.15:
                p = 0
            pos[r, t] = p
            p += 1
    am = np.ones((n, seq_len), dtype=np.int8)
    labels = ids.copy()
    if pad_last:
        am[-1, -pad_last:] = 0
        labels[-1, -pad_last:] = -100
        ids[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "position_ids": pos}


def write_data(root: Path, shard_rows: list[int], seq_len: int = T, vocab: int = VOCAB, seed: int = 0,
               tokenizer_hash: str = "tok-hash-1", row_group: int = 4) -> Path:
    """Shards of :func:`make_rows` as ``<root>/tokenized/{train,val}-NNNNN.parquet`` + manifest.json (the
    last of several shards is val, its last row padded); returns the tokenized dir."""
    import pyarrow.parquet as pq

    from distill_dag.data.manifest import SCHEMA_VERSION, Manifest, ShardInfo
    from distill_dag.data.shards import rows_to_table, shard_name
    from distill_dag.io import sha256_file

    d = root / "tokenized"
    d.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, n in enumerate(shard_rows):
        split = "val" if i == len(shard_rows) - 1 and len(shard_rows) > 1 else "train"
        name = shard_name(split, i)
        rows = make_rows(n, seq_len, vocab, seed=seed + i, pad_last=3 if split == "val" else 0)
        table = rows_to_table(rows["input_ids"], rows["attention_mask"], rows["labels"], rows["position_ids"],
                              ["test"] * n)
        pq.write_table(table, d / name, row_group_size=row_group)
        shards.append(ShardInfo(path=name, split=split, rows=n, tokens=int(rows["attention_mask"].sum()),
                                sha256=sha256_file(d / name), bytes=(d / name).stat().st_size))
    Manifest(schema_version=SCHEMA_VERSION, tokenizer_name="test", tokenizer_hash=tokenizer_hash, eos_id=0, pad_id=0,
             bos_id=None, vocab_size=vocab, max_seq_length=seq_len, val_fraction=0.0, mask_prompt=False,
             rows_per_shard=max(shard_rows), shards=shards).save(d)
    return d


def all_batches(tok_dir: Path, batch_rows: int = 4) -> list[dict[str, torch.Tensor]]:
    """Every row of every shard, in manifest order, as loader-format batches (long tensors ``[B, T]``
    plus ``shard`` = index in the manifest and ``row`` ``[B]``); read with pyarrow, not the loader."""
    import pyarrow.parquet as pq

    m = json.loads((tok_dir / "manifest.json").read_text())
    out = []
    for si, s in enumerate(m["shards"]):
        t = pq.read_table(tok_dir / s["path"])
        cols = {c: torch.tensor(np.stack(t.column(c).to_numpy(zero_copy_only=False)).astype(np.int64))
                for c in ("input_ids", "attention_mask", "labels", "position_ids")}
        n = t.num_rows
        for a in range(0, n, batch_rows):
            b = {c: v[a : a + batch_rows] for c, v in cols.items()}
            b["shard"] = torch.full((len(b["input_ids"]),), si, dtype=torch.long)
            b["row"] = torch.arange(a, min(a + batch_rows, n), dtype=torch.long)
            out.append(b)
    return out


# ---- run configs --------------------------------------------------------------------------------
def cfg_dict(tmp_path: Path, corpus: dict[str, Path] | None, teacher_dir: Path | None, **train_kw: Any) -> dict[str, Any]:
    """A train config (as a dict) of a one-layer tiny RetNet (hidden 32) distilled from ``teacher_dir`` on
    the session corpus (``corpus`` None: the default ``data.root``); ``train_kw``
    overrides train.*. Run outputs under ``tmp_path``."""
    t = dict(teacher_mode="direct", teacher_topk=16, temperature=2.0, distill_alpha=0.5, learning_rate=3e-3,
             warmup_steps=2, max_steps=8, batch_size=4, grad_accum=2, log_interval=1, eval_interval=0,
             eval_batches=2, save_interval=2, keep_checkpoints=3, output_dir=str(tmp_path / "run"), device="cpu",
             loss_chunk_tokens=64)
    t.update(train_kw)
    return {
        **({"data": {"root": str(corpus["root"])}} if corpus else {}),
        "tokenize": {"max_seq_length": 64},
        "teacher": {"model_name_or_path": str(teacher_dir) if teacher_dir else None},
        # outside the project tree, so a finetuned demo teacher under runs/ is never picked up
        "teacher_ft": {"output_dir": str(tmp_path / "teacher_ft")},
        "logit_cache": {"dir": str(tmp_path / "cache"), "k": 16},
        "student": {"variant": "tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "intermediate_size": 64},
                    "chunk_size": 16},
        "train": t,
        "wandb": {"mode": "disabled"},
    }


def run_bench(script: Path, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """``python bench/<script> args`` from the repository root; fails the test with its output's tail."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, str(script), *args], cwd=script.parents[1], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p
