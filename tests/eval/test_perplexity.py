import math

import pytest
import torch

from distill_dag.eval.data import iter_batches, load_split
from distill_dag.eval.perplexity import perplexity, perplexity_table
from tests.eval._corpus import pack, tiny_llama, write_split


def _reference_nll(model, batch) -> tuple[float, int]:
    """Each document of each row run on its own (no packing), log-softmax by hand in float64."""
    total, count = 0.0, 0
    for ids, pos, labels in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
        T = ids.shape[0]
        logits = torch.empty(T, model.config.vocab_size, dtype=torch.float64)
        starts = [0] + [t for t in range(1, T) if pos[t] == 0] + [T]
        for a, b in zip(starts[:-1], starts[1:]):
            with torch.no_grad():
                out = model(input_ids=ids[a:b][None], position_ids=pos[a:b][None]).logits[0]
            logits[a:b] = out.double()
        for t in range(T - 1):
            y = int(labels[t + 1])
            if y == -100:
                continue
            row = logits[t]
            lse = row.max() + torch.log(torch.exp(row - row.max()).sum())
            total += float(lse - row[y])
            count += 1
    return total, count


@pytest.fixture()
def packed_split(tmp_path):
    g = torch.Generator().manual_seed(0)
    # documents of several lengths so rows hold several documents and one continues across rows
    docs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 17, 3, 40, 9, 11)]
    rows = pack(docs, eos_id=0, seq_len=24)
    # prompt masking inside a row: a few labels -100 that are not padding
    rows["labels"][1][2:5] = [-100, -100, -100]
    write_split(tmp_path, "val", rows)
    return tmp_path


def test_perplexity_matches_per_document_hand_computation(packed_split):
    model = tiny_llama(vocab_size=97)
    rows = load_split(packed_split, "val")
    assert rows["attention_mask"][-1, -1] == 0  # the last row is padded: the test covers padding
    ref_sum, ref_n = _reference_nll(model, rows)
    got = perplexity(model, packed_split, split="val", batch_size=2)
    assert got["tokens"] == ref_n
    assert got["nats_per_token"] == pytest.approx(ref_sum / ref_n, abs=1e-5)
    assert got["bits_per_token"] == pytest.approx(ref_sum / ref_n / math.log(2), abs=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(ref_sum / ref_n), rel=1e-5)


def test_perplexity_counts_only_unmasked_shifted_labels(packed_split):
    rows = load_split(packed_split, "val")
    expected = int((rows["labels"][:, 1:] != -100).sum())
    got = perplexity(tiny_llama(vocab_size=97), iter_batches(packed_split, "val", 3))
    assert got["tokens"] == expected


def test_uniform_model_has_perplexity_equal_to_vocab_size(packed_split):
    model = tiny_llama(vocab_size=97)
    with torch.no_grad():  # zero LM head -> uniform next-token distribution: ppl == V exactly
        model.lm_head.weight.zero_()
    assert perplexity(model, packed_split)["ppl"] == pytest.approx(97, rel=1e-5)


def test_max_batches_limits_and_table_rows(packed_split):
    a, b = tiny_llama(vocab_size=97, seed=0), tiny_llama(vocab_size=97, seed=1)
    one = perplexity(a, packed_split, batch_size=1, max_batches=1)
    first_row = load_split(packed_split, "val")["labels"][0]
    assert one["tokens"] == int((first_row[1:] != -100).sum())
    table = perplexity_table({"a": a, "b": b}, packed_split, batch_size=2)
    assert [r["model"] for r in table] == ["a", "b"]
    assert table[0]["ppl"] != table[1]["ppl"]
