"""Mismatches refused by ``train(...)`` before any compute, each with a message saying how to fix it:
teacher/student vocabulary, tokenizer vs the manifest, max_seq_length, k beyond the cache, and a
cache that lacks shards the run will read."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from _rel import make_cfg  # noqa: E402

from distill_dag.data.manifest import Manifest, ManifestMismatchError  # noqa: E402
from distill_dag.training import distributed as distributed_mod  # noqa: E402
from distill_dag.teacher.cache.codec import LogitCacheError  # noqa: E402
from distill_dag.teacher.cache.writer import write_logit_cache  # noqa: E402
from distill_dag.loss.topk import TeacherError  # noqa: E402
from distill_dag.student.trainer import train  # noqa: E402


@pytest.fixture
def no_compute(monkeypatch):
    """Fails the test if the trainer reaches a loss computation or a teacher forward."""
    calls = []

    def forbidden(*_a, **_k):
        calls.append(1)
        raise AssertionError("compute started before the refusal")
    monkeypatch.setattr(distributed_mod, "distill_loss", forbidden)
    from distill_dag.teacher.providers import direct

    monkeypatch.setattr(direct.DirectTeacher, "topk", forbidden)
    yield calls
    assert not calls


def _no_steps(run_dir: Path) -> None:
    p = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
    assert not [r for r in rows if r.get("kind") == "train"]
    assert not (run_dir / "checkpoints").exists()


def test_teacher_student_vocab_mismatch_is_refused_before_any_compute(tmp_path, small_corpus, no_compute):
    from distill_dag.teacher.model import build_tiny_teacher

    vocab = Manifest.load(small_corpus["tokenized"]).vocab_size
    other = tmp_path / "teacher600"
    build_tiny_teacher(vocab + 88, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1), seed=0).save_pretrained(other)
    with pytest.raises(TeacherError, match=rf"teacher vocabulary \({vocab + 88}\) != student vocabulary \({vocab}\).*"
                                           r"student.overrides.vocab_size is refused.*manifest.json.*"
                                           r"tokenizer.name_or_path to the teacher's tokenizer.*preprocess --force"):
        train(make_cfg(tmp_path, small_corpus, other))
    _no_steps(tmp_path / "run")


def test_tokenizer_other_than_the_manifests_is_refused_before_any_compute(tmp_path, small_corpus, tiny_teacher_dir,
                                                                           no_compute):
    # the same size, two token ids swapped: the silent kind of mismatch (every id still embeds)
    tok = shutil.copytree(small_corpus["tokenizer"], tmp_path / "tok")
    tj = json.loads((tok / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tok / "tokenizer.json").write_text(json.dumps(tj))
    cfg = make_cfg(tmp_path, small_corpus, tiny_teacher_dir)
    cfg.tokenizer.dir = str(tok)
    with pytest.raises(ManifestMismatchError, match=r"manifest.json: tokenizer hash .* != the configured tokenizer's"
                                                    r".*--force.*tokenize.force: true.*point the config at the tokenizer"):
        train(cfg)
    _no_steps(tmp_path / "run")
    cfg.tokenizer.dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*tokenizer"):
        train(cfg)
    _no_steps(tmp_path / "run")


def test_max_seq_length_mismatch_is_refused_before_any_compute(tmp_path, small_corpus, tiny_teacher_dir, no_compute):
    cfg = make_cfg(tmp_path, small_corpus, tiny_teacher_dir)
    cfg.tokenize.max_seq_length = 128
    with pytest.raises(ManifestMismatchError, match=r"max_seq_length 64 != tokenize.max_seq_length 128.*"
                                                    r"--max-seq-length 128.*tokenize.max_seq_length: 64"):
        train(cfg)
    _no_steps(tmp_path / "run")


@pytest.fixture(scope="module")
def partial_cache(tmp_path_factory, small_corpus, tiny_teacher_dir):
    """A k=8 cache of the corpus's val shard only (the train shards are not cached)."""
    from distill_dag.teacher.providers.direct import DirectTeacher
    from transformers import AutoModelForCausalLM

    m = Manifest.load(small_corpus["tokenized"])
    val = [Path(s.path).stem for _, s in m.split_shards("val")]
    teacher = DirectTeacher(AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval(), 8)
    cache = tmp_path_factory.mktemp("partial") / "cache"
    write_logit_cache(teacher, small_corpus["tokenized"], cache, 8, 16, shards=val)
    return cache, m


def _cached_cfg(tmp_path, corpus, cache, **kw):
    cfg = make_cfg(tmp_path, corpus, None, teacher_mode="cached", **kw)
    cfg.logit_cache.dir = str(cache)
    return cfg


def test_k_larger_than_the_cache_holds_is_refused_before_any_compute(tmp_path, small_corpus, partial_cache, no_compute):
    cache, _ = partial_cache
    with pytest.raises(LogitCacheError, match=r"holds k=8 .* k=16 was requested; set train.teacher_topk <= 8, or "
                                              r"rebuild the cache with logit_cache.k >= 16"):
        train(_cached_cfg(tmp_path, small_corpus, cache, teacher_topk=16))
    _no_steps(tmp_path / "run")


def test_cache_missing_train_shards_is_refused_before_any_compute(tmp_path, small_corpus, partial_cache, no_compute):
    cache, m = partial_cache
    missing = [Path(s.path).stem for _, s in m.split_shards("train")]
    with pytest.raises(LogitCacheError, match=rf"partition\(s\) {missing[0]}.*--partition {missing[0]}.*distill cache-logits --shards"):
        train(_cached_cfg(tmp_path, small_corpus, cache, teacher_topk=8))
    _no_steps(tmp_path / "run")
