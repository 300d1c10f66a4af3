"""Synthetic copy rows (the teacher's induction warm-up): periodic rows, labels that score only what can be
copied, a pure function of (seed, step), clear errors."""

import pytest
import torch

from distill_dag.data.copy_rows import copy_batch


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
