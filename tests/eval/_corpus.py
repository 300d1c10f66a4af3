"""Test helpers: stdlib text, a BPE tokenizer trained on the spot, tiny Llamas, hand-packed rows.

:func:`pack` follows the tokenized_parquet contract (COMMON.md): rows of ``max_seq_length`` with EOS
between documents, ``position_ids`` restarting at 0 at every document start, unshifted labels, the
last row padded with attention_mask 0 / labels -100.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

EOS = "<|endoftext|>"


def stdlib_docs(max_chars: int = 300_000, start: int = 0) -> list[str]:
    """Module files of this Python's standard library (sorted, so the same on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for p in sorted(root.glob("*.py"))[start:]:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text[:20_000]
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs


def train_tokenizer(out_dir: Path, vocab_size: int = 512, max_chars: int = 300_000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(stdlib_docs(max_chars), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(out_dir)
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **cfg)).eval()


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
