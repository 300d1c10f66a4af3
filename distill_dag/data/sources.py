"""Gather the configured raw sources into JSONL files under ``<data_root>/raw/<source name>/``.

Every source becomes a deterministic stream of rows (``text``, or ``prompt``/``response``, plus
``id``, ``source``, ``category``). The stream is cut into ``part-00000.jsonl``, ``part-00001.jsonl``,
... of ``data.rows_per_part`` rows; each part is written atomically and then recorded in
``_progress.json``, so a killed run resumes after the last recorded part without duplicating a row.
A source whose config changed starts over. Bad rows go to ``_rejects-<part>.jsonl`` beside the
parts (file/dataset, line or row index, reason). Files and folders whose names start with ``_``
or ``.`` are bookkeeping: :mod:`distill_dag.data.paths` skips them.

A source's name is its folder: one safe path component, unique without case
(:func:`~distill_dag.config.source_name_errors`, checked when the config loads and again here). The
folder is marked ours (:func:`~distill_dag.io.claim_dir`) before its first part; a folder of other
files under that name is refused rather than cleaned. Inputs of a ``jsonl`` source that are not read
(dangling links, FIFOs, compressed files) are listed in its totals as ``skipped_inputs``.

Source kinds (``SourceConfig.kind``):
- ``stdlib``: the running Python's standard library ``.py`` files, one document per file, in
  sorted path order, up to ``max_bytes``; files that are not UTF-8 are decoded by their PEP 263
  coding cookie.
- ``jsonl``: local JSONL files, a directory (``recursive``) or a glob, read with
  :mod:`distill_dag.data.jsonl` (bad lines are rejected, not fatal).
- ``hf``: ``datasets.load_dataset`` on a hub id or a local dataset directory / data file, with
  ``field_map`` (ours -> theirs, dotted paths for nested fields).
- ``catalog``: the curated catalog (``catalog.yaml``, or ``path``), restricted to ``categories``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import sysconfig
import tokenize as pytokenize
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from distill_dag.config import ConfigError, PipelineConfig, SourceConfig, source_name_errors
from distill_dag.data import catalog as catalog_mod, retrieval_docs
from distill_dag.data.jsonl import ReadStats, Reject, check_reject_rate, iter_jsonl, row_problem, write_rejects
from distill_dag.data.paths import scan_jsonl_paths
from distill_dag.io import claim_dir, remove_temp_files, sha256_file, sha256_json, write_bytes_atomic, write_json_atomic

RAW_FORMAT_VERSION = 1
PROGRESS = "_progress.json"

# An item of a source stream: a row, a rejected row, or None (a row with nothing to train on).
Item = dict[str, Any] | Reject | None


# ---- the resumable part writer ---------------------------------------------------------------
def write_parts(out_dir: Path, fingerprint: str, items_from: Callable[[int], Iterator[Item]], rows_per_part: int) -> dict[str, Any]:
    """Write ``items_from(start)`` into atomic part files, resuming after the last recorded part.

    ``items_from(start)`` must yield the same items on every call, starting at item ``start``.
    Returns the source's totals: rows, bytes, files (parts), rejects, skipped, reasons.
    """
    claim_dir(out_dir, f"gathering into {out_dir}", legacy=lambda d: (d / PROGRESS).is_file())
    remove_temp_files(out_dir)
    prog_path = out_dir / PROGRESS
    prog = _read_progress(prog_path)
    if prog is None or prog.get("fingerprint") != fingerprint:
        for p in list(out_dir.glob("part-*.jsonl")) + list(out_dir.glob("_rejects-*.jsonl")):
            p.unlink()
        prog = {"fingerprint": fingerprint, "consumed": 0, "parts": 0, "rows": 0, "bytes": 0, "rejects": 0,
                "skipped": 0, "reasons": {}, "done": False, "commits": 0}
    if prog["done"]:
        return _summary(prog, out_dir)

    lines: list[bytes] = []
    rejects: list[Reject] = []
    consumed = skipped = 0

    def commit() -> None:
        nonlocal lines, rejects, consumed, skipped
        n = prog["parts"]
        data = b"".join(lines)
        if lines:
            write_bytes_atomic(out_dir / f"part-{n:05d}.jsonl", data)
        if rejects:  # numbered by commit: a commit may hold rejects but no rows
            write_rejects(out_dir / f"_rejects-{prog['commits']:05d}.jsonl", rejects)
        for r in rejects:
            key = r.reason.split(",")[0]
            prog["reasons"][key] = prog["reasons"].get(key, 0) + 1
        prog.update(consumed=prog["consumed"] + consumed, parts=n + (1 if lines else 0), commits=prog["commits"] + 1,
                    rows=prog["rows"] + len(lines),
                    bytes=prog["bytes"] + len(data), rejects=prog["rejects"] + len(rejects),
                    skipped=prog["skipped"] + skipped)
        write_json_atomic(prog_path, prog)  # the part is on disk before the progress that counts it
        lines, rejects, consumed, skipped = [], [], 0, 0

    for item in items_from(prog["consumed"]):
        consumed += 1
        if item is None:
            skipped += 1
        elif isinstance(item, Reject):
            rejects.append(item)
        else:
            lines.append((json.dumps(item, ensure_ascii=False) + "\n").encode())
            if len(lines) >= rows_per_part:
                commit()
    commit()
    prog["done"] = True
    write_json_atomic(prog_path, prog)
    return _summary(prog, out_dir)


def _read_progress(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _summary(prog: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    return {"rows": prog["rows"], "bytes": prog["bytes"], "files": prog["parts"], "rejects": prog["rejects"],
            "skipped": prog["skipped"], "reasons": dict(prog["reasons"]), "path": str(out_dir)}


def _stats_of(summary: dict[str, Any]) -> ReadStats:
    return ReadStats(rows=summary["rows"], rejects=summary["rejects"], bytes=summary["bytes"],
                     reasons=Counter(summary["reasons"]))


# ---- stdlib ------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of stdlib ``.py`` files in sorted order, while the total < max_bytes."""
    root = stdlib_root()
    found = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*.py")
        if not ({"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts))
    )
    out, total = [], 0
    for rel, p in found:
        if total >= max_bytes:
            break
        out.append((rel, p))
        total += p.stat().st_size
    return out


def decode_python_source(raw: bytes) -> tuple[str, str]:
    """Decode a .py file: UTF-8, else its PEP 263 coding cookie, else UTF-8 with replacement.

    Returns ``(text, how)`` where ``how`` is "utf-8", the cookie's encoding, or "replace".
    """
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        enc, _ = pytokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(enc), enc
    except (SyntaxError, LookupError, UnicodeDecodeError):
        return raw.decode("utf-8", errors="replace"), "replace"


def _stdlib_items(src: SourceConfig) -> Callable[[int], Iterator[Item]]:
    files = stdlib_files(src.max_bytes)

    def items(start: int) -> Iterator[Item]:
        for rel, p in files[start:]:
            text, _ = decode_python_source(p.read_bytes())
            if not text.strip():
                yield None
                continue
            yield {"text": text, "id": f"{src.name}:{rel}", "source": src.name, "category": src.category or "code"}

    return items


# ---- jsonl -------------------------------------------------------------------------------------
def _jsonl_items(src: SourceConfig, files: list[Path], max_line_bytes: int) -> Callable[[int], Iterator[Item]]:
    root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")

    def items(start: int) -> Iterator[Item]:
        n = 0
        for f in files:
            rel = f.relative_to(root).as_posix()
            for line_no, row in iter_jsonl(f, max_line_bytes=max_line_bytes):
                n += 1
                if n <= start:
                    continue
                if isinstance(row, Reject):
                    yield row
                    continue
                out = dict(row)
                out.setdefault("id", f"{src.name}:{rel}:{line_no}")
                out["source"] = src.name
                out.setdefault("category", src.category)
                yield out

    return items


# ---- hf ----------------------------------------------------------------------------------------
def load_hf(dataset: str, subset: str | None = None, split: str = "train", revision: str | None = None, streaming: bool = False):
    """``datasets`` split from a hub id, a ``save_to_disk`` directory, a data-files directory or a file."""
    import datasets  # heavy (~1 s, pulls pandas): only the hf and catalog sources need it

    p = Path(dataset)
    if p.exists():
        if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise KeyError(f"{p}: no split '{split}' (has {list(ds)})")
                ds = ds[split]
            return ds
        if p.is_file():
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix)
            if builder is None:
                raise ValueError(f"{p}: cannot load data files of type '{p.suffix}' (use .jsonl, .json, .parquet or .csv)")
            return datasets.load_dataset(builder, data_files=str(p), split="train", streaming=streaming)
        return datasets.load_dataset(str(p), name=subset, split=split, streaming=streaming)
    return datasets.load_dataset(dataset, name=subset, split=split, revision=revision, streaming=streaming)


def _take(ds: Any, start: int, stop: int | None) -> Iterator[dict[str, Any]]:
    """Rows ``start:stop`` of a map-style or streaming dataset."""
    if hasattr(ds, "select") and hasattr(ds, "__len__"):
        end = len(ds) if stop is None else min(stop, len(ds))
        if start >= end:
            return iter(())
        return iter(ds.select(range(start, end)))
    it = ds.skip(start) if start else ds
    if stop is not None:
        it = it.take(max(0, stop - start))
    return iter(it)


def _get(row: dict[str, Any], dotted: str) -> Any:
    cur: Any = row
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            raise KeyError(dotted)
        cur = cur[k]
    return cur


def map_fields(row: dict[str, Any], field_map: dict[str, str]) -> dict[str, Any]:
    """Our row from theirs: ``field_map`` maps our field -> their (dotted) field; text/prompt/response/id
    and chat lists (messages/conversations) present under our own names pass through."""
    out = {k: row[k] for k in ("text", "prompt", "response", "messages", "conversations", "id")
           if k in row and k not in field_map}
    for ours, theirs in field_map.items():
        out[ours] = _get(row, theirs)
    return out


def _hf_items(src: SourceConfig) -> Callable[[int], Iterator[Item]]:
    def items(start: int) -> Iterator[Item]:
        ds = load_hf(src.dataset, src.subset, src.split, src.revision, src.streaming)
        for i, row in enumerate(_take(ds, start, src.max_rows), start=start):
            try:
                out = map_fields(row, src.field_map)
            except KeyError as err:
                yield Reject(src.dataset, i, f"field {err} missing (field_map {src.field_map}; the row has {sorted(row)})")
                continue
            problem = row_problem(out)
            if problem:
                yield Reject(src.dataset, i, problem)
                continue
            out["id"] = str(out["id"]) if "id" in out else f"{src.name}:{i}"
            out["source"] = src.name
            if "category" not in src.field_map:
                out["category"] = src.category
            yield out

    return items


def _catalog_items(src: SourceConfig, entry: catalog_mod.CatalogEntry) -> Callable[[int], Iterator[Item]]:
    def items(start: int) -> Iterator[Item]:
        local = Path(entry.hub_id).exists()
        ds = load_hf(entry.hub_id, entry.subset, entry.split, entry.revision, streaming=not local)
        for i, row in enumerate(_take(ds, start, entry.samples), start=start):
            try:
                out = catalog_mod.format_row(entry, row, i, src.name)
            except (KeyError, TypeError, AttributeError) as err:
                yield Reject(entry.hub_id, i, f"formatter '{entry.formatter}' failed: {type(err).__name__}: {err}")
                continue
            if out is None:
                yield None
                continue
            problem = row_problem(out)
            yield Reject(entry.hub_id, i, problem) if problem else out

    return items


# ---- public ------------------------------------------------------------------------------------
def _catalog_entries(cfg: PipelineConfig, src: SourceConfig) -> list[catalog_mod.CatalogEntry]:
    cat = catalog_mod.load_catalog(cfg.path(src.path) if src.path else None)
    return cat.select(src.categories)


def plan_source(cfg: PipelineConfig, src: SourceConfig) -> dict[str, Any]:
    """What gathering ``src`` would read, without writing anything."""
    if src.kind == "stdlib":
        files = stdlib_files(src.max_bytes)
        return {"kind": "stdlib", "root": str(stdlib_root()), "files": len(files),
                "expected_bytes": sum(p.stat().st_size for _, p in files)}
    if src.kind == "jsonl":
        files, skipped = scan_jsonl_paths(src.path or "", src.recursive, cfg.path("."))
        return {"kind": "jsonl", "files": len(files), "expected_bytes": sum(f.stat().st_size for f in files),
                "skipped_inputs": [x.to_dict() for x in skipped]}
    if src.kind == "hf":
        return {"kind": "hf", "dataset": src.dataset, "subset": src.subset, "split": src.split,
                "max_rows": src.max_rows, "field_map": src.field_map}
    p = catalog_mod.plan(_catalog_entries(cfg, src))
    return {"kind": "catalog", **p}


def gather_source(cfg: PipelineConfig, src: SourceConfig) -> dict[str, Any]:
    """Gather one source into ``<data_root>/raw/<name>/``; returns its totals (rows, bytes, files, rejects)."""
    raw = cfg.data_root / "raw"
    out = raw / src.name
    errs = source_name_errors([src.name])
    if errs or out.parent != raw:  # a SourceConfig built in code skips the config's check
        raise ConfigError(f"invalid config: key 'data.sources[].name': {errs[0][1] if errs else repr(src.name)}")
    rows_per_part = cfg.data.rows_per_part
    base = {"v": RAW_FORMAT_VERSION, "src": src.model_dump(mode="json"), "rows_per_part": rows_per_part}
    if src.kind == "stdlib":
        fp = sha256_json({**base, "python": sys.version, "root": str(stdlib_root())})
        res = write_parts(out, fp, _stdlib_items(src), rows_per_part)
    elif src.kind == "jsonl":
        if not src.path:
            raise ValueError(f"data.sources '{src.name}': kind jsonl needs 'path' (a file, directory or glob)")
        files, skipped = scan_jsonl_paths(src.path, src.recursive, cfg.path("."))
        if not files:
            why = f"; not read: {'; '.join(str(x) for x in skipped[:5])}" if skipped else ""
            raise FileNotFoundError(f"data.sources '{src.name}': no .jsonl files at '{src.path}'{why}")
        fp = sha256_json({**base, "files": [[str(f), sha256_file(f)] for f in files],
                          "max_line_bytes": cfg.data.max_line_bytes})
        res = write_parts(out, fp, _jsonl_items(src, files, cfg.data.max_line_bytes), rows_per_part)
        res["skipped_inputs"] = [x.to_dict() for x in skipped]
    elif src.kind == "hf" and src.dataset == "synthetic:retrieval":  # generated, not loaded: data/retrieval_docs.py
        res = write_parts(out, sha256_json({**base, "generator": retrieval_docs.VERSION}),
                          retrieval_docs.source_items(src), rows_per_part)
    elif src.kind == "hf":
        if not src.dataset:
            raise ValueError(f"data.sources '{src.name}': kind hf needs 'dataset' (a hub id or a local path)")
        res = write_parts(out, sha256_json(base), _hf_items(src), rows_per_part)
    else:
        res = {"rows": 0, "bytes": 0, "files": 0, "rejects": 0, "skipped": 0, "reasons": {}, "path": str(out),
               "datasets": {}}
        entries = _catalog_entries(cfg, src)
        errs = source_name_errors([e.name for e in entries])  # each dataset gets raw/<source>/<dataset name>/
        if errs:
            raise ValueError(f"data.sources '{src.name}': the catalog {src.path or catalog_mod.CATALOG_PATH} names "
                             "datasets that cannot be folder names: " + "; ".join(m for _, m in errs))
        for entry in entries:
            fp = sha256_json({**base, "entry": entry.model_dump(mode="json")})
            r = write_parts(out / entry.name, fp, _catalog_items(src, entry), rows_per_part)
            res["datasets"][entry.name] = r
            for k in ("rows", "bytes", "files", "rejects", "skipped"):
                res[k] += r[k]
            for k, v in r["reasons"].items():
                res["reasons"][k] = res["reasons"].get(k, 0) + v
    res["kind"] = src.kind
    check_reject_rate(_stats_of(res), cfg.data.max_reject_rate, f"data.sources '{src.name}'", f"{out}/_rejects-*.jsonl")
    return res


def gather_sources(cfg: PipelineConfig, dry_run: bool = False) -> dict[str, dict[str, Any]]:
    """Gather every ``data.sources`` entry; ``{source name: {rows, bytes, files, rejects, ...}}``.

    With ``dry_run`` nothing is written and each value is the plan (:func:`plan_source`).
    Raises :class:`~distill_dag.data.jsonl.RejectRateError` for a source above ``data.max_reject_rate``.
    """
    errs = source_name_errors([s.name for s in cfg.data.sources])
    if errs:  # the config refuses these when it loads; a config built with model_construct does not
        raise ConfigError("invalid config:\n" + "\n".join(f"  key '{k}': {m}" for k, m in errs))
    if dry_run:
        return {s.name: plan_source(cfg, s) for s in cfg.data.sources}
    return {s.name: gather_source(cfg, s) for s in cfg.data.sources}
