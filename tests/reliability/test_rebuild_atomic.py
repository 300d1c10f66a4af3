"""A rebuild of tokenized_parquet publishes all-or-nothing: refused, killed at any stage, or out of disk,
it leaves the previous dataset readable and byte-identical (and no partial shards once a run ends);
a second writer of the same output is refused, naming the one that writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from distill_dag import io as io_mod
from distill_dag.data import pack as pack_mod
from distill_dag.data import shards as shards_mod
from distill_dag.data.dataset import PackedDataset
from distill_dag.data.jsonl import RejectRateError
from distill_dag.data.manifest import Manifest
from distill_dag.data.pack import tokenize_to_parquet
from distill_dag.data.shards import ShardWriter, shard_files, verify_shards
from distill_dag.io import DirectoryLockedError, DiskFullError, dir_lock

WORDS = {"<|endoftext|>": 0, "<|pad|>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e": 6, "[UNK]": 7}
KW = dict(val_fraction=0.3, rows_per_shard=2)


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(WORDS, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path_factory.mktemp("wordtok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                            unk_token="[UNK]").save_pretrained(out)
    return out


def _write(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "id": f"{path.stem}:{i}"}) + "\n" for i, t in enumerate(texts)))


def _dataset(out: Path) -> dict[str, str]:
    """What a consumer can see: manifest.json and every file it names, by sha256."""
    m = Manifest.load(out)
    files = {"manifest.json": (out / "manifest.json").read_bytes()}
    files.update({s.path: m.shard_path(s).read_bytes() for s in m.shards})
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


def _readable(out: Path) -> list[list[int]]:
    verify_shards(out)
    ds = PackedDataset(out, "train")
    return [ds[i]["input_ids"].tolist() for i in range(len(ds))]


def _only_the_live_shards(out: Path) -> None:
    listed = sorted(s.path for s in Manifest.load(out).shards)
    assert [p.relative_to(out).as_posix() for p in shard_files(out)] == listed  # no orphan, no partial shard
    assert not list(out.rglob(".*.tmp"))


@pytest.fixture
def built(tmp_path, word_tokenizer):
    """A complete dataset in ``out`` and the changed input that makes the next run a rebuild."""
    inp, out = tmp_path / "in", tmp_path / "out"
    for name in ("1", "2", "3"):
        _write(inp / f"{name}.jsonl", ["a b c d e"] * 4)
    tokenize_to_parquet(inp, out, word_tokenizer, 4, **KW)
    before = _dataset(out), _readable(out)
    _write(inp / "2.jsonl", ["e d c b a", "a a"] * 5)  # another content: the rebuild writes other shards
    return inp, out, before


def test_rebuild_writes_a_new_generation_and_only_the_manifest_replace_publishes_it(built, word_tokenizer):
    inp, out, (old, _) = built
    old_gen = {p.split("/")[0] for p in old if "/" in p}
    r = tokenize_to_parquet(inp, out, word_tokenizer, 4, **KW)
    new = _dataset(out)
    assert all(p.startswith(r["generation"] + "/") for p in new if p != "manifest.json")
    assert {p.split("/")[0] for p in new if "/" in p} != old_gen  # a new folder, never the live one
    assert not any((out / g).exists() for g in old_gen)  # the previous generation removed after the publish
    _only_the_live_shards(out)


def test_rebuild_refused_for_bad_rows_leaves_the_previous_dataset_byte_identical(built, word_tokenizer):
    inp, out, (old, rows) = built
    (inp / "bad.jsonl").write_text("{broken\n" * 40)
    with pytest.raises(RejectRateError, match="40 of"):
        tokenize_to_parquet(inp, out, word_tokenizer, 4, max_reject_rate=0.05, **KW)
    assert _dataset(out) == old and _readable(out) == rows
    _only_the_live_shards(out)
    assert json.loads((out / "rejects.jsonl").read_text().splitlines()[0])["file"].endswith("bad.jsonl")  # why


def _die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(stage: str) -> None:
    """Patch this (forked) process so that it SIGKILLs itself at ``stage`` of a build."""
    if stage == "first_shard_written":
        real_close = shards_mod.ShardWriter._close_shard

        def close(self, *a):
            real_close(self, *a)
            _die()
        shards_mod.ShardWriter._close_shard = close
    elif stage == "rejects_written":  # every shard done, rejects.jsonl written, before the check
        pack_mod.check_reject_rate = _die
    elif stage == "manifest_temp_complete":  # the new manifest fsynced under its temp name, not renamed
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith("manifest.json"):
                _die()
            real_replace(src, dst)
        io_mod.os.replace = replace
    elif stage == "after_publish":  # published, the previous generation not removed yet
        pack_mod.remove_unlisted = _die


def _run_killed(stage: str, *args, **kw) -> None:
    """``tokenize_to_parquet(*args, **kw)`` in a forked child (everything already imported: no start-up
    cost) that is SIGKILLed at ``stage``: no handler, no finally, no cleanup runs."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            _kill_at(stage)
            tokenize_to_parquet(*args, **kw)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{stage}: child status {status}"


@pytest.mark.parametrize("stage", ["first_shard_written", "rejects_written", "manifest_temp_complete",
                                   "after_publish"])
def test_rebuild_killed_at_each_stage_leaves_a_readable_dataset_and_the_rerun_is_clean(
        built, word_tokenizer, tmp_path, stage):
    inp, out, (old, rows) = built
    _run_killed(stage, inp, out, word_tokenizer, 4, **KW)
    clean = tmp_path / "clean"
    tokenize_to_parquet(inp, clean, word_tokenizer, 4, **KW)
    if stage == "after_publish":
        assert _dataset(out) == _dataset(clean)  # the new dataset, whole
    else:
        assert _dataset(out) == old and _readable(out) == rows  # the previous one, untouched
    # the rerun finishes the job: exactly a clean run's dataset, nothing left of the killed one
    tokenize_to_parquet(inp, out, word_tokenizer, 4, **KW)
    assert _dataset(out) == _dataset(clean) and _readable(out) == _readable(clean)
    _only_the_live_shards(out)


@pytest.mark.parametrize("rebuild", [False, True])
def test_disk_full_while_writing_a_shard_names_the_path_and_leaves_no_partial_shards(
        built, word_tokenizer, monkeypatch, tmp_path, rebuild):
    inp, out, (old, rows) = built
    target = out if rebuild else tmp_path / "first"
    real = ShardWriter._write_rows
    calls = [0]

    def write_rows(self, *a):
        calls[0] += 1
        if calls[0] == 3:  # a few shards in: some complete, one open
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a)

    monkeypatch.setattr(ShardWriter, "_write_rows", write_rows)
    with pytest.raises(DiskFullError, match=r"no space left .*writing .*/gen-[0-9a-f]+/(train|val)-\d+\.parquet.*"
                                            r"Nothing was published.*re-run") as err:
        tokenize_to_parquet(inp, target, word_tokenizer, 4, **KW)
    assert err.value.errno == errno.ENOSPC and str(target) in str(err.value)
    if rebuild:
        assert _dataset(out) == old and _readable(out) == rows
        _only_the_live_shards(out)
    else:
        assert not (target / "manifest.json").exists() and not shard_files(target)
        assert not list(target.glob("gen-*"))


def test_a_second_writer_of_the_same_output_is_refused_naming_the_first(built, word_tokenizer):
    inp, out, (old, rows) = built
    with dir_lock(out):  # what a running materialization holds (a separate open file: flock refuses it)
        with pytest.raises(DirectoryLockedError, match=rf"another preprocess run is writing {out} \(pid {os.getpid()}\)"):
            tokenize_to_parquet(inp, out, word_tokenizer, 4, **KW)
        with pytest.raises(DirectoryLockedError):  # workers filling the cache wait for no packer either
            tokenize_to_parquet(inp, out, word_tokenizer, 4, worker=(0, 2), **KW)
    assert _dataset(out) == old and _readable(out) == rows
    with dir_lock(out, shared=True):  # a worker: other workers may run beside it, a packer may not
        tokenize_to_parquet(inp, out, word_tokenizer, 4, worker=(1, 2), **KW)
        with pytest.raises(DirectoryLockedError, match="held shared, by workers"):
            tokenize_to_parquet(inp, out, word_tokenizer, 4, **KW)
    tokenize_to_parquet(inp, out, word_tokenizer, 4, **KW)  # released: the next run goes through
    _only_the_live_shards(out)
