"""``manifest.json`` of a tokenized_parquet directory, and the check every consumer runs on it.

The manifest is the only index of the shards: a shard is listed only once it is complete, with
its sha256, so a consumer never reads a half-written or stale file. It records what the shards
were built with (tokenizer name + hash, special ids, vocab size, max_seq_length) so that a
model/config that disagrees is refused up front (:func:`check_manifest`) instead of training on
ids it cannot embed or sequences of the wrong length (the "loss hovers at 25+" trap).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill_dag.io import sha256_json, write_json_atomic
from distill_dag.safe_read import MAX_JSON_BYTES, read_text_bounded

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ManifestMismatchError(ValueError):
    """The shards were built with another tokenizer or max_seq_length than the config asks for."""


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's directory
    split: str
    rows: int
    tokens: int  # attended tokens (attention_mask == 1)
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Manifest:
    schema_version: int
    tokenizer_name: str
    tokenizer_hash: str
    eos_id: int
    pad_id: int
    bos_id: int | None
    vocab_size: int
    max_seq_length: int
    val_fraction: float
    mask_prompt: bool
    rows_per_shard: int
    shards: list[ShardInfo]
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    build_key: str = ""
    # inputs that looked like JSONL but were not read, each {"path", "reason"} (not part of data_version)
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)
    # the chat template chat rows were rendered with: "tokenizer" (its own), "plain" (the fallback for
    # tokenizers without one), None (no chat rows)
    chat_template: str | None = None
    dir: Path | None = field(default=None, compare=False, repr=False)

    # ---- io ----
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("dir")
        d["shards"] = [s.to_dict() for s in self.shards]
        return d

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: str | os.PathLike | None = None) -> "Manifest":
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        m = cls(**d)
        m.dir = Path(directory) if directory is not None else None
        return m

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        """Read ``<directory>/manifest.json``; a missing or unreadable one is an error naming the path."""
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: {directory} holds no tokenized shards (run `distill preprocess` "
                "or materialize the tokenized_parquet asset first)"
            )
        try:
            d = json.loads(read_text_bounded(path, MAX_JSON_BYTES, "dataset manifest"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); re-run `distill preprocess --force` "
                             "(tokenize.force: true)") from None
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ManifestMismatchError(
                f"{path}: schema_version {d.get('schema_version')} but this code reads {SCHEMA_VERSION}; "
                "re-run `distill preprocess --force` (tokenize.force: true in the config)"
            )
        return cls.from_dict(d, directory)

    # ---- identity ----
    @property
    def data_version(self) -> str:
        """The dataset's one identity (Dagster's ``DataVersion`` of ``tokenized_parquet``, the logit
        cache's and the trainers' lineage): sha256 of what the shards hold and how to read them.

        Shard *names* (not their generation folder), rows and sha256, plus the tokenizer hash and row
        length: a rebuild that writes the same bytes has the same version, whatever its inputs' mtimes.
        """
        return sha256_json({
            "schema_version": self.schema_version,
            "shards": [[Path(s.path).name, s.split, s.rows, s.sha256] for s in self.shards],
            "tokenizer_hash": self.tokenizer_hash,
            "max_seq_length": self.max_seq_length,
        })

    # ---- queries ----
    def split_shards(self, split: str) -> list[tuple[int, ShardInfo]]:
        """``(index in self.shards, shard)`` for one split, in manifest order."""
        return [(i, s) for i, s in enumerate(self.shards) if s.split == split]

    def shard_path(self, shard: ShardInfo) -> Path:
        if self.dir is None:
            raise ValueError("manifest was not loaded from a directory; shard paths are relative to it")
        return self.dir / shard.path


def check_manifest(manifest: Manifest, tokenizer_hash: str | None = None, max_seq_length: int | None = None,
                   vocab_size: int | None = None) -> None:
    """Refuse shards that disagree with the run's tokenizer, sequence length or model vocabulary.

    Raises :class:`ManifestMismatchError` naming the value that differs and how to fix it.
    ``vocab_size`` is the model's embedding rows: the shards' ids must fit in it.
    """
    where = f"{manifest.dir / MANIFEST}" if manifest.dir else "manifest"
    problems = []
    if tokenizer_hash is not None and manifest.tokenizer_hash != tokenizer_hash:
        problems.append(
            f"tokenizer hash {manifest.tokenizer_hash[:12]}… ({manifest.tokenizer_name}) != the configured "
            f"tokenizer's {tokenizer_hash[:12]}…: the shards hold ids of another tokenizer. Re-run "
            "`distill preprocess --force --tokenizer <this tokenizer>` (tokenize.force: true), or point the config "
            "at the tokenizer the shards were built with"
        )
    if max_seq_length is not None and manifest.max_seq_length != max_seq_length:
        problems.append(
            f"max_seq_length {manifest.max_seq_length} != tokenize.max_seq_length {max_seq_length}. Re-run "
            f"`distill preprocess --force --max-seq-length {max_seq_length}`, or set tokenize.max_seq_length: "
            f"{manifest.max_seq_length}"
        )
    if vocab_size is not None and manifest.vocab_size > vocab_size:
        problems.append(
            f"tokenizer vocab_size {manifest.vocab_size} > the model's {vocab_size} embedding rows: ids would index "
            "out of range. Build the model with vocab_size >= the tokenizer's"
        )
    if problems:
        raise ManifestMismatchError(f"{where}: " + "; ".join(problems))
