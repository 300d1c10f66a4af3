"""Logit cache: bytes per cached entry and KL error of each encoding, at k=64 and k=512.

Real data: a byte-level BPE (vocab 2048) trained on this Python's standard library, a tiny Llama
teacher trained on it for a few hundred steps (CPU, ~1-2 min), and as the student the same model
at an early checkpoint (a realistic, imperfect q). For each k and encoding it writes the cache with
``write_logit_cache`` over held-out rows, reads it back with ``CachedTeacher`` and prints

* bytes per entry (one token id + its log-prob) measured on disk, beside the naive fp32 + int64 = 12 B,
  and the same record layout at vocab 128256 (Llama-3; ids take 17 bits instead of 11);
* mean over positions of |KL_cache - KL_fp32| (nats/token) for KL(teacher || student) over the
  top-k renormalised and with the tail as one bucket (target < 1e-3);
* the DuckDB stats: teacher entropy (lower bound) and the top-k mass coverage.

    python -m bench.logit_cache [--steps 300] [--rows 64]

(as a module: run as a script, bench/tokenize.py would shadow the stdlib tokenize module)
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill_dag.distill.logit_cache import CacheEncoding, cache_stats, write_logit_cache
from distill_dag.distill.teachers.cached import CachedTeacher
from distill_dag.distill.teachers.direct import DirectTeacher
from distill_dag.io import sha256_file


def stdlib_text(max_bytes: int) -> list[str]:
    out, n = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are not UTF-8
        out.append(t)
        n += len(t)
        if n >= max_bytes:
            break
    return out


def kl_per_position(t_idx, t_lp, s_logits):
    """(renormalised, bucket) KL(p_T || q_S) per position, fp64. t_* [B, T, k], s_logits [B, T, V]."""
    s = torch.log_softmax(s_logits.double(), -1)
    q = s.gather(-1, t_idx)
    p = t_lp.double()
    pr, qr = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    renorm = (pr.exp() * (pr - qr)).sum(-1)
    tp = (-torch.expm1(torch.logsumexp(p, -1))).clamp_min(1e-30)
    tq = (-torch.expm1(torch.logsumexp(q, -1))).clamp_min(1e-30)
    bucket = (p.exp() * (p - q)).sum(-1) + tp * (tp.log() - tq.log())
    return renorm, bucket


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows", type=int, default=64, help="held-out rows cached")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--text-bytes", type=int, default=3_000_000)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench_logit_cache_"))

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    docs = stdlib_text(a.text_bytes)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<eos>"], show_progress=False))
    V, eos = tok.get_vocab_size(), tok.token_to_id("<eos>")
    stream, pos = [], []
    for enc in tok.encode_batch(docs):
        stream += enc.ids + [eos]
        pos += list(range(len(enc.ids) + 1))
    n = len(stream) // a.seq
    ids = torch.tensor(stream[: n * a.seq]).view(n, a.seq)
    pids = torch.tensor(pos[: n * a.seq]).view(n, a.seq)
    held = slice(n - a.rows, n)
    print(f"corpus: {sum(map(len, docs)) / 1e6:.1f} MB of stdlib text, {n * a.seq} tokens, vocab {V} "
          f"({time.time() - t0:.0f}s)")

    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    student = None
    t0 = time.time()
    for step in range(a.steps):
        b = torch.randint(0, n - a.rows, (16,))
        out = model(input_ids=ids[b], position_ids=pids[b], labels=ids[b], use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if step == a.steps // 6:
            student = LlamaForCausalLM(cfg)
            student.load_state_dict(model.state_dict())
            student.eval()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"  teacher step {step}: train CE {out.loss.item():.3f}")
    model.eval()
    print(f"teacher trained: {a.steps} steps in {time.time() - t0:.0f}s")

    # held-out rows as one tokenized_parquet shard (the COMMON contract)
    tdir = work / "data" / "tokenized"
    tdir.mkdir(parents=True)
    hi, hp = ids[held].numpy().astype(np.int32), pids[held].numpy().astype(np.int32)
    pq.write_table(pa.table({
        "input_ids": pa.array(list(hi), type=pa.list_(pa.int32())),
        "attention_mask": pa.array(list(np.ones_like(hi, dtype=np.int8)), type=pa.list_(pa.int8())),
        "labels": pa.array(list(hi), type=pa.list_(pa.int32())),
        "position_ids": pa.array(list(hp), type=pa.list_(pa.int32())),
        "source": pa.array(["stdlib"] * a.rows),
    }), tdir / "val-00000.parquet", row_group_size=16)
    import json

    (tdir / "manifest.json").write_text(json.dumps({
        "tokenizer_hash": "bench", "max_seq_length": a.seq,
        "shards": [{"path": "val-00000.parquet", "split": "val", "rows": a.rows,
                    "sha256": sha256_file(tdir / "val-00000.parquet")}],
    }))
    batch = {"input_ids": ids[held].long(), "position_ids": pids[held].long(),
             "shard": torch.zeros(a.rows, dtype=torch.long), "row": torch.arange(a.rows)}
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        t_full = torch.log_softmax(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                         use_cache=False).logits.double(), -1)
    print(f"held-out: teacher CE {-t_full[:, :-1].gather(-1, batch['input_ids'][:, 1:, None]).mean():.3f}, "
          f"full teacher entropy {-(t_full.exp() * t_full).sum(-1).mean():.3f} nats")

    print(f"\n{'k':>4} {'dtype':>5} {'B/entry':>8} {'naive':>6} {'ratio':>6} {'@V=128256':>9} "
          f"{'|dKL| renorm':>13} {'|dKL| bucket':>13} {'max |dlogp|':>11} {'write s':>7}")
    for k in (64, 512):
        direct = DirectTeacher(model, k)
        ref = direct.topk(batch)
        kr, kb = kl_per_position(ref.indices, ref.logprobs, s_logits)
        for dtype in ("q8", "fp16", "fp32"):
            cdir = work / f"cache_k{k}_{dtype}"
            t0 = time.time()
            man = write_logit_cache(direct, tdir, cdir, k, 16, dtype=dtype)
            wt = time.time() - t0
            got = CachedTeacher(cdir, tdir, k).topk(batch)
            assert torch.equal(got.indices, ref.indices)
            cr, cb = kl_per_position(got.indices, got.logprobs, s_logits)
            on_disk = (cdir / "val-00000.npy").stat().st_size / (a.rows * a.seq * k)
            big = CacheEncoding(k, 128256, a.seq, dtype).bytes_per_entry
            print(f"{k:>4} {dtype:>5} {on_disk:>8.3f} {12:>6} {12 / on_disk:>5.1f}x {big:>9.3f} "
                  f"{(cr - kr).abs().mean():>13.2e} {(cb - kb).abs().mean():>13.2e} "
                  f"{(got.logprobs - ref.logprobs).abs().max():>11.2e} {wt:>7.1f}")
        st = cache_stats(work / f"cache_k{k}_q8")
        hist = ", ".join(f"{h['bin']}: {h['fraction']:.3f}" for h in st["coverage_histogram"])
        print(f"     DuckDB stats k={k}: entropy_lb {st['mean_entropy_lb']:.3f} nats, top-k mass mean "
              f"{st['mean_topk_mass']:.4f} median {st['median_topk_mass']:.4f} p05 {st['p05_topk_mass']:.4f}; "
              f"coverage {hist}")
    print(f"\n(KL mean over positions: renorm {kr.mean():.3f} nats at k=512; work dir {work})")


if __name__ == "__main__":
    sys.exit(main())
