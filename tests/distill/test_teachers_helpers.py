"""Shared builders for the teacher / logit-cache / server tests (no tests here).

Hand-built ``tokenized_parquet`` shards following the COMMON contract (until the data loader
lands), a tiny random ``LlamaForCausalLM``, and an independent reference KL.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

VOCAB = 96
T = 16


def tiny_llama(vocab: int = VOCAB, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper than the 0.02-std init, so the top-k is far from uniform
        m.model.embed_tokens.weight.mul_(8.0)
    return m


def make_rows(n: int, seq_len: int = T, vocab: int = VOCAB, seed: int = 0, pad_last: int = 0) -> dict[str, np.ndarray]:
    """n packed rows: documents of random length, position_ids restarting at each document start."""
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
    """Write ``<root>/tokenized/{train,val}-NNNNN.parquet`` + manifest.json; returns the tokenized dir."""
    d = root / "tokenized"
    d.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, n in enumerate(shard_rows):
        split = "val" if i == len(shard_rows) - 1 and len(shard_rows) > 1 else "train"
        name = f"{split}-{i:05d}.parquet"
        rows = make_rows(n, seq_len, vocab, seed=seed + i, pad_last=3 if split == "val" else 0)
        table = pa.table({
            "input_ids": pa.array(list(rows["input_ids"]), type=pa.list_(pa.int32())),
            "attention_mask": pa.array(list(rows["attention_mask"]), type=pa.list_(pa.int8())),
            "labels": pa.array(list(rows["labels"]), type=pa.list_(pa.int32())),
            "position_ids": pa.array(list(rows["position_ids"]), type=pa.list_(pa.int32())),
            "source": pa.array(["test"] * n),
        })
        pq.write_table(table, d / name, row_group_size=row_group)
        sha = hashlib.sha256((d / name).read_bytes()).hexdigest()
        shards.append({"path": name, "split": split, "rows": n, "tokens": int(rows["attention_mask"].sum()),
                       "sha256": sha, "bytes": (d / name).stat().st_size})
    from distill_dag.data.manifest import SCHEMA_VERSION, Manifest, ShardInfo

    Manifest(schema_version=SCHEMA_VERSION, tokenizer_name="test", tokenizer_hash=tokenizer_hash, eos_id=0, pad_id=0,
             bos_id=None, vocab_size=vocab, max_seq_length=seq_len, val_fraction=0.0, mask_prompt=False,
             rows_per_shard=max(shard_rows), shards=[ShardInfo(**s) for s in shards]).save(d)
    return d


def all_batches(tok_dir: Path, batch_rows: int = 4) -> list[dict[str, torch.Tensor]]:
    """Every row of every shard as loader-format batches (shard = index in the manifest)."""
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


def reference_kl(t_idx: torch.Tensor, t_lp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_T || q_S) over the teacher's top-k support, both renormalised over it (fp64).

    ``t_idx``/``t_lp`` [B, T, k]; ``student_logits`` [B, T, V] -> [B, T].
    """
    p_log = torch.log_softmax(t_lp.double(), -1)
    q_log = torch.log_softmax(student_logits.double().gather(-1, t_idx), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def reference_kl_bucket(t_idx, t_lp, student_logits) -> torch.Tensor:
    """Per-position KL with the tail outside the teacher's top-k as one extra bucket (fp64)."""
    s_full = torch.log_softmax(student_logits.double(), -1)
    q = s_full.gather(-1, t_idx)
    p = t_lp.double()
    tp = (-torch.expm1(torch.logsumexp(p, -1))).clamp_min(1e-30)
    tq = (-torch.expm1(torch.logsumexp(q, -1))).clamp_min(1e-30)
    return (p.exp() * (p - q)).sum(-1) + tp * (tp.log() - tq.log())
