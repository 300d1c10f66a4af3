"""Needle in a haystack: prompt construction, exact-match scoring, and an evaluator that reports both
success (a Llama known to copy: a hand-set induction circuit) and failure (random init)."""

from pathlib import Path

import pytest
import torch

from distill_dag.eval.niah import (
    NEEDLE,
    QUESTION,
    build_cases,
    evaluate_niah,
    haystack_from_split,
    run_cases,
    score,
    stdlib_haystack,
)
from support import stdlib_tokenizer, tiny_llama
from tests.eval._induction_llama import induction_llama


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from distill_dag.data.tokenizer import load_tokenizer

    return load_tokenizer(stdlib_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=512, max_bytes=200_000)[1])


@pytest.fixture(scope="module")
def hay():
    return stdlib_haystack(60_000)


def test_cases_hold_needle_at_depth_and_question_at_end(tok, hay):
    cases = build_cases(tok, hay, [96, 160], [0.0, 0.5, 1.0], trials=2, seed=3)
    assert len(cases) == 2 * 3 * 2
    assert len({c.key for c in cases}) == len(cases)  # a fresh key per case
    for c in cases:
        assert len(c.input_ids) == c.context_length
        text = tok.decode(c.input_ids)
        assert NEEDLE.format(key=c.key) in text
        assert text.endswith(QUESTION)
        assert text.count(c.key) == 1  # the answer is only in the needle
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        body = c.context_length - len(enc(NEEDLE.format(key=c.key) + "\n")) - len(enc("\n" + QUESTION))
        assert abs(c.needle_start - round(c.depth * body)) <= max(4, body // 20)  # near the asked depth
        assert c.input_ids[c.needle_start:c.needle_start + 3] == enc(NEEDLE.format(key=c.key) + "\n")[:3]
    # deterministic: the same seed builds the same prompts
    again = build_cases(tok, hay, [96, 160], [0.0, 0.5, 1.0], trials=2, seed=3)
    assert [c.input_ids for c in again] == [c.input_ids for c in cases]


@pytest.mark.parametrize("generated,key,ok", [
    (" 58291.", "58291", True), ("58291", "58291", True), (" 582910", "58291", False),
    (" 5829", "58291", False), (" the key 58291", "58291", False), ("", "58291", False),
])
def test_score_is_exact_match_of_the_first_digits(generated, key, ok):
    assert score(generated, key) is ok


def test_copying_model_succeeds_and_random_model_fails(tmp_path, tok, hay):
    kw = dict(context_lengths=[64, 128, 256], depths=[0.0, 0.5, 1.0], trials=3, seed=0)
    copier = evaluate_niah(induction_llama(len(tok)), tok, hay, heatmap_path=tmp_path / "copier.png", **kw)
    random_ = evaluate_niah(tiny_llama(len(tok)), tok, hay, heatmap_path=tmp_path / "random.png", **kw)
    assert copier["accuracy"] >= 0.9, copier["table_markdown"]
    assert all(a >= 2 / 3 for row in copier["grid"] for a in row)
    assert random_["accuracy"] == 0.0
    assert all(r["generated"] for r in random_["results"])  # it did generate; the tokens are just wrong
    # the heat-maps are real PNGs with one cell per depth x length
    import matplotlib.image as mpimg

    for p in ("copier.png", "random.png"):
        img = mpimg.imread(tmp_path / p)
        assert img.ndim == 3 and img.shape[0] > 50
    assert copier["table_markdown"].count("\n") == 2 + 3 - 1


def test_copier_is_scored_against_the_needle_not_any_number(tok, hay):
    cases = build_cases(tok, hay, [128], [0.5], trials=4, seed=1)
    model = induction_llama(len(tok))
    right = run_cases(model, tok, cases)
    assert all(r["correct"] for r in right)
    for c in cases:  # same prompts, but the expected key is another number: every case must fail
        c.key = str((int(c.key) + 1) % 100_000).zfill(5)
    assert not any(r["correct"] for r in run_cases(model, tok, cases))


def test_haystack_from_split_is_real_text_without_eos(small_corpus):
    from distill_dag.data.tokenizer import load_tokenizer

    t = load_tokenizer(small_corpus["tokenizer"])
    text = haystack_from_split(t, small_corpus["tokenized"], "val", max_tokens=3000)
    assert len(t(text, add_special_tokens=False)["input_ids"]) > 1000
    assert t.eos_token not in text
    assert "def " in text or "import " in text  # it is the stdlib corpus, decoded


def test_heatmaps_put_every_model_side_by_side_with_ratios_to_the_teacher(tmp_path):
    from distill_dag.eval.niah import comparison_markdown, plot_heatmaps, ratio_grid

    grids = {"teacher": [[1.0, 0.5], [0.0, 1.0]], "KD student": [[0.5, 0.5], [0.5, 0.0]]}
    r = ratio_grid(grids["KD student"], grids["teacher"])
    assert r[0] == [0.5, 1.0] and r[1][0] != r[1][0] and r[1][1] == 0.0  # NaN where the teacher scores 0
    png = plot_heatmaps(grids, [0.1, 0.9], [64, 128], tmp_path / "h.png", reference="teacher", train_len=64)
    assert png.stat().st_size > 5000
    md = comparison_markdown(grids, [0.1, 0.9], [64, 128], reference="teacher")
    assert "| KD student | 0.1 | 0.50 (0.50) | 0.50 (1.00) |" in md and "| teacher | 0.9 | 0.00 | 1.00 |" in md


def test_haystack_from_split_leaves_out_synthetic_retrieval_documents(tmp_path):
    """The demo corpus' retrieval documents carry pass keys of their own: rival needles."""
    from distill_dag.data.pack import tokenize_to_parquet
    from distill_dag.data.retrieval_docs import documents
    from support import stdlib_tokenizer

    raw, tok_dir, tok_hash = stdlib_tokenizer(tmp_path, vocab_size=300, max_bytes=40_000)
    import json

    with open(raw / "synthetic.jsonl", "w") as f:
        for i, text in enumerate(documents(3, doc_chars=800)):
            f.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")
    tokenize_to_parquet(raw, tmp_path / "tok", tok_dir, 64, val_fraction=0.99, rows_per_shard=512,
                        tokenizer_hash=tok_hash)
    from distill_dag.data.tokenizer import load_tokenizer

    hay = haystack_from_split(load_tokenizer(tok_dir), tmp_path / "tok", "val")
    assert len(hay) > 10_000 and "pass key" not in hay
