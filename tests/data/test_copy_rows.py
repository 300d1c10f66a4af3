"""Synthetic copy rows (the teacher's induction warm-up): periodic rows, labels that score only what can be
copied, a pure function of (seed, step), clear errors."""

import pytest
import torch

from distill_dag.data.copy_rows import copy_batch, pass_key_rows


def test_each_row_is_one_random_span_repeated_with_its_own_period():
    b = copy_batch(7, 16, 128, 2048, seed=3, min_period=8, max_period=40, first_token=2)
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape == labels.shape == b["attention_mask"].shape == b["position_ids"].shape == (16, 128)
    periods = []
    for row, lab in zip(ids.tolist(), labels.tolist()):
        # the smallest p with row[t] == row[t - p] for every t >= p: an independent reading of the period
        p = next(p for p in range(1, 128) if all(row[t] == row[t - p] for t in range(p, 128)))
        assert 8 <= p <= 40
        periods.append(p)
        # unscored: the first span and its first repeat (nothing earlier predicts them); scored: the rest, = ids
        assert lab[: p + 1] == [-100] * (p + 1) and lab[p + 1:] == row[p + 1:]
    assert len(set(periods)) > 4  # the period varies: position alone cannot solve it
    assert int(ids.min()) >= 2 and int(ids.max()) < 2048
    assert torch.equal(b["position_ids"][0], torch.arange(128)) and bool(b["attention_mask"].all())


def test_rows_are_a_pure_function_of_seed_and_step():
    a, again = copy_batch(5, 4, 64, 512, seed=1, max_period=20), copy_batch(5, 4, 64, 512, seed=1, max_period=20)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not torch.equal(a["input_ids"], copy_batch(6, 4, 64, 512, seed=1, max_period=20)["input_ids"])
    assert not torch.equal(a["input_ids"], copy_batch(5, 4, 64, 512, seed=2, max_period=20)["input_ids"])


@pytest.mark.parametrize("kw, match", [(dict(min_period=0), "min_period"), (dict(max_period=64), "seq_len"),
                                       (dict(min_period=30, max_period=20), "max_period"),
                                       (dict(max_period=20, first_token=512), "first_token")])
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        copy_batch(0, 2, 64, 512, **kw)


def test_small_alphabet_rows_repeat_tokens_inside_their_span():
    b = copy_batch(0, 32, 128, 2048, seed=0, min_period=40, max_period=60, small_alphabet_share=1.0,
                   alphabet_sizes=(4, 8))
    wide = copy_batch(0, 32, 128, 2048, seed=0, min_period=40, max_period=60)
    for row in b["input_ids"].tolist():
        assert len(set(row)) <= 8  # 40-60 tokens from at most 8: one token alone cannot say where the copy is
    assert sum(len(set(r)) > 20 for r in wide["input_ids"].tolist()) == 32
    with pytest.raises(ValueError, match="small_alphabet_share"):
        copy_batch(0, 2, 64, 512, max_period=20, small_alphabet_share=1.5)


def _corpus_batch(tok, rows: int, T: int):
    """Full rows of real text (stdlib source), the layout of distill_dag/data/dataset.py."""
    from tests.support import stdlib_docs

    ids = []
    for _, text in stdlib_docs(200_000, 4000):
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= rows * T:
            break
    x = torch.tensor(ids[: rows * T]).view(rows, T)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone(),
            "position_ids": torch.arange(T).expand(rows, T).clone()}


def test_pass_key_rows_hold_the_eval_wording_at_any_depth_and_score_only_the_answer(bpe_tokenizer):
    from distill_dag.data.tokenizer import load_tokenizer
    from distill_dag.eval.niah import NEEDLE, QUESTION, score

    tok = load_tokenizer(bpe_tokenizer[0])

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    T = 256
    batch = _corpus_batch(tok, 16, T)
    depths, changed = [], 0
    for index in range(8):
        out = pass_key_rows(batch, index, 3, enc, seed=1)
        for b in range(16):
            row, lab = out["input_ids"][b].tolist(), out["labels"][b].tolist()
            if row == batch["input_ids"][b].tolist():
                continue
            changed += 1
            text = tok.decode(row)
            # the needle as distill_dag.eval.niah writes it, and the question + answer ending the row
            key = text.rsplit(QUESTION, 1)[1].strip().rstrip(".")
            assert score(" " + key, key) and len(key) == 5
            assert NEEDLE.format(key=key) + "\n" in text and text.endswith(QUESTION + f" {key}.")
            # the eval's own prompt tokens: the row's end is enc("\n" + QUESTION) then the answer's tokens
            answer = enc(f" {key}") + enc(".")
            assert row[T - len(answer):] == answer and lab[T - len(answer):] == answer
            q = enc("\n" + QUESTION)
            assert row[T - len(answer) - len(q): T - len(answer)] == q
            # the needle's key digits are unscored (nothing predicts them), the rest of the needle is scored
            needle = enc(NEEDLE.format(key=key) + "\n")
            start = next(i for i in range(T) if row[i:i + len(needle)] == needle)
            digits = enc(f" {key}")
            p = len(enc("The pass key is"))
            assert lab[start + p: start + p + len(digits)] == [-100] * len(digits)
            assert lab[start: start + p] == row[start: start + p]
            depths.append(start / T)
            assert torch.equal(out["position_ids"][b], torch.arange(T))
        assert sum(o != i for o, i in zip(out["input_ids"].tolist(), batch["input_ids"].tolist())) == 3
    assert changed == 24
    assert min(depths) < 0.2 and max(depths) > 0.7  # the needle is at every distance from the question
    again = pass_key_rows(batch, 5, 3, enc, seed=1)
    assert torch.equal(again["input_ids"], pass_key_rows(batch, 5, 3, enc, seed=1)["input_ids"])
    assert not torch.equal(again["input_ids"], pass_key_rows(batch, 6, 3, enc, seed=1)["input_ids"])


def test_pass_key_rows_leave_padded_rows_and_rows_with_a_rival_needle(bpe_tokenizer):
    from distill_dag.data.tokenizer import load_tokenizer

    tok = load_tokenizer(bpe_tokenizer[0])

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    batch = _corpus_batch(tok, 3, 128)
    rival = enc("The pass key is 12345.")
    batch["input_ids"][0, 10:10 + len(rival)] = torch.tensor(rival)
    batch["attention_mask"][1, 100:] = 0
    out = pass_key_rows(batch, 0, 3, enc)
    assert torch.equal(out["input_ids"][:2], batch["input_ids"][:2])
    assert not torch.equal(out["input_ids"][2], batch["input_ids"][2])
    with pytest.raises(ValueError, match="cannot hold"):
        pass_key_rows(_corpus_batch(tok, 2, 24), 0, 1, enc)
    # the finetune's up-front bound: rows of that length always hold a pass-key row
    from distill_dag.data.copy_rows import pass_key_row_min_len

    n = pass_key_row_min_len(enc)
    for i in range(20):
        pass_key_rows(_corpus_batch(tok, 2, n), i, 2, enc)
