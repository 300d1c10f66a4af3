"""Logit cache: encoding accuracy, one shard per unit of work (atomic, locked, reusable), refusals,
corruption, DuckDB stats."""

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

from support import VOCAB, all_batches, write_data  # noqa: E402
from test_teachers_helpers import reference_kl, reference_kl_bucket, tiny_llama  # noqa: E402

from distill_dag.teacher.cache import layout  # noqa: E402
from distill_dag.teacher.cache.codec import CacheEncoding, LogitCacheError, pack_ids, unpack_ids  # noqa: E402
from distill_dag.teacher.cache.stats import cache_stats  # noqa: E402
from distill_dag.teacher.cache.writer import write_cache_shard, write_logit_cache  # noqa: E402
from distill_dag.teacher.providers.cached import CachedTeacher  # noqa: E402
from distill_dag.teacher.providers.direct import DirectTeacher  # noqa: E402
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
        from distill_dag.loss.topk import TeacherTopK

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


def _records(cache, key):
    return layout.shard_dir(cache, key) / layout.RECORDS


def test_two_shards_written_apart_equal_one_run_byte_for_byte(tmp_path, data, teacher):
    rb = RowByRow(teacher)
    write_logit_cache(rb, data, tmp_path / "one", K, 4)
    # two workers, each with its own teacher object, each writing one shard (the partition's unit)
    a = write_cache_shard(RowByRow(teacher), data, "val-00001", tmp_path / "split", k=K, batch_rows=3)
    b = write_cache_shard(RowByRow(teacher), data, "train-00000", tmp_path / "split", k=K, batch_rows=5)
    assert not a.reused and not b.reused
    for key in ("train-00000", "val-00001"):
        for f in (layout.RECORDS, layout.STATS, layout.SHARD_HEADER):
            assert sha256_file(layout.shard_dir(tmp_path / "one", key) / f) == sha256_file(layout.shard_dir(tmp_path / "split", key) / f)
    assert a.data_version == json.loads((layout.shard_dir(tmp_path / "one", "val-00001") / "shard.json").read_text())["data_version"]


@pytest.mark.parametrize("overlap", [True, False])
def test_encoding_in_a_thread_or_inline_writes_the_same_bytes_and_reports_every_batch(tmp_path, data, teacher,
                                                                                      monkeypatch, overlap):
    from distill_dag.teacher.cache import writer

    batches = [len(b["row"]) for b in writer.iter_shard_batches(layout.read_data_manifest(data).shard("train-00000"), 3)]
    ref = write_cache_shard(RowByRow(teacher), data, "train-00000", tmp_path / "ref", k=K, batch_rows=3)
    monkeypatch.setattr(writer, "overlaps_encoding", lambda provider: overlap)
    seen: list[tuple[int, int]] = []
    got = write_cache_shard(RowByRow(teacher), data, "train-00000", tmp_path / "got", k=K, batch_rows=3,
                            progress=lambda done, total: seen.append((done, total)))
    assert sha256_file(_records(tmp_path / "got", "train-00000")) == sha256_file(_records(tmp_path / "ref", "train-00000"))
    assert got.data_version == ref.data_version
    # one report per batch, each the rows written so far, the last one the whole shard
    assert seen == [(int(n), got.rows) for n in np.cumsum(batches)] and seen[-1][0] == got.rows


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_teachers_helpers import tiny_llama
    from test_logit_cache import RowByRow, K
    from distill_dag.teacher.providers.direct import DirectTeacher
    from distill_dag.teacher.cache.writer import write_cache_shard

    class Dies(RowByRow):
        def topk(self, batch):
            if self.calls == {die_at}:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: a real crash
            return super().topk(batch)

    write_cache_shard(Dies(DirectTeacher(tiny_llama(), K)), {data!r}, {key!r}, {cache!r}, k=K, batch_rows=2)
""")


def test_killed_shard_write_publishes_nothing_and_reruns_alone(tmp_path, data, teacher):
    cache = tmp_path / "c"
    done = write_cache_shard(teacher, data, "train-00000", cache, k=K, batch_rows=4)
    before = (sha256_file(_records(cache, "train-00000")), os.path.realpath(layout.shard_dir(cache, "train-00000")))
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), die_at=2, data=str(data), key="val-00001", cache=str(cache))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert not layout.shard_dir(cache, "val-00001").exists()  # nothing half-written is visible
    assert (cache / ".build" / "val-00001").exists()  # the killed build is left behind...
    with pytest.raises(LogitCacheError, match="partition.*val-00001.*--partition val-00001"):
        CachedTeacher(cache, data, K).topk(all_batches(data, 7)[-1])
    rb = RowByRow(teacher)
    again = write_cache_shard(rb, data, "val-00001", cache, k=K, batch_rows=2)  # ...and cleared by the rerun
    assert rb.calls == 4 and not (cache / ".build" / "val-00001").exists()
    assert (sha256_file(_records(cache, "train-00000")), os.path.realpath(layout.shard_dir(cache, "train-00000"))) == before
    clean = write_cache_shard(RowByRow(teacher), data, "val-00001", tmp_path / "clean", k=K, batch_rows=2)
    assert again.data_version == clean.data_version and done.rows == 10


def test_same_teacher_and_data_reuse_the_shard(tmp_path, data, teacher):
    first = write_logit_cache(teacher, data, tmp_path / "c", K, 4)
    stamp = {k: _records(tmp_path / "c", k).stat().st_mtime_ns for k in ("train-00000", "val-00001")}
    rb = RowByRow(teacher)
    again = write_logit_cache(rb, data, tmp_path / "c", K, 4)
    assert rb.calls == 0 and all(s.reused for s in again)
    assert [s.data_version for s in first] == [s.data_version for s in again]
    assert stamp == {k: _records(tmp_path / "c", k).stat().st_mtime_ns for k in stamp}
    forced = write_cache_shard(RowByRow(teacher), data, "val-00001", tmp_path / "c", k=K, force=True)
    assert not forced.reused and forced.data_version == first[1].data_version  # same bytes, same version


def test_a_second_writer_of_one_shard_is_refused_while_the_first_holds_it(tmp_path, data, teacher):
    import fcntl

    (tmp_path / "c" / ".build").mkdir(parents=True)
    fd = os.open(tmp_path / "c" / ".build" / "val-00001.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(LogitCacheError, match=r"another run \(pid 4242\) is writing logit_cache partition 'val-00001'"):
            write_cache_shard(teacher, data, "val-00001", tmp_path / "c", k=K)
    finally:
        os.close(fd)
    assert write_cache_shard(teacher, data, "val-00001", tmp_path / "c", k=K).rows == 7


def test_a_republished_shard_swaps_whole_and_old_readers_keep_reading(tmp_path, data, teacher):
    cache = tmp_path / "c"
    write_logit_cache(teacher, data, cache, K, 4)
    b = all_batches(data, 4)[0]
    reader = CachedTeacher(cache, data, K)
    old = reader.topk(b)  # maps train-00000's records
    other = DirectTeacher(tiny_llama(seed=3), K)
    new = write_cache_shard(other, data, "train-00000", cache, k=K)
    assert torch.equal(reader.topk(b).indices, old.indices)  # the open map still reads the old generation
    assert len(list((cache / ".gen").glob("train-00000-*"))) == 1  # the old one is gone from disk
    with pytest.raises(LogitCacheError, match="mixes shards of two teachers"):
        CachedTeacher(cache, data, K)  # val-00001 is still the first teacher's
    write_cache_shard(other, data, "val-00001", cache, k=K)
    fresh = CachedTeacher(cache, data, K)
    assert torch.equal(fresh.topk(b).indices, other.topk(b).indices)
    assert fresh.reader.shards[0]["data_version"] == new.data_version


def test_refuses_cache_of_other_tokenizer_other_data_or_smaller_k(tmp_path, teacher):
    data = write_data(tmp_path / "d1", [6])
    write_logit_cache(teacher, data, tmp_path / "c", K, 3)
    with pytest.raises(LogitCacheError, match=r"k=24 .* k=30 was requested.*logit_cache.k >= 30"):
        CachedTeacher(tmp_path / "c", data, 30)
    other_tok = write_data(tmp_path / "d2", [6], tokenizer_hash="tok-hash-2")
    with pytest.raises(LogitCacheError, match="tokenizer hash tok-hash-1 .* tok-hash-2.*rebuild"):
        CachedTeacher(tmp_path / "c", other_tok, K)
    other_rows = write_data(tmp_path / "d3", [6], seed=5)
    stale = CachedTeacher(tmp_path / "c", other_rows, K)  # the shard of that name holds other rows
    with pytest.raises(LogitCacheError, match="train-00000.*stale.*--shards train-00000"):
        stale.require_shards([0])


def test_corrupt_shard_is_detected_and_named(tmp_path, data, teacher):
    write_logit_cache(teacher, data, tmp_path / "c", K, 4)
    shard = _records(tmp_path / "c", "val-00001")
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0x40
    shard.write_bytes(bytes(raw))
    cached = CachedTeacher(tmp_path / "c", data, K)
    cached.topk(all_batches(data, 4)[0])  # the intact shard still reads
    with pytest.raises(LogitCacheError, match=r"records\.npy: cache shard is corrupt.*val-00001"):
        cached.topk(all_batches(data, 4)[-1])
    shard.write_bytes(bytes(raw[:-10]))  # truncated
    with pytest.raises(LogitCacheError, match=r"records\.npy: cache shard is corrupt"):
        CachedTeacher(tmp_path / "c", data, K, verify=False).topk(all_batches(data, 4)[-1])


@pytest.mark.parametrize("dtype", ["compact", "q8"])
def test_writers_stats_are_those_of_its_records_decoded(tmp_path, data, teacher, dtype):
    """The writer computes stats.parquet from the codes in hand, batch by batch: the same bytes as
    write_stats over the published records (which decodes them)."""
    from distill_dag.teacher.cache.codec import CacheEncoding
    from distill_dag.teacher.cache.stats import write_stats

    write_logit_cache(teacher, data, tmp_path / "c", K, 3, dtype=dtype)  # 3: batches end mid-shard
    for key in ("train-00000", "val-00001"):
        d = layout.shard_dir(tmp_path / "c", key)
        header = layout.read_shard_header(tmp_path / "c", key)
        write_stats(np.load(d / layout.RECORDS), CacheEncoding.from_json(header["encoding"]), tmp_path / "s.parquet")
        assert (d / layout.STATS).read_bytes() == (tmp_path / "s.parquet").read_bytes()


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
    st = cache_stats(layout.shard_dir(tmp_path / "c", key) / layout.STATS for key in ("train-00000", "val-00001"))
    assert st["positions"] == sum(len(m) for m in masses) == 10 * 16 + 7 * 16 - 3
    assert st["mean_topk_mass"] == pytest.approx(torch.cat(masses).mean().item(), abs=1e-5)
    assert st["mean_entropy_lb"] == pytest.approx(torch.cat(ents).mean().item(), abs=1e-4)
    assert sum(h["fraction"] for h in st["coverage_histogram"]) == pytest.approx(1.0)




def test_the_cache_records_its_teachers_fingerprint_and_refuses_another_teacher(tmp_path, data):
    """Issue 30 (9): shard.json holds the fingerprint of the teacher folder that wrote it; a cache written
    before fingerprints gets it on reuse (records untouched) and, without one, is still compared by the
    teacher folder's full sha256; another teacher is refused naming both."""
    from distill_dag.teacher.model import teacher_fingerprint
    from distill_dag.io import sha256_dir

    a, b = tmp_path / "teacher_a", tmp_path / "teacher_b"
    tiny_llama(seed=0).save_pretrained(a)
    tiny_llama(seed=1).save_pretrained(b)
    provider = DirectTeacher(tiny_llama(seed=0), K, name=str(a))
    cache = tmp_path / "c"
    write_logit_cache(provider, data, cache, K, 4)
    header = cache / "train-00000" / layout.SHARD_HEADER
    fp_a, fp_b = teacher_fingerprint(a)["hash"], teacher_fingerprint(b)["hash"]
    assert json.loads(header.read_text())["teacher_fingerprint"]["hash"] == fp_a != fp_b

    cached = CachedTeacher(cache, data, K)
    assert "equals that of" in cached.check_teacher(a)
    with pytest.raises(LogitCacheError, match=rf"written by teacher {a} \(fingerprint {fp_a[:16]}\), but "
                                              rf"teacher.model_name_or_path is {b} \(fingerprint {fp_b[:16]}\).*"
                                              r"`distill cache-logits`"):
        cached.check_teacher(b)
    assert cached.identity()["model"] == str(a) and cached.identity()["teacher_fingerprint"] == fp_a

    # a cache of before fingerprints: compared by the whole folder's sha256, then given the fingerprint on reuse
    for key in ("train-00000", "val-00001"):
        h = cache / key / layout.SHARD_HEADER
        h.write_text(json.dumps({k: v for k, v in json.loads(h.read_text()).items() if k != "teacher_fingerprint"}))
    old = CachedTeacher(cache, data, K)
    assert "weights sha256" in old.check_teacher(a)
    with pytest.raises(LogitCacheError, match=rf"weights sha256 {sha256_dir(a)[:16]}.*{b} \(weights sha256 "
                                              rf"{sha256_dir(b)[:16]}"):
        old.check_teacher(b)
    stamp = _records(cache, "train-00000").stat().st_mtime_ns
    again = write_logit_cache(RowByRow(provider), data, cache, K, 4)
    assert all(s.reused for s in again) and _records(cache, "train-00000").stat().st_mtime_ns == stamp
    assert json.loads(header.read_text())["teacher_fingerprint"]["hash"] == fp_a
