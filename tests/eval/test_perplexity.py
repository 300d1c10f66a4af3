import math

import pytest
import torch

from distill_dag.loss.perplexity import perplexity, perplexity_table
from support import pack, tiny_llama


def _reference_nll(model, rows) -> tuple[float, int]:
    """Each document of each row run on its own (no packing), log-softmax by hand in float64."""
    total, count = 0.0, 0
    for ids, pos, labels in zip(rows["input_ids"], rows["position_ids"], rows["labels"]):
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


def _batches(rows, bs):
    n = rows["input_ids"].shape[0]
    return [{k: v[i : i + bs] for k, v in rows.items()} for i in range(0, n, bs)]


@pytest.fixture()
def rows():
    """Packed rows by the tokenized_parquet contract: several documents per row, one continued across
    rows, a padded last row, and prompt-masked labels inside a row."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 17, 3, 40, 9, 11)]
    r = pack(docs, eos_id=0, seq_len=24)
    r["labels"][1][2:5] = [-100, -100, -100]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in r.items()}


def test_perplexity_matches_per_document_hand_computation(rows):
    model = tiny_llama(vocab_size=97)
    assert rows["attention_mask"][-1, -1] == 0  # the last row is padded: the test covers padding
    assert (rows["position_ids"][1:, 0] != 0).any()  # a document continues from the previous row
    ref_sum, ref_n = _reference_nll(model, rows)
    got = perplexity(model, _batches(rows, 2))
    assert got["tokens"] == ref_n == int((rows["labels"][:, 1:] != -100).sum())
    assert got["nats_per_token"] == pytest.approx(ref_sum / ref_n, abs=1e-5)
    assert got["bits_per_token"] == pytest.approx(ref_sum / ref_n / math.log(2), abs=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(ref_sum / ref_n), rel=1e-5)


def test_uniform_model_has_perplexity_equal_to_vocab_size(rows):
    model = tiny_llama(vocab_size=97)
    with torch.no_grad():  # zero LM head (tied) -> uniform next-token distribution: ppl == V exactly
        model.lm_head.weight.zero_()
    assert perplexity(model, _batches(rows, 3))["ppl"] == pytest.approx(97, rel=1e-5)


def test_max_batches_limits_and_table_rows(rows):
    a, b = tiny_llama(vocab_size=97, seed=0), tiny_llama(vocab_size=97, seed=1)
    one = perplexity(a, _batches(rows, 1), max_batches=1)
    assert one["tokens"] == int((rows["labels"][0, 1:] != -100).sum())
    table = perplexity_table({"a": a, "b": b}, _batches(rows, 2))
    assert [r["model"] for r in table] == ["a", "b"]
    assert table[0]["ppl"] != table[1]["ppl"]
    assert table[0]["ppl"] == pytest.approx(perplexity(a, _batches(rows, 3))["ppl"], rel=1e-6)


def test_perplexity_of_a_data_dir_reads_the_split_through_the_loader(small_corpus):
    from distill_dag.data.dataset import make_loader
    from distill_dag.data.manifest import Manifest

    model = tiny_llama(vocab_size=Manifest.load(small_corpus["tokenized"]).vocab_size)
    batches = list(make_loader(small_corpus["tokenized"], "val", 4))[:3]
    want = _reference_nll(model, {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "position_ids", "labels")})
    got = perplexity(model, small_corpus["tokenized"], split="val", batch_size=4, max_batches=3)
    assert got["tokens"] == want[1]
    assert got["nats_per_token"] == pytest.approx(want[0] / want[1], abs=1e-5)
