"""The tokenize stage: JSONL documents tokenized and packed into fixed-length rows of parquet shards.

:func:`tokenize_stage` (``distill preprocess``, the ``tokenized_parquet`` asset) and :func:`tokenize_to_parquet`
are the entry points. The jobs they chain, one module each:

- :mod:`distill_dag.data.encode`: an input read in batches of rows, each batch encoded (text, prompt/response
  and chat rows);
- :mod:`distill_dag.data.packer`: the documents packed into rows of one split (positions, labels, padding),
  and which split a document is in;
- :mod:`distill_dag.data.token_cache`: each input's tokens cached under ``<output>/.cache/``, so that
  ``skip_existing`` re-tokenizes only inputs whose content changed (an input changing while it is read is
  refused: :class:`~distill_dag.data.token_cache.InputChangedError`);
- :mod:`distill_dag.data.generations`: the shards of a build written into a new generation folder and
  published, all or nothing, by the atomic replace of ``<output>/manifest.json``.

One run writes an output at a time (``<output>/.lock``); workers filling the token cache
(``worker=(i, n)``) share it, and never read the output tree as input.

Three stages overlap (on 2 cores 1.08-1.2x the bare tokenizer's ``encode_batch`` and ~0.8 of its
``encode_batch_fast``, wall-clock, bench/tokenization.py; the work besides encoding is ~0.11 of the
encoder's CPU time, so ~0.9 is the ceiling on cores the encoder keeps busy):
the main thread reads + parses JSONL batches (across input files) and packs encoded ones;
``_ENCODE_INFLIGHT`` batches are encoded at once in worker threads (``encode_batch_fast``
releases the GIL and spreads each batch over every core; two batches in flight keep the cores
busy while one batch's last long document finishes); one background thread writes the shards
and token caches (parquet encoding, fsync, rename, sha256; pyarrow and hashlib release the GIL).
Everything is consumed in input order, so the bytes written do not depend on the timing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from distill_dag.config import PipelineConfig
from distill_dag.data.chat import ChatRenderer
from distill_dag.data.encode import DocBatch, encode_rows
from distill_dag.data.generations import (legacy_dataset, live_generations, new_generation, remove_generations,
                                          remove_unlisted)
from distill_dag.data.jsonl import DEFAULT_MAX_LINE_BYTES, ReadStats, check_reject_rate
from distill_dag.data.manifest import MANIFEST, SCHEMA_VERSION, Manifest
from distill_dag.data.packer import Packer, is_val
from distill_dag.data.paths import InputFile, discover_inputs
from distill_dag.data.shards import BackgroundWriter, ShardWriter
from distill_dag.data.token_cache import (CACHE_DIR, CACHE_VERSION, CacheWriter, FreshInput, cache_paths, cache_valid,
                                          finish_cache, read_cache)
from distill_dag.data.tokenizer import load_tokenizer, tokenizer_name
from distill_dag.data.tokenizer import tokenizer_hash as hash_tokenizer_dir
from distill_dag.io import (DiskFullError, claim_dir, dir_lock, is_disk_full, remove_temp_files, sha256_json,
                            write_bytes_atomic)

REJECTS = "rejects.jsonl"
_ENCODE_INFLIGHT = 2  # batches encoded at once (each call is itself parallel over documents)


class TooFewRowsError(RuntimeError):
    """A build would publish fewer rows than ``tokenize.min_rows``: nothing was published, and the
    previous dataset (if any) is still the one the manifest names."""


def worker_inputs(files: list[InputFile], worker: int, num_workers: int) -> list[InputFile]:
    """The inputs worker ``worker`` of ``num_workers`` tokenizes: largest first, each to the least
    loaded worker (by bytes). Every worker computes the same split from the same inputs, so they need
    no coordination; the result keeps input order."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} of {num_workers}: give 0 <= worker < num_workers (e.g. --worker 0/2)")
    load = [0] * num_workers
    mine = set()
    for f in sorted(files, key=lambda f: (-f.bytes, f.key)):
        w = min(range(num_workers), key=lambda i: (load[i], i))
        load[w] += f.bytes
        if w == worker:
            mine.add(f.key)
    return [f for f in files if f.key in mine]


@dataclass
class _Run:
    out: Path
    width: int
    val_fraction: float
    packers: dict[str, Packer] = field(default_factory=dict)
    writers: dict[str, ShardWriter] = field(default_factory=dict)
    chat_docs: int = 0

    def feed(self, b: DocBatch) -> tuple[int, int]:
        """Route a batch's documents to the train / val packers; returns (val docs, tokens incl. EOS)."""
        if b.n == 0:
            return 0, 0
        if b.spans is not None:
            self.chat_docs += sum(sp is not None for sp in b.spans)
        val = np.fromiter((is_val(d, self.val_fraction) for d in b.doc_ids), dtype=bool, count=b.n)
        offs = np.zeros(b.n + 1, np.int64)
        np.cumsum(b.lens, out=offs[1:])
        for split, sel in (("train", ~val), ("val", val)):
            if not sel.any():
                continue
            idx = np.flatnonzero(sel)
            if len(idx) == b.n:
                ids = b.ids
            else:
                # copy the runs of consecutive chosen documents (few: val documents are rare), not a
                # per-token mask
                cut = np.flatnonzero(np.diff(idx) != 1) + 1
                first, last = idx[np.r_[0, cut]], idx[np.r_[cut - 1, len(idx) - 1]]
                ids = np.concatenate([b.ids[offs[a]:offs[z + 1]] for a, z in zip(first.tolist(), last.tolist())])
            self.packers[split].add(ids, b.lens[sel], b.prompt_lens[sel], [b.sources[i] for i in idx],
                                    None if b.spans is None else [b.spans[i] for i in idx])
        return int(val.sum()), int(b.lens.sum()) + b.n


def tokenize_stage(cfg: PipelineConfig, *, inputs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                   output_dir: str | os.PathLike | None = None, tokenizer_dir: str | os.PathLike | None = None,
                   recursive: bool = True, worker: tuple[int, int] | None = None, progress: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The tokenize stage as ``distill preprocess`` and the ``tokenized_parquet`` asset run it: one set of
    defaults, all from ``cfg`` (``tokenize.*``: max_seq_length, val_fraction, rows_per_shard,
    skip_existing, force, mask_prompt, batch_docs; ``data.max_reject_rate``, ``data.max_line_bytes``).

    ``inputs`` / ``output_dir`` / ``tokenizer_dir`` default to the config's ``raw_dir``,
    ``tokenized_dir`` and ``tokenizer_dir``; inputs are read recursively (``raw/<source>/part-*.jsonl``).
    ``log`` receives the warnings and a short report. Returns :func:`tokenize_to_parquet`'s summary.
    """
    t = cfg.tokenize
    out = Path(output_dir) if output_dir is not None else cfg.tokenized_dir
    summary = tokenize_to_parquet(
        inputs if inputs is not None else cfg.raw_dir, out,
        tokenizer_dir if tokenizer_dir is not None else cfg.tokenizer_dir, t.max_seq_length,
        recursive=recursive, val_fraction=t.val_fraction, rows_per_shard=t.rows_per_shard,
        skip_existing=t.skip_existing, force=t.force, mask_prompt=t.mask_prompt, batch_docs=t.batch_docs,
        max_line_bytes=cfg.data.max_line_bytes, max_reject_rate=cfg.data.max_reject_rate, progress=progress,
        worker=worker, log=log, min_rows=t.min_rows,
    )
    for line in report(summary, out):
        log(line)
    return summary


def report(summary: dict[str, Any], output_dir: str | os.PathLike) -> list[str]:
    """What a run did, in a few lines (the CLI prints them, the asset logs them)."""
    if "worker" in summary:
        i, n = summary["worker"]
        return [f"worker {i}/{n}: tokenized {len(summary['tokenized'])} input(s) into the token cache, "
                f"{len(summary['reused'])} already cached; pack with: distill preprocess (same arguments, no --worker)"]
    if summary["up_to_date"]:
        lines = [f"{output_dir} is up to date ({len(summary['reused'])} inputs unchanged); nothing re-tokenized"]
    else:
        lines = [f"tokenized {len(summary['tokenized'])} input(s), reused {len(summary['reused'])} from the cache"]
    for split in ("train", "val"):
        s = summary["totals"][split]
        lines.append(f"  {split}: {s['shards']} shards, {s['rows']:,} rows, {s['tokens']:,} tokens, "
                     f"{s['docs']:,} documents")
    if summary["rejects"]:
        lines.append(f"  {summary['rejects']} bad rows skipped; each with file, line and reason in "
                     f"{summary['rejects_file']}")
    skipped = summary.get("skipped_inputs") or []
    if skipped:
        lines.append(f"  {len(skipped)} input(s) not read:")
        lines += [f"    {s['path']}: {s['reason']}" for s in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"    ... and {len(skipped) - 20} more (all in the manifest's skipped_inputs)")
    lines.append(f"  manifest: {Path(output_dir) / MANIFEST}")
    return lines


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def tokenize_to_parquet(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    max_seq_length: int,
    *,
    recursive: bool = True,
    val_fraction: float = 0.02,
    rows_per_shard: int = 8192,
    skip_existing: bool = True,
    force: bool = False,
    mask_prompt: bool = True,
    batch_docs: int = 1024,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_reject_rate: float | None = None,
    tokenizer_hash: str | None = None,
    progress: bool = False,
    worker: tuple[int, int] | None = None,
    log: Callable[[str], None] = _warn,
    min_rows: int = 1,
) -> dict[str, Any]:
    """Tokenize + pack JSONL ``inputs`` (a directory, a file, or a list) into ``output_dir``.

    ``worker=(i, n)``: only tokenize this worker's share of the inputs (:func:`worker_inputs`) into
    the token cache, and pack nothing. n workers (processes, machines on a shared filesystem, Dagster
    runs) fill the cache without coordinating; a final call without ``worker`` then only packs.

    Writes ``gen-<id>/train-NNNNN.parquet`` / ``gen-<id>/val-NNNNN.parquet`` shards, then publishes
    them with ``manifest.json`` (:mod:`distill_dag.data.generations`), and ``rejects.jsonl`` (every
    skipped line of this run: file, line, reason). ``skip_existing`` reuses the token cache of unchanged
    inputs (and returns at once when nothing changed); ``force`` (or ``skip_existing=False``) re-tokenizes
    everything. Bad rows are reported, not fatal, unless their share exceeds ``max_reject_rate``
    (:class:`~distill_dag.data.jsonl.RejectRateError`, nothing published). Raises
    :class:`~distill_dag.data.token_cache.InputChangedError`, :class:`~distill_dag.io.DiskFullError`
    (naming the path; nothing published, no partial shards left) and
    :class:`~distill_dag.io.DirectoryLockedError` (another run writes ``output_dir``). ``log`` receives warnings (default: :func:`warnings.warn`).

    ``output_dir`` must be new, empty, or a dataset folder of ours (:func:`~distill_dag.io.claim_dir`;
    else :class:`~distill_dag.io.ForeignOutputError`, nothing touched). A build that would publish fewer
    than ``min_rows`` rows (train + val; at least 1) raises :class:`TooFewRowsError` and publishes nothing:
    inputs that are all empty never replace a dataset. Inputs that look like JSONL but are not read
    (dangling links, FIFOs, compressed files) are logged and listed in ``skipped_inputs``.

    Returns a summary: the manifest as a dict plus ``tokenized`` / ``reused`` input keys,
    ``up_to_date``, ``rejects``, ``rejects_file``, ``generation``, ``warnings`` and ``skipped_inputs``.
    """
    if min_rows < 1:
        raise ValueError(f"min_rows={min_rows}: a dataset of 0 rows is never published; give tokenize.min_rows >= 1")
    out = Path(output_dir)
    tok = load_tokenizer(tokenizer_dir)
    tok_hash = tokenizer_hash or hash_tokenizer_dir(tokenizer_dir, tok)
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} needs eos and pad tokens (resolve it with resolve_tokenizer)")
    found = discover_inputs(inputs, recursive, exclude=out)
    notes = [w for w in [found.warning(out)] if w]
    if found.skipped:
        shown = "; ".join(str(x) for x in found.skipped[:5])
        more = f"; ... ({len(found.skipped)} in all)" if len(found.skipped) > 5 else ""
        notes.append(f"{len(found.skipped)} input(s) not read: {shown}{more}")
    for note in notes:
        log(note)
    files = found.files
    skipped = [x.to_dict() for x in found.skipped]
    if not files:
        why = f"; not read: {'; '.join(str(x) for x in found.skipped[:5])}" if found.skipped else ""
        raise FileNotFoundError(f"no .jsonl files in {inputs} (recursive={recursive}){why}")
    reuse = skip_existing and not force
    claim_dir(out, "distill preprocess", legacy=legacy_dataset)
    with dir_lock(out, shared=worker is not None, what="preprocess run"):
        (out / CACHE_DIR).mkdir(exist_ok=True)
        try:
            if worker is not None:
                summary = _fill_cache(out, worker_inputs(files, *worker), tok, tok_hash, worker, reuse=reuse,
                                      batch_docs=batch_docs, max_line_bytes=max_line_bytes)
            else:
                summary = _build(out, inputs, files, tok, tokenizer_dir, tok_hash, max_seq_length, reuse=reuse,
                                 val_fraction=val_fraction, rows_per_shard=rows_per_shard, mask_prompt=mask_prompt,
                                 batch_docs=batch_docs, max_line_bytes=max_line_bytes,
                                 max_reject_rate=max_reject_rate, progress=progress, min_rows=min_rows,
                                 skipped=skipped)
        except OSError as err:
            if not is_disk_full(err) or isinstance(err, DiskFullError):
                raise
            where = err.filename or getattr(err, "writing", None) or out
            raise DiskFullError(errno.ENOSPC, (
                f"no space left on the device of {out} while preprocessing, writing {where} ({err}). Nothing was "
                f"published: {out / MANIFEST} still names the previous dataset, if any, and the partial shards were "
                "removed. Free space there (or choose another --output) and re-run"), str(where)) from err
    return {**summary, "warnings": notes, "skipped_inputs": skipped}


def _build(out: Path, inputs: Any, files: list[InputFile], tok: Any, tokenizer_dir: str | os.PathLike, tok_hash: str,
           max_seq_length: int, *, reuse: bool, val_fraction: float, rows_per_shard: int, mask_prompt: bool,
           batch_docs: int, max_line_bytes: int, max_reject_rate: float | None, progress: bool, min_rows: int = 1,
           skipped: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Pack ``files`` into a new generation of ``out`` and publish it (the caller holds the lock)."""
    remove_temp_files(out)
    remove_temp_files(out / CACHE_DIR)
    settings = {"schema_version": SCHEMA_VERSION, "cache_version": CACHE_VERSION, "tokenizer_hash": tok_hash,
                "max_seq_length": max_seq_length, "val_fraction": val_fraction, "mask_prompt": mask_prompt,
                "rows_per_shard": rows_per_shard, "inputs": {f.key: f.sha256 for f in files}}
    build_key = sha256_json(settings)
    live = live_generations(out) or set()

    if reuse and (out / MANIFEST).exists():
        try:
            old = Manifest.load(out)
        except (ValueError, FileNotFoundError):
            old = None
        if old is not None and old.build_key == build_key and all(
            (out / s.path).exists() and (out / s.path).stat().st_size == s.bytes for s in old.shards
        ):
            remove_unlisted(out, old, files)  # what a run killed after its publish left
            return {**old.to_dict(), "tokenized": [], "reused": [f.key for f in files], "up_to_date": True,
                    "rejects": old.totals.get("rejects", 0), "rejects_file": str(out / REJECTS),
                    "generation": next(iter(sorted(live)), "")}

    remove_generations(out, keep=live)  # partial generations of killed runs
    gen = new_generation(out, build_key, live)
    gen.mkdir()
    try:
        manifest, state = _pack(out, gen, inputs, files, tok, tokenizer_dir, tok_hash, max_seq_length, build_key,
                                reuse=reuse, val_fraction=val_fraction, rows_per_shard=rows_per_shard,
                                mask_prompt=mask_prompt, batch_docs=batch_docs, max_line_bytes=max_line_bytes,
                                max_reject_rate=max_reject_rate, progress=progress, min_rows=min_rows,
                                skipped=skipped or [])
    except BaseException:
        if gen.name not in (live_generations(out) or set()):  # not published: drop every partial shard
            shutil.rmtree(gen, ignore_errors=True)
        raise
    remove_unlisted(out, manifest, files)
    return {**manifest.to_dict(), **state, "up_to_date": False, "rejects_file": str(out / REJECTS),
            "generation": gen.name}


def _pack(out: Path, gen: Path, inputs: Any, files: list[InputFile], tok: Any, tokenizer_dir: str | os.PathLike,
          tok_hash: str, max_seq_length: int, build_key: str, *, reuse: bool, val_fraction: float,
          rows_per_shard: int, mask_prompt: bool, batch_docs: int, max_line_bytes: int,
          max_reject_rate: float | None, progress: bool, min_rows: int = 1,
          skipped: list[dict[str, str]] | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Write the shards into ``gen``, check the reject rate, and publish the manifest (the last step)."""
    backend = tok.backend_tokenizer
    backend.encode_special_tokens = True  # text that spells "<|endoftext|>" must not become a real EOS
    chat = ChatRenderer(tok, backend)
    run = _Run(out, max_seq_length, val_fraction)

    bar = tqdm(total=sum(f.bytes for f in files), unit="B", unit_scale=True, desc="preprocess") if progress else None
    total_stats = ReadStats()
    all_rejects: list[dict[str, Any]] = []
    inputs_meta: dict[str, dict[str, Any]] = {}
    tokenized, reused = [], []

    def finished(inp: InputFile, stats: ReadStats, val_docs: int, tokens: int) -> None:
        total_stats.add(stats)
        inputs_meta[inp.key] = {"sha256": inp.sha256, "bytes": inp.bytes, "docs": stats.rows,
                                "val_docs": val_docs, "tokens": tokens, "rejects": stats.rejects}
        if bar is not None:
            bar.update(inp.bytes)
            bar.set_postfix(rejects=total_stats.rejects)

    def work() -> Iterator[tuple[str, Any, Any]]:
        """("cached", input, meta) / ("batch", FreshInput, rows) ... ("end", FreshInput, None), in input order."""
        for inp in files:
            meta = cache_valid(out, inp, tok_hash) if reuse else None
            if meta is not None:
                yield "cached", inp, meta
                continue
            fresh = FreshInput(inp, CacheWriter(cache_paths(out, inp)[0]))
            for batch in fresh.batches(batch_docs, max_line_bytes):
                yield "batch", fresh, batch
            yield "end", fresh, None

    def consume(kind: str, item: Any, payload: Any) -> None:
        if kind == "cached":
            inp, meta = item, payload
            pq_path, _, rej_path = cache_paths(out, inp)
            val_docs = tokens = 0
            for b in read_cache(pq_path):
                v, t = run.feed(b)
                val_docs, tokens = val_docs + v, tokens + t
            reused.append(inp.key)
            stats = ReadStats(rows=meta["docs"], rejects=meta["rejects"], bytes=inp.bytes)
            stats.reasons.update(meta.get("reasons", {}))
            if rej_path.exists():
                all_rejects.extend(json.loads(x) for x in rej_path.read_text().split("\n") if x)
            finished(inp, stats, val_docs, tokens)
            return
        fresh: FreshInput = item
        if not fresh.opened:
            fresh.opened = True
            open_caches.append(fresh.cache)
            io.submit(fresh.cache.open)
        if kind == "batch":
            b: DocBatch = payload.result()
            v, t = run.feed(b)
            fresh.val_docs, fresh.tokens = fresh.val_docs + v, fresh.tokens + t
            io.submit(fresh.cache.write, b)
            return
        # "end": the cache is renamed into place before its meta says it is valid (same thread, in order)
        all_rejects.extend(finish_cache(io, out, fresh, tok_hash))
        tokenized.append(fresh.inp.key)
        finished(fresh.inp, fresh.stats, fresh.val_docs, fresh.tokens)

    open_caches: list[CacheWriter] = []
    io = BackgroundWriter()
    try:
        for split in ("train", "val"):
            w = ShardWriter(gen, split, max_seq_length, rows_per_shard, background=io, manifest_dir=out)
            run.writers[split] = w
            run.packers[split] = Packer(max_seq_length, tok.eos_token_id, tok.pad_token_id, mask_prompt, w.add)
        with ThreadPoolExecutor(max_workers=_ENCODE_INFLIGHT, thread_name_prefix="encode") as pool:
            # parse ahead: up to _ENCODE_INFLIGHT batches encode while this thread packs the oldest
            pending: deque[tuple[str, Any, Any]] = deque()
            encoding = 0
            for kind, item, payload in work():
                if kind == "batch":
                    payload = pool.submit(encode_rows, backend, *payload, chat=chat)
                    encoding += 1
                pending.append((kind, item, payload))
                while encoding > _ENCODE_INFLIGHT or (pending and pending[0][0] != "batch"):
                    entry = pending.popleft()
                    encoding -= entry[0] == "batch"
                    consume(*entry)
            while pending:
                consume(*pending.popleft())
        for p in run.packers.values():
            p.finish()
        run.writers["train"].close()
        run.writers["val"].close()
        io.drain()
        shards = run.writers["train"].shards + run.writers["val"].shards
    except BaseException as err:
        writing = next((w.writing for w in run.writers.values() if w.writing is not None), None)
        if isinstance(err, OSError) and writing is not None:
            err.writing = writing  # the shard being written, for the disk-full message
        io.cancel()
        for w in run.writers.values():
            w.abort()
        for c in open_caches:
            c.abort()
        raise
    finally:
        io.close()
        if bar is not None:
            bar.close()

    write_bytes_atomic(out / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rejects).encode())
    check_reject_rate(total_stats, max_reject_rate, f"preprocess {inputs}", out / REJECTS)
    _check_floor(out, files, inputs_meta, sum(s.rows for s in shards), min_rows, total_stats)

    totals = {"rejects": total_stats.rejects, "docs": total_stats.rows, "chat_docs": run.chat_docs}
    for split in ("train", "val"):
        ss = [s for s in shards if s.split == split]
        totals[split] = {"shards": len(ss), "rows": sum(s.rows for s in ss), "tokens": sum(s.tokens for s in ss),
                         "docs": run.packers[split].docs}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, tokenizer_name=tokenizer_name(tokenizer_dir), tokenizer_hash=tok_hash,
        eos_id=int(tok.eos_token_id), pad_id=int(tok.pad_token_id),
        bos_id=None if tok.bos_token_id is None else int(tok.bos_token_id), vocab_size=len(tok),
        max_seq_length=max_seq_length, val_fraction=val_fraction, mask_prompt=mask_prompt,
        rows_per_shard=rows_per_shard, shards=shards, inputs=inputs_meta, totals=totals, build_key=build_key,
        skipped_inputs=list(skipped or []),
        chat_template=chat.mode if run.chat_docs else None,
    )
    manifest.save(out)  # the publish: one atomic rename makes the new generation the dataset
    manifest.dir = out
    return manifest, {"tokenized": tokenized, "reused": reused, "rejects": total_stats.rejects}


def _check_floor(out: Path, files: list[InputFile], inputs_meta: dict[str, dict[str, Any]], rows: int, min_rows: int,
                 stats: ReadStats) -> None:
    """Refuse to publish fewer than ``min_rows`` rows (:class:`TooFewRowsError`), naming the inputs and,
    for a rebuild, the dataset that stays published."""
    if rows >= min_rows:
        return
    shown = ", ".join(f"{f.path} ({f.bytes} bytes, {inputs_meta.get(f.key, {}).get('docs', 0)} usable rows)"
                      for f in files[:5]) + (f", ... ({len(files)} inputs)" if len(files) > 5 else "")
    try:
        prev = json.loads((out / MANIFEST).read_text())
        prev_rows = sum(int(s["rows"]) for s in prev["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        prev_rows = None
    kept = (f"The previous dataset ({prev_rows:,} rows, {out / MANIFEST}) is still the one published"
            if prev_rows else "Nothing was published")
    raise TooFewRowsError(
        f"preprocess into {out}: the inputs give {rows:,} rows ({stats.rows:,} usable documents, {stats.rejects:,} "
        f"bad lines), fewer than tokenize.min_rows={min_rows}: {shown}. {kept}. Check the inputs (empty or "
        "truncated files?), or lower tokenize.min_rows if so small a dataset is intended")


def _fill_cache(out: Path, files: list[InputFile], tok: Any, tok_hash: str, worker: tuple[int, int], *,
                reuse: bool, batch_docs: int, max_line_bytes: int) -> dict[str, Any]:
    """A worker's share: each input's tokens into its token cache (atomic files; the cache's meta is
    written last, so a killed worker leaves no cache that looks valid), nothing packed."""
    remove_temp_files(out / CACHE_DIR, {f.cache_stem for f in files})
    backend = tok.backend_tokenizer
    backend.encode_special_tokens = True
    chat = ChatRenderer(tok, backend)
    tokenized, reused = [], []
    io = BackgroundWriter()
    fresh: FreshInput | None = None
    try:
        for inp in files:
            if reuse and cache_valid(out, inp, tok_hash) is not None:
                reused.append(inp.key)
                continue
            fresh = FreshInput(inp, CacheWriter(cache_paths(out, inp)[0]))
            io.submit(fresh.cache.open)
            for rows in fresh.batches(batch_docs, max_line_bytes):
                io.submit(fresh.cache.write, encode_rows(backend, *rows, chat=chat))
            finish_cache(io, out, fresh, tok_hash)
            tokenized.append(inp.key)
        io.drain()
    except BaseException:
        io.cancel()
        if fresh is not None:
            fresh.cache.abort()
        raise
    finally:
        io.close()
    return {"worker": list(worker), "tokenized": tokenized, "reused": reused, "up_to_date": not tokenized}

