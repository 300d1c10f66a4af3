"""PackedDataset and make_loader: items equal shard rows; deterministic order; exact resume at a step."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distill_dag.data.dataset import PackedDataset, ResumableBatchSampler, make_loader
from distill_dag.data.manifest import ManifestMismatchError
from distill_dag.data.pack import tokenize_to_parquet


@pytest.fixture(scope="module")
def packed(tmp_path_factory, stdlib_raw, bpe_tokenizer):
    out = tmp_path_factory.mktemp("packed")
    # small shards and rows so the split spans several shards and row groups
    from distill_dag.data import shards

    old = shards.ROW_GROUP_TOKENS
    shards.ROW_GROUP_TOKENS = 32 * 20  # 20 rows per row group
    try:
        tokenize_to_parquet(stdlib_raw, out, bpe_tokenizer[0], 32, val_fraction=0.1, rows_per_shard=150)
    finally:
        shards.ROW_GROUP_TOKENS = old
    return out


def test_items_are_the_shard_rows_with_shard_and_row_indices(packed):
    ds = PackedDataset(packed, "train")
    assert ds.groups.shape[0] > len(ds.shards) > 1
    shard_rows = []
    for idx, s in ds.shards:
        t = pq.read_table(packed / s.path).to_pydict()
        shard_rows += [(idx, r, t["input_ids"][r], t["labels"][r], t["position_ids"][r], t["attention_mask"][r])
                       for r in range(s.rows)]
    assert len(ds) == len(shard_rows)
    for i in [0, 1, 19, 20, 149, 150, len(ds) - 1]:
        item = ds[i]
        idx, r, ids, lab, pos, att = shard_rows[i]
        assert (int(item["shard"]), int(item["row"])) == (idx, r)
        for k, ref in (("input_ids", ids), ("labels", lab), ("position_ids", pos), ("attention_mask", att)):
            assert item[k].dtype == torch.long and item[k].tolist() == ref
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_batches_have_the_contract_shapes(packed):
    b = next(iter(make_loader(packed, "train", batch_size=6, seed=0)))
    for k in ("input_ids", "attention_mask", "labels", "position_ids"):
        assert b[k].shape == (6, 32) and b[k].dtype == torch.long
    assert b["shard"].shape == b["row"].shape == (6,)


def _stream(ds, batch_size, seed, start_step, n_steps, **kw):
    it = iter(ResumableBatchSampler(ds, batch_size, seed, start_step, **kw))
    return [next(it) for _ in range(n_steps)]


def test_each_epoch_visits_every_row_once_in_a_seeded_order(packed):
    ds = PackedDataset(packed, "train")
    n = len(ds)
    bs = 7
    steps = (3 * n) // bs + 1
    flat = [i for b in _stream(ds, bs, 3, 0, steps) for i in b]
    for e in range(3):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))  # a permutation per epoch
    assert flat[:n] != flat[n:2 * n]  # epochs are shuffled differently
    assert flat == [i for b in _stream(ds, bs, 3, 0, steps) for i in b]  # same seed, same order
    assert flat[:n] != [i for b in _stream(ds, bs, 4, 0, steps) for i in b][:n]


def test_resume_at_any_step_continues_the_uninterrupted_stream(packed):
    ds = PackedDataset(packed, "train")
    bs = 8
    full = _stream(ds, bs, 11, 0, 3 * len(ds) // bs)
    for start in [1, 5, len(ds) // bs, len(ds) // bs + 1, 2 * len(ds) // bs - 1]:  # incl. across epoch ends
        assert _stream(ds, bs, 11, start, 6) == full[start:start + 6]
    # and through the DataLoader, with workers
    a = list(zip(range(4), make_loader(packed, "train", bs, seed=11, start_step=5, num_workers=2)))
    b = list(zip(range(9), make_loader(packed, "train", bs, seed=11)))[5:]
    for (_, x), (_, y) in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["row"], y["row"])


def test_val_loader_is_one_ordered_pass(packed):
    ds = PackedDataset(packed, "val")
    batches = list(make_loader(packed, "val", batch_size=4))
    assert sum(len(b["row"]) for b in batches) == len(ds)
    rows = [(int(s), int(r)) for b in batches for s, r in zip(b["shard"], b["row"])]
    assert rows == sorted(rows) and len(set(rows)) == len(ds)
    assert len(list(make_loader(packed, "val", batch_size=4, start_step=1))) == len(batches) - 1


def test_dataset_refuses_a_mismatched_manifest(packed):
    with pytest.raises(ManifestMismatchError, match="max_seq_length 32 != tokenize.max_seq_length 64"):
        PackedDataset(packed, "train", max_seq_length=64)
    with pytest.raises(ValueError, match="no 'test' shards"):
        PackedDataset(packed, "test")
