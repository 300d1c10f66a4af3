"""Tokenize + pack: hand-computed rows, val split by document, caching, skip_existing, kill and resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from distill_dag.data.manifest import Manifest, ManifestMismatchError, check_manifest
from distill_dag.data.pack import tokenize_to_parquet
from distill_dag.data.shards import CorruptShardError, shard_files, verify_shards


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(out: Path, split: str) -> dict[str, list]:
    m = Manifest.load(out)
    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": [], "source": []}
    for _, s in m.split_shards(split):
        t = pq.read_table(out / s.path).to_pydict()
        for k in cols:
            cols[k] += t[k]
    return cols


P = -100
PAD = 1


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_packing_matches_a_hand_computed_reference(tmp_path, word_tokenizer, mask_prompt):
    # word ids: a2 b3 c4 d5 e6 p7 q8 r9 s10; EOS 0, pad 1
    write_jsonl(tmp_path / "in/docs.jsonl", [
        {"text": "a b c", "source": "s1"},                  # 2 3 4 EOS
        {"prompt": "p q", "response": "r s", "source": "s2"},  # 7 8 | 9 10 EOS   (prompt = 7 8)
        {"text": "d e", "source": "s3"},                    # 5 6 EOS
    ])
    tokenize_to_parquet(tmp_path / "in", tmp_path / "out", word_tokenizer, 5, val_fraction=0.0, mask_prompt=mask_prompt)
    rows = read_rows(tmp_path / "out", "train")
    q_label = P if mask_prompt else 8
    assert rows["input_ids"] == [[2, 3, 4, 0, 7], [8, 9, 10, 0, 5], [6, 0, PAD, PAD, PAD]]
    assert rows["position_ids"] == [[0, 1, 2, 3, 0], [1, 2, 3, 4, 0], [1, 2, 3, 4, 5]]
    # labels are not shifted; -100 at each document start, on prompt tokens (when masked) and on padding
    assert rows["labels"] == [[P, 3, 4, 0, P], [q_label, 9, 10, 0, P], [6, 0, P, P, P]]
    assert rows["attention_mask"] == [[1] * 5, [1] * 5, [1, 1, 0, 0, 0]]
    assert rows["source"] == ["s1", "s2", "s3"]  # the document holding each row's first token
    assert read_rows(tmp_path / "out", "val")["input_ids"] == []
    m = Manifest.load(tmp_path / "out")
    assert (m.eos_id, m.pad_id, m.vocab_size, m.max_seq_length) == (0, 1, 12, 5)
    assert m.totals["train"] == {"shards": 1, "rows": 3, "tokens": 12, "docs": 3}


def test_the_pack_tail_carries_over_across_input_files(tmp_path, word_tokenizer):
    write_jsonl(tmp_path / "in/1.jsonl", [{"text": "a b"}])
    write_jsonl(tmp_path / "in/2.jsonl", [{"text": "c d e"}])
    tokenize_to_parquet(tmp_path / "in", tmp_path / "out", word_tokenizer, 4, val_fraction=0.0)
    rows = read_rows(tmp_path / "out", "train")
    assert rows["input_ids"] == [[2, 3, 0, 4], [5, 6, 0, PAD]]
    assert rows["position_ids"] == [[0, 1, 2, 0], [1, 2, 3, 4]]
    assert rows["source"] == ["1", "2"]  # no "source" field: the input file's stem


def test_text_that_spells_the_eos_token_is_not_a_document_boundary(tmp_path, bpe_tokenizer):
    d, _ = bpe_tokenizer
    write_jsonl(tmp_path / "in/x.jsonl", [{"text": "before <|endoftext|> after"}])
    tokenize_to_parquet(tmp_path / "in", tmp_path / "out", d, 64, val_fraction=0.0)
    rows = read_rows(tmp_path / "out", "train")
    attended = [t for t, a in zip(rows["input_ids"][0], rows["attention_mask"][0]) if a]
    eos = Manifest.load(tmp_path / "out").eos_id
    assert attended.count(eos) == 1 and attended[-1] == eos  # only the EOS the packer appended


def _docs_by_split(out: Path, split: str) -> list[tuple[int, ...]]:
    """Documents rebuilt from the shards: split the attended token stream after each EOS."""
    rows = read_rows(out, split)
    eos = Manifest.load(out).eos_id
    docs, cur = [], []
    for ids, att in zip(rows["input_ids"], rows["attention_mask"]):
        for t, a in zip(ids, att):
            if a:
                cur.append(t)
                if t == eos:
                    docs.append(tuple(cur))
                    cur = []
    return docs


def test_val_split_is_chosen_by_document_id_deterministically(tmp_path, stdlib_raw, bpe_tokenizer):
    d, _ = bpe_tokenizer
    out = tmp_path / "out"
    tokenize_to_parquet(stdlib_raw, out, d, 128, val_fraction=0.2, rows_per_shard=200)
    from distill_dag.data.tokenizer import load_tokenizer

    tok = load_tokenizer(d)
    tok.backend_tokenizer.encode_special_tokens = True
    expected = {"train": [], "val": []}
    for f in sorted(stdlib_raw.rglob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            h = int.from_bytes(hashlib.blake2b(r["id"].encode(), digest_size=8).digest(), "big") / 2**64
            ids = tuple(tok(r["text"])["input_ids"] + [tok.eos_token_id])
            expected["val" if h < 0.2 else "train"].append(ids)
    assert 0 < len(expected["val"]) < len(expected["train"])
    assert _docs_by_split(out, "val") == expected["val"]
    assert _docs_by_split(out, "train") == expected["train"]
    m = Manifest.load(out)
    assert m.totals["val"]["docs"] == len(expected["val"])
    assert sum(i["val_docs"] for i in m.inputs.values()) == len(expected["val"])


def test_same_named_inputs_in_different_folders_do_not_collide(tmp_path, word_tokenizer):
    write_jsonl(tmp_path / "in/x/data.jsonl", [{"text": "a b"}])
    write_jsonl(tmp_path / "in/y/data.jsonl", [{"text": "c d e"}])
    r = tokenize_to_parquet(tmp_path / "in", tmp_path / "out", word_tokenizer, 8, val_fraction=0.0)
    assert sorted(r["inputs"]) == ["x/data.jsonl", "y/data.jsonl"]
    assert [r["inputs"][k]["tokens"] for k in ("x/data.jsonl", "y/data.jsonl")] == [3, 4]
    assert len(list((tmp_path / "out/.cache").glob("*.json"))) == 2
    assert read_rows(tmp_path / "out", "train")["input_ids"] == [[2, 3, 0, 4, 5, 6, 0, PAD]]


def _shard_hashes(out: Path) -> dict[str, str]:
    """The dataset's shards by name (whatever generation folder holds them) -> sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_files(out)}


def _stamps(out: Path) -> dict[str, int]:
    """Every file's mtime, the lock file aside (bookkeeping of who writes, not the dataset)."""
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
            and p.name != ".lock"}


def test_skip_existing_retokenizes_only_changed_inputs_and_matches_a_clean_run(tmp_path, word_tokenizer):
    for name, text in [("1", "a b"), ("2", "c d"), ("3", "e a")]:
        write_jsonl(tmp_path / f"in/{name}.jsonl", [{"text": text, "id": name}] * 3)
    out = tmp_path / "out"
    r1 = tokenize_to_parquet(tmp_path / "in", out, word_tokenizer, 4, val_fraction=0.3, rows_per_shard=2)
    assert r1["tokenized"] == ["1.jsonl", "2.jsonl", "3.jsonl"]
    stamps = _stamps(out)

    r2 = tokenize_to_parquet(tmp_path / "in", out, word_tokenizer, 4, val_fraction=0.3, rows_per_shard=2)
    assert r2["up_to_date"] and r2["tokenized"] == []
    assert _stamps(out) == stamps  # nothing rewritten

    write_jsonl(tmp_path / "in/2.jsonl", [{"text": "d d d", "id": "2"}] * 3)
    r3 = tokenize_to_parquet(tmp_path / "in", out, word_tokenizer, 4, val_fraction=0.3, rows_per_shard=2)
    assert r3["tokenized"] == ["2.jsonl"] and r3["reused"] == ["1.jsonl", "3.jsonl"]
    clean = tokenize_to_parquet(tmp_path / "in", tmp_path / "clean", word_tokenizer, 4, val_fraction=0.3,
                                rows_per_shard=2)
    assert _shard_hashes(out) == _shard_hashes(tmp_path / "clean")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "clean/manifest.json").read_bytes()
    assert clean["tokenized"] == ["1.jsonl", "2.jsonl", "3.jsonl"]

    r4 = tokenize_to_parquet(tmp_path / "in", out, word_tokenizer, 4, val_fraction=0.3, rows_per_shard=2, force=True)
    assert r4["tokenized"] == ["1.jsonl", "2.jsonl", "3.jsonl"] and r4["reused"] == []
    assert _shard_hashes(out) == _shard_hashes(tmp_path / "clean")


def test_removed_inputs_leave_no_stale_shards_or_caches(tmp_path, word_tokenizer):
    for i in range(4):
        write_jsonl(tmp_path / f"in/{i}.jsonl", [{"text": "a b c d e"}] * 4)
    out = tmp_path / "out"
    tokenize_to_parquet(tmp_path / "in", out, word_tokenizer, 4, val_fraction=0.0, rows_per_shard=2)
    n_before = len(shard_files(out))
    for i in range(1, 4):
        (tmp_path / f"in/{i}.jsonl").unlink()
    tokenize_to_parquet(tmp_path / "in", out, word_tokenizer, 4, val_fraction=0.0, rows_per_shard=2)
    m = Manifest.load(out)
    assert [p.relative_to(out).as_posix() for p in shard_files(out)] == sorted(s.path for s in m.shards)
    assert len(m.shards) < n_before
    assert sorted(p.name.split("-")[0] for p in (out / ".cache").glob("*.json")) == ["0.jsonl"]


_CHILD = """
import sys, time
from distill_dag.data import pack
real = pack.encode_rows
def slow(*a, **k):  # widen the window in which the parent kills us
    time.sleep(0.15)
    return real(*a, **k)
pack.encode_rows = slow
pack.tokenize_to_parquet(sys.argv[1], sys.argv[2], sys.argv[3], 64, rows_per_shard=40, batch_docs=4, val_fraction=0.1)
print("finished")
"""


def test_killed_run_then_rerun_gives_the_manifest_and_shards_of_a_clean_run(tmp_path, stdlib_raw, bpe_tokenizer):
    d, _ = bpe_tokenizer
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(stdlib_raw), str(out), str(d)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if child.poll() is not None:
                pytest.fail(f"child ended before it could be killed: {child.communicate()}")
            metas = list((out / ".cache").glob("*.json")) if (out / ".cache").exists() else []
            if metas and shard_files(out):  # one input cached and shards written
                break
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    assert not (out / "manifest.json").exists()  # killed mid-run, before the manifest
    r = tokenize_to_parquet(stdlib_raw, out, d, 64, rows_per_shard=40, batch_docs=4, val_fraction=0.1)
    assert r["reused"]  # the input finished before the kill is not tokenized again
    tokenize_to_parquet(stdlib_raw, tmp_path / "clean", d, 64, rows_per_shard=40, batch_docs=4, val_fraction=0.1)
    assert (out / "manifest.json").read_bytes() == (tmp_path / "clean/manifest.json").read_bytes()
    assert _shard_hashes(out) == _shard_hashes(tmp_path / "clean")
    assert not list(out.glob(".*.tmp")) and not list((out / ".cache").glob(".*.tmp"))
    verify_shards(out)


def test_bad_rows_are_reported_in_the_rejects_file_not_fatal(tmp_path, word_tokenizer):
    f = tmp_path / "in/x.jsonl"
    f.parent.mkdir(parents=True)
    f.write_bytes(b'{"text": "a b"}\n{broken\n\xff\xfe\n{"text": 5}\n{"text": "c"}\n')
    r = tokenize_to_parquet(tmp_path / "in", tmp_path / "out", word_tokenizer, 4, val_fraction=0.0)
    assert r["rejects"] == 3 and r["totals"]["docs"] == 2
    rej = [json.loads(x) for x in Path(r["rejects_file"]).read_text().splitlines()]
    assert [(x["file"], x["line"]) for x in rej] == [(str(f), 2), (str(f), 3), (str(f), 4)]
    from distill_dag.data.jsonl import RejectRateError

    with pytest.raises(RejectRateError, match="3 of 5 rows rejected"):
        tokenize_to_parquet(tmp_path / "in", tmp_path / "out2", word_tokenizer, 4, max_reject_rate=0.5)


def test_manifest_mismatch_names_the_value_and_the_fix(tmp_path, word_tokenizer):
    write_jsonl(tmp_path / "in/x.jsonl", [{"text": "a b"}])
    r = tokenize_to_parquet(tmp_path / "in", tmp_path / "out", word_tokenizer, 4)
    m = Manifest.load(tmp_path / "out")
    check_manifest(m, r["tokenizer_hash"], 4, vocab_size=12)
    with pytest.raises(ManifestMismatchError, match=r"max_seq_length 4 != tokenize.max_seq_length 8.*force"):
        check_manifest(m, r["tokenizer_hash"], 8)
    with pytest.raises(ManifestMismatchError, match=r"tokenizer hash .* != the configured tokenizer's .*distill preprocess --force"):
        check_manifest(m, "0" * 64, 4)
    with pytest.raises(ManifestMismatchError, match=r"vocab_size 12 > the model's 10"):
        check_manifest(m, None, None, vocab_size=10)


def test_verify_shards_names_a_truncated_or_corrupted_shard(tmp_path, word_tokenizer):
    write_jsonl(tmp_path / "in/x.jsonl", [{"text": "a b c d e"}] * 20)
    tokenize_to_parquet(tmp_path / "in", tmp_path / "out", word_tokenizer, 4, val_fraction=0.0, rows_per_shard=5)
    assert verify_shards(tmp_path / "out")["ok"]
    m = Manifest.load(tmp_path / "out")
    victim = m.shard_path(m.shards[1])
    assert victim.name == "train-00001.parquet"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=r"train-00001.parquet: \d+ bytes, manifest says"):
        verify_shards(tmp_path / "out")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(flipped))
    with pytest.raises(CorruptShardError, match="train-00001.parquet: sha256 differs"):
        verify_shards(tmp_path / "out")


def _reference_pack(docs: list[tuple[list[int], int, str]], width: int, eos: int, pad: int, mask_prompt: bool):
    """Plain-Python packing of (ids, prompt_len, source) documents: one token at a time."""
    stream = []  # (token, label, position, source)
    for ids, prompt_len, src in docs:
        for i, t in enumerate(ids + [eos]):
            lab = -100 if i == 0 or (mask_prompt and i < prompt_len) else t
            stream.append((t, lab, i, src))
    rows = [stream[i:i + width] for i in range(0, len(stream), width)]
    out = {"ids": [], "att": [], "lab": [], "pos": [], "src": []}
    for r in rows:
        k = len(r)
        out["ids"].append([x[0] for x in r] + [pad] * (width - k))
        out["att"].append([1] * k + [0] * (width - k))
        out["lab"].append([x[1] for x in r] + [-100] * (width - k))
        out["pos"].append([x[2] for x in r] + [r[-1][2] + 1 + j for j in range(width - k)])
        out["src"].append(r[0][3])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_packer_matches_a_token_by_token_reference(seed):
    from distill_dag.data.packer import Packer

    rng = np.random.default_rng(seed)
    width = int(rng.choice([1, 3, 7, 16]))
    mask_prompt = bool(seed % 2)
    docs = []
    for _ in range(int(rng.integers(1, 40))):
        n = int(rng.integers(1, 30))
        docs.append(([int(x) for x in rng.integers(2, 50, n)], int(rng.integers(0, n + 1)) if rng.random() < 0.4 else 0,
                     f"s{int(rng.integers(0, 4))}"))
    got = {"ids": [], "att": [], "lab": [], "pos": [], "src": []}

    def emit(ids, att, lab, pos, src):
        for k, a in zip(("ids", "att", "lab", "pos"), (ids, att, lab, pos)):
            assert a.shape[1] == width
            got[k] += a.tolist()
        got["src"] += src

    p = Packer(width, 0, 1, mask_prompt, emit)
    i = 0
    while i < len(docs):  # batches of random size, so the carried tail crosses add() calls
        j = i + int(rng.integers(1, 6))
        batch = docs[i:j]
        p.add(np.array([t for d in batch for t in d[0]], np.int32), np.array([len(d[0]) for d in batch]),
              np.array([d[1] for d in batch], np.int32), [d[2] for d in batch])
        i = j
    p.finish()
    assert got == _reference_pack(docs, width, 0, 1, mask_prompt)


def test_shard_bytes_do_not_depend_on_batching_or_threads(tmp_path, stdlib_raw, bpe_tokenizer, monkeypatch):
    """Encoding runs ahead in threads and shards are written by another: the bytes must not depend on it."""
    from distill_dag.data import encode, pack

    d, _ = bpe_tokenizer
    runs = []
    for i, (batch_docs, batch_bytes, inflight) in enumerate([(1024, 4 << 20, 2), (3, 1 << 14, 1), (7, 1 << 12, 3)]):
        monkeypatch.setattr(encode, "_BATCH_BYTES", batch_bytes)
        monkeypatch.setattr(pack, "_ENCODE_INFLIGHT", inflight)
        out = tmp_path / f"out{i}"
        tokenize_to_parquet(stdlib_raw, out, d, 96, rows_per_shard=30, batch_docs=batch_docs, val_fraction=0.2)
        runs.append((_shard_hashes(out), (out / "manifest.json").read_bytes()))
    assert len(runs[0][0]) > 4  # several shards of each split
    assert runs[1] == runs[0] and runs[2] == runs[0]


@pytest.mark.parametrize("how", ["rewritten in place", "truncated"])
@pytest.mark.parametrize("worker", [None, (0, 1)])
def test_an_input_rewritten_mid_read_is_detected_and_nothing_is_published(tmp_path, word_tokenizer, monkeypatch,
                                                                          how, worker):
    from distill_dag.data import encode
    from distill_dag.data.token_cache import InputChangedError

    f = write_jsonl(tmp_path / "in/x.jsonl", [{"text": "a b c"}] * 3000)  # well past the read buffer
    real = encode.iter_jsonl

    def iter_then_rewrite(path, *a, **k):
        for i, item in enumerate(real(path, *a, **k)):
            if i == 2:  # the reader is part-way: another process rewrites what it has not read yet
                with open(path, "r+b") as w:
                    if how == "truncated":
                        w.truncate(len(json.dumps({"text": "a b c"})) * 5)
                    else:
                        w.seek(-9, os.SEEK_END)  # same size: only the content tells
                        w.write(b'"d e e"}\n')
            yield item

    monkeypatch.setattr(encode, "iter_jsonl", iter_then_rewrite)
    out = tmp_path / "out"
    with pytest.raises(InputChangedError, match=rf"{f} changed while this run read it .*Nothing was published"):
        tokenize_to_parquet(tmp_path / "in", out, word_tokenizer, 4, val_fraction=0.0, worker=worker)
    assert not (out / "manifest.json").exists() and not shard_files(out) and not list(out.glob("gen-*"))
    assert not list((out / ".cache").glob("*.json"))  # no cache claims the content of a file in flux
    monkeypatch.setattr(encode, "iter_jsonl", real)
    r = tokenize_to_parquet(tmp_path / "in", out, word_tokenizer, 4, val_fraction=0.0)  # the file as it is now
    assert r["inputs"]["x.jsonl"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_an_output_inside_a_recursive_input_is_never_read_and_warns(tmp_path, word_tokenizer):
    write_jsonl(tmp_path / "in/a.jsonl", [{"text": "a b"}])
    (tmp_path / "in/a.jsonl").write_text((tmp_path / "in/a.jsonl").read_text() + "{broken\n")
    out = tmp_path / "in/tok"  # its rejects.jsonl would be an input on the next run
    seen: list[str] = []
    for _ in range(3):
        r = tokenize_to_parquet(tmp_path / "in", out, word_tokenizer, 4, val_fraction=0.0, force=True,
                                log=seen.append)
        assert sorted(r["inputs"]) == ["a.jsonl"] and r["rejects"] == 1  # the same every run
    assert "inside the input directory" in seen[0] and str(out) in seen[0] and r["warnings"] == seen[-1:]
    assert "rejects.jsonl" in seen[-1]  # named as left out
    with pytest.raises(ValueError, match="inside the output directory"):  # output == input: it would read itself
        tokenize_to_parquet(tmp_path / "in", tmp_path / "in", word_tokenizer, 4)
