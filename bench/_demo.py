"""The demo's data and teacher for the benches that train students on them (bench/convert.py,
bench/kd_sweep.py; both reuse what one of them built in the same ``--out``), and the teacher's held-out loss
they measure against. A helper, not a bench; imported as bench/_common.py says.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distill_dag.config import PipelineConfig
from distill_dag.data.dataset import make_loader
from distill_dag.data.pack import tokenize_to_parquet
from distill_dag.data.sources import gather_sources
from distill_dag.data.tokenizer import resolve_tokenizer, tokenizer_hash
from distill_dag.teacher.finetune import finetune_teacher
from distill_dag.teacher.model import finetuned_teacher, load_teacher


def quick_overrides(out: Path) -> dict:
    """Tiny sizes: 300 kB of stdlib + 10 retrieval documents, BPE 512, 64-token rows, a few steps."""
    return {
        "data": {"root": str(out / "data"), "sources": [
            {"name": "stdlib", "kind": "stdlib", "max_bytes": 300_000},
            {"name": "retrieval", "kind": "hf", "dataset": "synthetic:retrieval", "max_rows": 10}]},
        "tokenizer": {"vocab_size": 512},
        "tokenize": {"max_seq_length": 64, "val_fraction": 0.1},
        "teacher_ft": {"max_steps": 12, "copy_warmup_steps": 4, "pass_key_rows_per_batch": 2, "batch_size": 8,
                       "warmup_steps": 2, "eval_interval": 0,
                       "save_interval": 0},
        "student": {"overrides": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 64}},
        "train": {"max_steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_batches": 2},
    }


def build_demo(cfg: PipelineConfig, log) -> None:
    """raw_jsonl -> tokenizer -> tokenized_parquet -> teacher_adapters, as the demo assets do (skipped when done)."""
    if not (cfg.tokenized_dir / "manifest.json").exists():
        t0 = time.time()
        gather_sources(cfg)
        resolve_tokenizer(cfg, cfg.raw_dir, cfg.tokenizer_dir)
        t = cfg.tokenize
        tokenize_to_parquet(cfg.raw_dir, cfg.tokenized_dir, cfg.tokenizer_dir, t.max_seq_length,
                            val_fraction=t.val_fraction, rows_per_shard=t.rows_per_shard,
                            tokenizer_hash=tokenizer_hash(cfg.tokenizer_dir))
        log(f"data: built in {time.time() - t0:.0f}s")
    if not (cfg.teacher_ft_dir / "final_model").exists():
        t0 = time.time()
        m = finetune_teacher(cfg, log=log)
        log(f"teacher: trained in {time.time() - t0:.0f}s, val ppl {m['val_ppl_before']:.1f} -> {m['val_ppl_after']:.2f}")


def val_batches(cfg: PipelineConfig) -> list[dict[str, torch.Tensor]]:
    """The held-out batches the trainer's evaluate() uses (val split, in order, the first eval_batches)."""
    it = make_loader(cfg.tokenized_dir, "val", cfg.train.batch_size, seed=0, shuffle=False, infinite=False)
    return [b for _, b in zip(range(cfg.train.eval_batches), it)]


@torch.no_grad()
def teacher_val_loss(cfg: PipelineConfig, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-mean next-token CE of the teacher, called as the direct teacher is (position_ids, no mask);
    ``sum_{t: labels[t+1] != -100} -log p(labels[t+1] | <= t) / count``."""
    model_dir, _ = finetuned_teacher(cfg)
    teacher = load_teacher(cfg.teacher, torch.device("cpu"), model_path=model_dir)
    total, n = 0.0, 0
    for b in batches:
        logits = teacher(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        lab = b["labels"][:, 1:].reshape(-1)
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(lab.numel(), -1).float(), lab,
                                                         ignore_index=-100, reduction="sum"))
        n += int((lab != -100).sum())
    return total / n
