"""Resolve the tokenizer: a hub name / local directory, or a byte-level BPE trained on raw JSONL.

Either way the result is a local ``PreTrainedTokenizerFast`` directory with an EOS token and a pad
token that is an existing id inside the vocabulary (a new id beyond the embedding matrix would
index out of range in every model). Its content hash (:func:`tokenizer_hash`) is computed from a
canonical JSON form of the tokenizer (model, vocab, merges, special tokens), so it is the same in
every process and independent of file formatting; manifests and downstream assets carry it.

The output folder is published whole by :func:`~distill_dag.io.atomic_dir`, which refuses to replace a
folder that is not ours (``--output`` pointing at a data folder or ``.``). A BPE is never trained on
nothing: raw files that give no usable row are an error naming them, and raw files that are not read
(dangling links, FIFOs, compressed files) are named in that error and recorded in ``distill_tokenizer.json``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distill_dag.data.jsonl import Reject, iter_jsonl
from distill_dag.data.paths import Skipped, resolve_jsonl_paths, scan_jsonl_paths
from distill_dag.io import atomic_dir, sha256_file, sha256_json, write_json_atomic
from distill_dag.config import ConfigError  # a setup problem with a fix: the CLI's exit code 2
from distill_dag.data.chat import chat_text

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
META = "distill_tokenizer.json"
_TRAIN_VERSION = 1


def _tok_cfg(cfg: Any):
    return getattr(cfg, "tokenizer", cfg)


def iter_raw_texts(raw_dir: str | os.PathLike, max_bytes: int | None = None) -> Iterator[str]:
    """Texts of the raw JSONL files (sorted, recursive; bad lines skipped), up to ``max_bytes``.

    A prompt/response row gives ``prompt + response``; a chat row its turns' contents.
    """
    total = 0
    for f in resolve_jsonl_paths(raw_dir, recursive=True):
        for _, row in iter_jsonl(f):
            if isinstance(row, Reject):
                continue
            if "text" in row:
                text = row["text"]
            elif "prompt" in row:
                text = row["prompt"] + row["response"]
            else:
                text = chat_text(row)
            yield text
            total += len(text.encode())
            if max_bytes is not None and total >= max_bytes:
                return


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (GPT-2 style) trained on ``texts``; ids 0 and 1 are EOS and pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _ensure_special(tok) -> None:
    """EOS must exist; pad falls back to an existing token (EOS), never a new id."""
    if tok.eos_token is None:
        raise ValueError(
            f"tokenizer {tok.name_or_path!r} has no eos_token; packing needs one between documents "
            "(set tokenizer.name_or_path to a tokenizer with an EOS token)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def tokenizer_hash(tokenizer_dir: str | os.PathLike, tok: Any = None) -> str:
    """Content hash of a saved tokenizer: canonical JSON of tokenizer.json + special token ids.

    ``tok``: the already loaded tokenizer of ``tokenizer_dir`` (saves loading it again).
    """
    d = Path(tokenizer_dir)
    tj = d / "tokenizer.json"
    if not tj.exists():
        return sha256_json({"files": {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != META}})
    tok = tok if tok is not None else load_tokenizer(d)
    payload = {
        "tokenizer": json.loads(tj.read_text()),
        "eos": [tok.eos_token, tok.eos_token_id],
        "pad": [tok.pad_token, tok.pad_token_id],
        "bos": [tok.bos_token, tok.bos_token_id],
        "len": len(tok),
    }
    template = getattr(tok, "chat_template", None)
    if template:  # chat rows are rendered with it: another template is other data (absent: the old hash)
        payload["chat_template"] = template
    return sha256_json(payload)


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """The ``PreTrainedTokenizerFast`` saved in ``tokenizer_dir``."""
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer directory {d} does not exist (materialize the tokenizer asset first)")
    return AutoTokenizer.from_pretrained(str(d))


def resolve_tokenizer(cfg: Any, raw_dir: str | os.PathLike | None, out_dir: str | os.PathLike) -> tuple[Path, str]:
    """Make ``out_dir`` a local tokenizer directory; return ``(out_dir, tokenizer_hash)``.

    ``cfg`` is a :class:`~distill_dag.config.TokenizerConfig` or a whole ``PipelineConfig``.
    - ``name_or_path`` set: ``AutoTokenizer.from_pretrained`` (hub name or local directory), pad set
      to EOS when missing, saved to ``out_dir``.
    - ``name_or_path`` None: a byte-level BPE of ``vocab_size`` trained on the first
      ``train_bytes`` of the raw JSONL under ``raw_dir``.
    An ``out_dir`` built from the same config (and, for training, the same raw bytes) is reused.
    """
    tc = _tok_cfg(cfg)
    out = Path(out_dir)
    if tc.name_or_path:
        key = {"v": _TRAIN_VERSION, "name_or_path": tc.name_or_path}
    else:
        if raw_dir is None or not Path(raw_dir).exists():
            raise FileNotFoundError(f"tokenizer: training a BPE needs raw JSONL, but {raw_dir} does not exist "
                                    "(materialize raw_jsonl first, or set tokenizer.name_or_path)")
        files, skipped = scan_jsonl_paths(raw_dir, recursive=True)
        if not files:
            raise FileNotFoundError(f"tokenizer: no .jsonl files under {raw_dir} to train a BPE on"
                                    + _not_read(skipped))
        key = {"v": _TRAIN_VERSION, "vocab_size": tc.vocab_size, "min_frequency": tc.min_frequency,
               "train_bytes": tc.train_bytes,
               "raw": [[f.relative_to(raw_dir).as_posix(), sha256_file(f)] for f in files]}
    key_hash = sha256_json(key)
    skipped_meta = [] if tc.name_or_path else [x.to_dict() for x in skipped]
    if skipped_meta:  # said before the early return too: the files are still not read
        warnings.warn(f"tokenizer: {len(skipped_meta)} raw file(s) under {raw_dir} skipped{_not_read(skipped)}",
                      stacklevel=2)
    meta_path = out / META
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("key") == key_hash and meta.get("hash"):
            return out, meta["hash"]

    with atomic_dir(out, "distill tokenizer") as tmp:
        if tc.name_or_path:
            tok = AutoTokenizer.from_pretrained(tc.name_or_path)
            if not getattr(tok, "is_fast", False):
                raise ValueError(f"tokenizer {tc.name_or_path!r} has no fast (tokenizers) version; packing needs one")
            _ensure_special(tok)
        else:
            texts = _Counted(iter_raw_texts(raw_dir, tc.train_bytes))
            bpe = train_bpe(texts, tc.vocab_size, tc.min_frequency)
            if texts.n == 0:  # a BPE of nothing is the 256 byte symbols plus the specials: useless, not a result
                shown = ", ".join(f"{f} ({f.stat().st_size} bytes)" for f in files[:5])
                more = f", ... ({len(files)} files)" if len(files) > 5 else ""
                raise ValueError(f"tokenizer: the raw JSONL under {raw_dir} holds no usable row to train a BPE on "
                                 f"({shown}{more}; a row needs a non-empty 'text', or 'prompt' and 'response')"
                                 f"{_not_read(skipped)}. Nothing was written to {out}")
            tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                          model_max_length=1 << 30)
        tok.save_pretrained(str(tmp))
        h = tokenizer_hash(tmp)
        meta = {"key": key_hash, "hash": h, "name_or_path": tc.name_or_path or "bpe"}
        if skipped_meta:
            meta["skipped_inputs"] = skipped_meta
        write_json_atomic(tmp / META, meta)
    return out, h


class _Counted:
    """An iterator that counts what it yields (the trainer consumes it; the count says if it was empty)."""

    def __init__(self, it: Iterator[str]):
        self._it, self.n = it, 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> str:
        x = next(self._it)
        self.n += 1
        return x


def _not_read(skipped: list[Skipped]) -> str:
    if not skipped:
        return ""
    more = f"; ... ({len(skipped)} in all)" if len(skipped) > 5 else ""
    return "; not read: " + "; ".join(str(x) for x in skipped[:5]) + more


def tokenizer_name(tokenizer_dir: str | os.PathLike) -> str:
    """The name recorded when the directory was resolved (hub name, path, or "bpe"); else the dir name."""
    meta = Path(tokenizer_dir) / META
    if meta.exists():
        try:
            return json.loads(meta.read_text()).get("name_or_path") or Path(tokenizer_dir).name
        except json.JSONDecodeError:
            pass
    return str(tokenizer_dir)


def has_tokenizer(d: str | os.PathLike) -> bool:
    d = Path(d)
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def ensure_tokenizer(cfg: Any, explicit: str | os.PathLike | None = None, *, stage: str = "train") -> Path:
    """The local tokenizer folder a stage reads: the one resolution every verb shares.

    1. ``explicit`` (a ``--tokenizer`` flag), which must hold a tokenizer;
    2. ``cfg.tokenizer_dir`` (``tokenizer.dir``, else ``<data.root>/tokenizer``) when it holds one;
    3. else ``tokenizer.name_or_path`` (hub id or local folder, as a migrated seed config names the
       teacher's), fetched or copied into ``cfg.tokenizer_dir`` by :func:`resolve_tokenizer`, so the
       next stage finds the same files and the same hash.
    Otherwise a ``ConfigError`` naming the folder and the three ways to give one."""
    if explicit is not None:
        d = Path(explicit)
        if not has_tokenizer(d):
            raise FileNotFoundError(f"--tokenizer {explicit}: no tokenizer.json / tokenizer_config.json in {d.resolve()}; "
                                    "give a folder saved by `distill tokenizer` (or save_pretrained)")
        return d
    d = cfg.tokenizer_dir
    if has_tokenizer(d):
        return d
    name = cfg.tokenizer.name_or_path
    if name:
        path, _ = resolve_tokenizer(cfg.tokenizer, None, d)
        return path

    given = "the folder `distill preprocess` was given" if stage != "preprocess" else "a saved tokenizer folder"
    raise ConfigError(
        f"no tokenizer in {d} and tokenizer.name_or_path is not set. Give one: `distill {stage} --tokenizer DIR` "
        f"({given}), tokenizer.name_or_path: <hub id or folder> in the config (fetched into {d}), or build it "
        f"with `distill tokenizer --output {d} ...`")
