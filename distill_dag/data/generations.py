"""Publishing a dataset: generation folders, the manifest that names one, and the clean-up around them.

Publishing is all-or-nothing. A build writes its shards into a new generation folder,
``<output>/gen-<build key>/``, that no manifest names yet; only the atomic replace of
``<output>/manifest.json`` (shard paths relative to it, e.g. ``gen-1a2b3c4d5e6f/train-00000.parquet``)
makes them visible, and the previous generation is deleted after that (:func:`remove_unlisted`). A rebuild
that fails (bad rows over ``max_reject_rate``, disk full, an input changing) or is killed at any point leaves
the previous dataset readable and byte-identical; its partial generation is removed then or by the next run.
Rerunning produces exactly the shards and manifest of a clean run (everything is deterministic, the
generation name too).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

from distill_dag.data.manifest import MANIFEST, Manifest
from distill_dag.data.paths import InputFile
from distill_dag.data.shards import GENERATION_PREFIX
from distill_dag.data.token_cache import CACHE_DIR, CACHE_SUFFIXES
from distill_dag.io import MARKER

def live_generations(out: Path) -> set[str] | None:
    """The generation folders the current manifest names (read as plain JSON, so even a manifest this
    code cannot load keeps its shards); None when there is no readable manifest."""
    try:
        d = json.loads((out / MANIFEST).read_text())
        paths = [s["path"] for s in d["shards"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return {p.split("/")[0] for p in paths if isinstance(p, str) and "/" in p}


# the names new_generation gives: a folder called gen-something that this code did not name is left alone
_GENERATION = re.compile(re.escape(GENERATION_PREFIX) + r"[0-9a-f]{12}(-[0-9]+)?")
_OLD_SHARD = re.compile(r"(train|val)-\d{5}\.parquet")
# what a dataset folder of ours holds (earlier versions wrote no marker: legacy_dataset)
_DATASET_ENTRIES = re.compile(r"manifest\.json|rejects\.jsonl|\.cache|\.lock|(train|val)-\d{5}\.parquet|"
                              + _GENERATION.pattern + r"|\..+\.tmp")


def legacy_dataset(out: Path) -> bool:
    """A dataset folder written before output folders were marked: every entry is one this module writes
    (manifest, rejects, token cache, lock, shards, generations, temp files), with a manifest or a cache."""
    names = [p.name for p in out.iterdir()]
    return (any(n in (MANIFEST, CACHE_DIR) for n in names)
            and all(_DATASET_ENTRIES.fullmatch(n) or n == MARKER for n in names))


def remove_generations(out: Path, keep: set[str]) -> None:
    for g in out.glob(f"{GENERATION_PREFIX}*"):
        if g.is_dir() and not g.is_symlink() and _GENERATION.fullmatch(g.name) and g.name not in keep:
            shutil.rmtree(g, ignore_errors=True)


def new_generation(out: Path, build_key: str, live: set[str]) -> Path:
    """``gen-<build key>``: the same name in every clean run of the same inputs and settings; a forced
    rebuild over a live generation of that name takes ``gen-<build key>-1`` (then back)."""
    base = f"{GENERATION_PREFIX}{build_key[:12]}"
    name = next(n for n in (base if i == 0 else f"{base}-{i}" for i in itertools.count()) if n not in live)
    return out / name



def remove_unlisted(out: Path, manifest: Manifest, files: list[InputFile]) -> None:
    """After a publish: delete the generations and top-level shards the manifest does not list (the
    previous dataset, partial ones of killed runs) and the caches of inputs that are gone."""
    keep = {s.path for s in manifest.shards}
    remove_generations(out, keep={p.split("/")[0] for p in keep if "/" in p})
    for p in list(out.glob("train-*.parquet")) + list(out.glob("val-*.parquet")):  # the pre-generation layout
        if p.name not in keep and _OLD_SHARD.fullmatch(p.name) and not p.is_symlink():
            p.unlink(missing_ok=True)
    stems = {f.cache_stem for f in files}
    cache = out / CACHE_DIR
    for p in cache.iterdir():
        stem = next((p.name[: -len(x)] for x in CACHE_SUFFIXES if p.name.endswith(x)), None)
        if stem is not None and stem not in stems:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
