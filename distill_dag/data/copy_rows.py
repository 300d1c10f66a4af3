"""Synthetic copy rows: random token spans repeated, the warm-up that makes a tiny teacher's induction circuit form.

Why (issue 19, measured): a random-init 2-layer Llama trained on the demo corpus never learns to copy,
whatever share of retrieval documents the corpus holds (NIAH 0.00 after 3000 steps with 62 % of the
tokens in retrieval episodes): a pass-key episode has two or three copied tokens among hundreds, too
sparse a signal for the circuit's phase change. A row made of a random span repeated end to end makes
every token after the first period predictable only by looking back at the same token one period ago
(an induction head: attend to the token after the previous occurrence of the current token). With the
period drawn per row, the model cannot solve it by position alone; it must match content. On these rows
the demo's tiny Llama goes from chance to ~95 % copy accuracy in a few hundred steps
(``teacher_ft.copy_warmup_steps``); the corpus steps after it then teach *what* to copy (the pass key
after ``The pass key is``).

How :func:`distill_dag.teacher.finetune.finetune_teacher` uses them (the demo): 200 steps of
64-token rows (periods 6-30; the circuit forms at ~150-250), 100 steps of full-length rows (periods up
to the row length - 16, half of them over small alphabets), then the corpus steps. The copy warm-up
alone got the demo teacher to NIAH 0.53 at its 256-token training length (0.00 without it): it copies,
but a needle ~220 tokens back (depth 0.1) was found 20 % of the time, because the corpus almost never
shows one that far. :func:`pass_key_rows` (``teacher_ft.pass_key_rows_per_batch``) puts pass keys at
every distance into the corpus rows themselves; with 12 of 16 rows and 1000 corpus steps the demo
teacher reaches 0.95 at 256 (configs/demo.yaml has the measured table).

Rows are a pure function of ``(seed, step)``: a resumed run draws the same rows, on any machine.
The batch has the layout of :mod:`distill_dag.data.dataset` (``input_ids``, ``attention_mask``,
``labels`` unshifted with -100 on the first span and its first repeat, which nothing earlier predicts,
``position_ids``).
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from distill_dag.data.retrieval_docs import NEEDLE, QUESTION

NEEDLE_PREFIX = NEEDLE.split("{key}")[0].rstrip()  # "The pass key is"


def copy_batch(step: int, batch_size: int, seq_len: int, vocab_size: int, *, seed: int = 0,
               min_period: int = 8, max_period: int = 64, first_token: int = 0,
               small_alphabet_share: float = 0.0, alphabet_sizes: tuple[int, int] = (4, 32)) -> dict[str, torch.Tensor]:
    """Step ``step``'s batch: each row a random span of ``min_period..max_period`` tokens (ids in
    ``[first_token, vocab_size)``, i.e. past the special tokens) repeated up to ``seq_len`` tokens.

    A ``small_alphabet_share`` of the rows draw their span from a random alphabet of ``alphabet_sizes``
    tokens: a token then recurs inside its span, so matching one token is ambiguous and only the tokens
    before it tell where the copy is (what a pass key's digits need: ``6 9 8 26``, digits that also fill
    the code around it)."""
    if not 1 <= min_period <= max_period < seq_len:
        raise ValueError(f"copy rows need 1 <= min_period ({min_period}) <= max_period ({max_period}) "
                         f"< seq_len ({seq_len})")
    if not 0 <= first_token < vocab_size:
        raise ValueError(f"first_token {first_token} is outside the vocabulary (size {vocab_size})")
    if not 0.0 <= small_alphabet_share <= 1.0 or not 2 <= alphabet_sizes[0] <= alphabet_sizes[1]:
        raise ValueError(f"small_alphabet_share {small_alphabet_share} must be in [0, 1] and alphabet_sizes "
                         f"{alphabet_sizes} a range of at least 2 tokens")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    periods = torch.randint(min_period, max_period + 1, (batch_size,), generator=g)
    small = torch.rand(batch_size, generator=g) < small_alphabet_share
    ids = torch.empty(batch_size, seq_len, dtype=torch.long)
    labels = torch.empty_like(ids)
    for b, p in enumerate(periods.tolist()):
        if small[b]:
            size = int(torch.randint(alphabet_sizes[0], alphabet_sizes[1] + 1, (1,), generator=g))
            alphabet = first_token + torch.randperm(vocab_size - first_token, generator=g)[:size]
            span = alphabet[torch.randint(0, len(alphabet), (p,), generator=g)]
        else:
            span = torch.randint(first_token, vocab_size, (p,), generator=g)
        ids[b] = span.repeat(seq_len // p + 1)[:seq_len]
        labels[b] = ids[b]
        labels[b, : p + 1] = -100  # the first span and its first repeat are random: nothing to learn
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "position_ids": torch.arange(seq_len).expand(batch_size, seq_len).clone()}


def pass_key_row_min_len(encode: Callable[[str], list[int]]) -> int:
    """The shortest row that holds a pass-key row's needle, question and answer (a 5-digit key at its worst: one
    token per character, 6 with the space) plus one filler token."""
    fixed = len(encode(NEEDLE_PREFIX)) + len(encode(".\n")) + len(encode("\n" + QUESTION)) + len(encode("."))
    return fixed + 2 * 6 + 1


def pass_key_rows(batch: dict[str, torch.Tensor], index: int, count: int, encode: Callable[[str], list[int]], *,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` (corpus rows) with up to ``count`` of its rows made pass-key rows, a pure function of
    ``(seed, index)``.

    A pass-key row is the corpus row's own text with ``The pass key is NNNNN.`` on a line inserted at a
    uniformly random depth and ``What is the pass key? The pass key is NNNNN.`` at its end, cut to the row
    length: retrieval at every distance up to the training length. Packed retrieval *documents* cannot
    give that: the packer cuts documents anywhere, so an episode of ``d`` tokens survives whole in a
    ``T``-token row with probability ``(T - d) / T`` (6 % at 240 of 256), and the demo's documents put
    8 % of their needles 180+ tokens before the question. The key's digits in the needle carry no label
    (nothing before them predicts them); the answer's do. Rows that are padded or already hold a
    ``pass key is`` (a retrieval document's rival needle) are left as they are.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    B, T = ids.shape
    rng = random.Random(f"{seed}/pass_key/{index}")
    marker = encode(" pass key is")
    has_marker = torch.zeros(B, dtype=torch.bool)
    if len(marker) <= T:
        win = ids.unfold(1, len(marker), 1)  # [B, T - m + 1, m]
        has_marker = (win == torch.tensor(marker)).all(-1).any(-1)
    full = batch["attention_mask"].bool().all(-1)
    eligible = [b for b in range(B) if full[b] and not has_marker[b]]
    chosen = sorted(rng.sample(eligible, k=min(count, len(eligible))))
    if not chosen:
        return batch
    out = {k: v.clone() for k, v in batch.items()}
    prefix, question, stop, period = encode(NEEDLE_PREFIX), encode("\n" + QUESTION), encode(".\n"), encode(".")
    for b in chosen:
        digits = encode(f" {rng.randint(10_000, 99_999)}")
        answer = digits + period
        needle = prefix + digits + stop
        body_len = T - len(needle) - len(question) - len(answer)
        if body_len < 1:
            raise ValueError(f"pass-key rows: {T}-token rows cannot hold the needle, the question and its answer")
        pos = rng.randint(0, body_len)
        body_ids, body_lab = ids[b, :body_len].tolist(), labels[b, :body_len].tolist()
        needle_lab = prefix + [-100] * len(digits) + stop
        row = body_ids[:pos] + needle + body_ids[pos:] + question + answer
        lab = body_lab[:pos] + needle_lab + body_lab[pos:] + question + answer
        lab[0] = -100
        out["input_ids"][b] = torch.tensor(row)
        out["labels"][b] = torch.tensor(lab)
        if "position_ids" in out:
            out["position_ids"][b] = torch.arange(T)
    return out
