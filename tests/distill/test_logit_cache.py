"""Logit cache: encoding accuracy, resumability, idempotence, refusals, corruption, DuckDB stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from support import VOCAB, all_batches, write_data  # noqa: E402
from test_teachers_helpers import reference_kl, reference_kl_bucket, tiny_llama  # noqa: E402

from distill_dag.distill.logit_cache import (  # noqa: E402
    CacheEncoding, CacheWriter, LogitCacheError, cache_stats, pack_ids, unpack_ids, write_logit_cache,
)
from distill_dag.distill.teachers.cached import CachedTeacher  # noqa: E402
from distill_dag.distill.teachers.direct import DirectTeacher  # noqa: E402
from distill_dag.io import sha256_file  # noqa: E402

K = 24


class RowByRow:
    """The direct teacher run one row at a time, so its output for a row never depends on the batch."""

    def __init__(self, inner: DirectTeacher) -> None:
        self.inner, self.k, self.vocab_size, self.calls = inner, inner.k, inner.vocab_size, 0

    def topk(self, batch):
        self.calls += 1
        outs = [self.inner.topk({k: v[b : b + 1] for k, v in batch.items() if v.dim() == 2})
                for b in range(batch["input_ids"].shape[0])]
        from distill_dag.distill.teachers.base import TeacherTopK

        return TeacherTopK(torch.cat([o.indices for o in outs]), torch.cat([o.logprobs for o in outs]))

    def identity(self):
        return self.inner.identity()

    def close(self):
        pass


@pytest.fixture(scope="module")
def teacher():
    return DirectTeacher(tiny_llama(), K)


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "data", [10, 7])


@pytest.mark.parametrize("dtype,tol", [("q8", 1e-3), ("fp16", 3e-4), ("fp32", 1e-6)])
def test_cached_kl_matches_direct_kl_on_same_batches(tmp_path, data, teacher, dtype, tol):
    write_logit_cache(teacher, data, tmp_path / "cache", K, 4, dtype=dtype)
    cached = CachedTeacher(tmp_path / "cache", data, K)
    student = tiny_llama(seed=1)
    errs, errs_b = [], []
    for b in all_batches(data, 3):
        d, c = teacher.topk(b), cached.topk(b)
        assert torch.equal(d.indices, c.indices)
        s = student(b["input_ids"]).logits.detach()
        errs.append((reference_kl(d.indices, d.logprobs, s) - reference_kl(c.indices, c.logprobs, s)).abs().flatten())
        errs_b.append((reference_kl_bucket(d.indices, d.logprobs, s) - reference_kl_bucket(c.indices, c.logprobs, s)).abs().flatten())
        # the decoded top-k holds the teacher's top-k mass (the tail is stored, not re-derived)
        torch.testing.assert_close(c.logprobs.double().logsumexp(-1), d.logprobs.double().logsumexp(-1), atol=1e-5, rtol=0)
    assert torch.cat(errs).mean() < tol
    assert torch.cat(errs_b).mean() < tol


def test_smaller_k_from_a_larger_cache_is_the_teachers_top_k(tmp_path, data, teacher):
    write_logit_cache(teacher, data, tmp_path / "cache", K, 8, dtype="fp32")
    b = all_batches(data, 4)[1]
    c = CachedTeacher(tmp_path / "cache", data, 5).topk(b)
    d = DirectTeacher(teacher.model, 5).topk(b)
    assert torch.equal(c.indices, d.indices)
    torch.testing.assert_close(c.logprobs, d.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [1, 7, 11, 17, 25])
def test_bitpacked_ids_round_trip(bits):
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, 2**bits, size=(37, 13))
    assert np.array_equal(unpack_ids(pack_ids(ids, bits), 13, bits), ids)


def test_q8_gap_codes_never_overflow_on_extreme_gaps():
    enc = CacheEncoding(k=6, vocab_size=VOCAB, seq_len=2, logprobs="q8")
    lp = np.array([[[-0.01, -9.0, -9.0, -9.001, -40.0, -150.0], [-1.6, -1.7, -1.8, -1.9, -2.0, -2.1]]], np.float32)
    ids = np.arange(6)[None, None].repeat(2, 1)
    rec = enc.encode(ids, lp, np.zeros((1, 2), np.int32), np.array([2]))
    _, back = enc.decode(rec)
    want = np.maximum(lp, lp[..., :1] - 100.0)  # gaps beyond 100 nats are clamped by design
    mass = np.log(np.exp(want.astype(np.float64)).sum(-1))
    assert np.abs(np.log(np.exp(back.astype(np.float64)).sum(-1)) - mass).max() < 1e-5
    step = np.diff(want, axis=-1).__abs__().max(-1) / 254
    assert np.all(np.abs(back - want)[..., :4] <= step[..., None] + 1e-4)


def test_training_side_writer_gives_byte_identical_cache(tmp_path, data, teacher):
    rb = RowByRow(teacher)
    write_logit_cache(rb, data, tmp_path / "offline", K, 4)
    # training order: shuffled rows across shards, odd batch sizes, rows seen twice, two sessions
    batches = all_batches(data, 1)
    order = np.random.default_rng(0).permutation(len(batches))
    seq = [batches[i] for i in order] + [batches[0]]
    w = CacheWriter(tmp_path / "train", data, k=K, vocab_size=VOCAB, teacher_identity=rb.identity())
    for i in range(0, 9, 3):
        b = {k: torch.cat([x[k] for x in seq[i : i + 3]]) for k in seq[0]}
        w.add(b, rb.topk(b))
    w.close()
    w = CacheWriter(tmp_path / "train", data, k=K, vocab_size=VOCAB, teacher_identity=rb.identity())  # resumed run
    for b in seq[9:]:
        w.add(b, rb.topk(b))
    w.close()
    assert w.complete
    for name in ("train-00000.npy", "val-00001.npy", "train-00000.stats.parquet", "val-00001.stats.parquet"):
        assert sha256_file(tmp_path / "offline" / name) == sha256_file(tmp_path / "train" / name), name
    a = json.loads((tmp_path / "offline" / "manifest.json").read_text())
    b = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert a == b


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_teachers_helpers import tiny_llama
    from test_logit_cache import RowByRow, K
    from distill_dag.distill.teachers.direct import DirectTeacher
    from distill_dag.distill.logit_cache import write_logit_cache

    class Dies(RowByRow):
        def topk(self, batch):
            if self.calls == {die_at}:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: a real crash
            return super().topk(batch)

    write_logit_cache(Dies(DirectTeacher(tiny_llama(), K)), {data!r}, {cache!r}, K, 2)
""")


def test_killed_writer_resumes_and_never_rewrites_a_finished_shard(tmp_path, data, teacher):
    # 10 rows in shard 0 at 2 rows/batch = 5 calls; dying at call 7 is inside shard 1
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), die_at=7, data=str(data), cache=str(tmp_path / "c"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    first = tmp_path / "c" / "train-00000.npy"
    assert first.exists() and not (tmp_path / "c" / "val-00001.npy").exists()
    before = (first.stat().st_ino, first.stat().st_mtime_ns, sha256_file(first))
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["data_shard"] for s in man["shards"]] == ["train-00000.parquet"] and not man["complete"]
    with pytest.raises(LogitCacheError, match="not in the cache"):
        CachedTeacher(tmp_path / "c", None, K).topk(all_batches(data, 7)[-1])

    rb = RowByRow(teacher)
    write_logit_cache(rb, data, tmp_path / "c", K, 2)
    assert rb.calls <= 4  # only shard 1 (7 rows) was computed
    assert (first.stat().st_ino, first.stat().st_mtime_ns, sha256_file(first)) == before
    write_logit_cache(RowByRow(teacher), data, tmp_path / "clean", K, 2)
    for name in ("train-00000.npy", "val-00001.npy"):
        assert sha256_file(tmp_path / "c" / name) == sha256_file(tmp_path / "clean" / name)
    assert not list((tmp_path / "c").glob(".*.tmp"))


def test_second_run_is_a_no_op(tmp_path, data, teacher):
    write_logit_cache(teacher, data, tmp_path / "c", K, 4)
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.npy")}
    rb = RowByRow(teacher)
    man = write_logit_cache(rb, data, tmp_path / "c", K, 4)
    assert rb.calls == 0 and man["complete"]
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.npy")}


def test_refuses_cache_of_other_tokenizer_other_data_or_smaller_k(tmp_path, teacher):
    data = write_data(tmp_path / "d1", [6])
    write_logit_cache(teacher, data, tmp_path / "c", K, 3)
    with pytest.raises(LogitCacheError, match=r"k=24 .* k=30 was requested.*logit_cache.k >= 30"):
        CachedTeacher(tmp_path / "c", data, 30)
    other_tok = write_data(tmp_path / "d2", [6], tokenizer_hash="tok-hash-2")
    with pytest.raises(LogitCacheError, match="tokenizer hash tok-hash-1 .* tok-hash-2.*rebuild"):
        CachedTeacher(tmp_path / "c", other_tok, K)
    other_rows = write_data(tmp_path / "d3", [6], seed=5)
    with pytest.raises(LogitCacheError, match="data manifest hash.*distill cache-logits"):
        CachedTeacher(tmp_path / "c", other_rows, K)
    # a batch whose tokens differ from the cached row's is refused even without a manifest to compare
    b = all_batches(other_rows, 2)[0]
    with pytest.raises(LogitCacheError, match="other tokens"):
        CachedTeacher(tmp_path / "c", None, K).topk(b)


def test_writer_refuses_other_teacher_unless_forced(tmp_path, data, teacher):
    write_logit_cache(teacher, data, tmp_path / "c", K, 4)
    other = DirectTeacher(tiny_llama(seed=3), K)
    with pytest.raises(LogitCacheError, match="teacher_hash.*--force"):
        write_logit_cache(other, data, tmp_path / "c", K, 4)
    write_logit_cache(other, data, tmp_path / "c", K, 4, overwrite=True)
    b = all_batches(data, 4)[0]
    assert torch.equal(CachedTeacher(tmp_path / "c", data, K).topk(b).indices, other.topk(b).indices)


def test_corrupt_shard_is_detected_and_named(tmp_path, data, teacher):
    write_logit_cache(teacher, data, tmp_path / "c", K, 4)
    shard = tmp_path / "c" / "val-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0x40
    shard.write_bytes(bytes(raw))
    cached = CachedTeacher(tmp_path / "c", data, K)
    cached.topk(all_batches(data, 4)[0])  # the intact shard still reads
    with pytest.raises(LogitCacheError, match=r"val-00001\.npy: cache shard is corrupt"):
        cached.topk(all_batches(data, 4)[-1])
    shard.write_bytes(bytes(raw[:-10]))  # truncated
    with pytest.raises(LogitCacheError, match=r"val-00001\.npy: cache shard is corrupt"):
        CachedTeacher(tmp_path / "c", data, K, verify=False).topk(all_batches(data, 4)[-1])


def test_cache_stats_match_the_teachers_distribution(tmp_path, data, teacher):
    write_logit_cache(teacher, data, tmp_path / "c", K, 4, dtype="fp32")
    masses, ents = [], []
    for b in all_batches(data, 4):
        out = teacher.model(b["input_ids"], position_ids=b["position_ids"], use_cache=False)
        lp = torch.log_softmax(out.logits.double(), -1)
        top = lp.topk(K, -1).values
        valid = b["attention_mask"].bool()
        mass = top.exp().sum(-1)
        tail = (1 - mass).clamp_min(1e-300)
        ent = -(top.exp() * top).sum(-1) - tail * tail.log()
        masses.append(mass[valid])
        ents.append(ent[valid])
    st = cache_stats(tmp_path / "c")
    assert st["positions"] == sum(len(m) for m in masses) == 10 * 16 + 7 * 16 - 3
    assert st["mean_topk_mass"] == pytest.approx(torch.cat(masses).mean().item(), abs=1e-5)
    assert st["mean_entropy_lb"] == pytest.approx(torch.cat(ents).mean().item(), abs=1e-4)
    assert sum(h["fraction"] for h in st["coverage_histogram"]) == pytest.approx(1.0)


def test_training_cache_writer_from_config_refuses_a_teacher_with_too_small_k(tmp_path, data, teacher):
    from distill_dag.config import config_from_dict
    from distill_dag.distill.logit_cache import open_cache_writer

    cfg = config_from_dict({"data": {"root": str(data.parent)}, "logit_cache": {"dir": str(tmp_path / "c"), "k": K}})
    with pytest.raises(LogitCacheError, match=r"k = max\(train.teacher_topk, logit_cache.k\)"):
        open_cache_writer(cfg, DirectTeacher(teacher.model, K - 1))
    w = open_cache_writer(cfg, teacher)
    for b in all_batches(data, 5):
        w.add(b, teacher.topk(b))
    w.close()
    assert w.complete and CachedTeacher(tmp_path / "c", data, K).k == K
