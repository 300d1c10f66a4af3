"""Training checkpoints: one format, written atomically, verified on load.

A checkpoint is a directory ``<run_dir>/checkpoints/step-NNNNNNN/`` holding

- ``model.safetensors`` + ``config.json``: the student (``save_pretrained``; loads with
  ``AutoModelForCausalLM.from_pretrained`` after ``import distill_dag``);
- ``trainer_state.pt``: optimizer, scheduler, stability state, RNG states, step and data position:
  plain tensors / numbers / strings only, loaded with ``torch.load(weights_only=True)``;
- ``run.json``: the resolved config and the lineage hashes (manifest, tokenizer, teacher, cache);
- ``checksums.json``: sha256 of every other file, checked before anything is used.

``<run_dir>/checkpoint_latest`` names the newest complete checkpoint (written after the directory is
in place, so it never points at a half checkpoint). The student trainer, the alignment stage and the
teacher finetune all write through :class:`distill_dag.training.loop.Checkpointer`, i.e. through
:func:`save_checkpoint`; only ``trainer_state.pt``'s keys are their own.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill_dag.model.hub import UNCHECKSUMMED, prepare_hf_folder
from distill_dag.io import MARKER, FILE_MODE, atomic_dir, ownership, sha256_file, write_bytes_atomic, write_json_atomic
from distill_dag.safe_read import MAX_JSON_BYTES, UnsafeFileError, read_json_bounded, read_text_bounded

LATEST_MAX_BYTES = 4096  # checkpoint_latest holds one relative path

LATEST = "checkpoint_latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> list[Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    run_info: dict[str, Any],
    *,
    keep: int = 2,
    extra_files: dict[str, Path] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``step-NNNNNNN`` atomically, point ``checkpoint_latest`` at it, prune old ones.

    ``extra_files`` (name -> source path or directory) are copied in, e.g. the tokenizer.
    ``model_state`` replaces ``model.state_dict()`` (the gathered weights of an FSDP-sharded model).
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    target = ckpt_root / f"step-{step:07d}"
    _remove_leftovers(run_dir, ckpt_root)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
            torch.save(trainer_state, tmp / "trainer_state.pt")
            (tmp / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True, default=str))
            for name, src in (extra_files or {}).items():
                src = Path(src)
                if src.is_dir():
                    for f in src.iterdir():
                        if f.is_file():
                            shutil.copy2(f, tmp / f.name)
                else:
                    shutil.copy2(src, tmp / name)
            sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / "checksums.json").write_text(json.dumps(sums, indent=2, sort_keys=True))
        write_bytes_atomic(run_dir / LATEST, f"checkpoints/{target.name}\n".encode())
    except (OSError, RuntimeError) as err:  # disk full, quota, I/O error (torch.save reports ENOSPC as a
        # RuntimeError, "basic_ios::clear" / "file write failed"): atomic writes left the previous checkpoint as it was
        if isinstance(err, RuntimeError) and not any(s in str(err) for s in ("basic_ios", "write", "No space")):
            raise
        prev = read_latest(run_dir) if (run_dir / LATEST).exists() else None
        kept = (f"the previous checkpoint {run_dir / prev} is intact and {LATEST} still points at it"
                if prev else "no earlier checkpoint exists")
        raise CheckpointError(
            f"writing checkpoint {target} failed: {err}; {kept}. Free disk space (or set train.output_dir on a "
            f"larger disk) and resume with --resume-from {run_dir}"
        ) from err
    _prune(ckpt_root, keep, target)
    return target


# what atomic_dir / atomic_path name their temp and set-aside copies (mkdtemp / mkstemp: 8 random chars)
_STEP_TMP = re.compile(r"\.step-\d{7}\.[A-Za-z0-9_]{8}\.tmp")
_STEP_OLD = re.compile(r"\.step-\d{7}\.old")
_STEP = re.compile(r"step-\d{7}")
_LATEST_TMP = re.compile(rf"\.{LATEST}\.[A-Za-z0-9_]{{8}}\.tmp")
_SHARDED = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TMP_FILE = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # an atomic_path write inside the folder
# a killed save's temp folder may lack the marker (written last): it is ours when it holds only files a
# checkpoint is made of (save_pretrained, the trainer's own, a copied-in tokenizer)
_CKPT_FILES = frozenset({"model.safetensors", "config.json", "generation_config.json", "trainer_state.pt", "run.json",
                         "checksums.json", MARKER, "model.safetensors.index.json", "adapter_config.json",
                         "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                         "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                         "distill_tokenizer.json"})


def _is_ours(p: Path, *, partial: bool = False) -> bool:
    """A checkpoint folder this package wrote: marked, or a pre-marker one its ``checksums.json`` accounts
    for (``io.ownership``); with ``partial``, also a killed save's temp folder of checkpoint files only.
    A user's folder that happens to be named ``step-*`` (a backup, a copy) is never deleted."""
    state = ownership(p)
    if state in ("ours", "legacy"):
        return True
    if not partial or state not in ("empty", "foreign"):
        return False
    if state == "empty":
        return True
    try:
        return all(not f.is_symlink() and f.is_file() and (f.name in _CKPT_FILES or _SHARDED.fullmatch(f.name)
                                                           or _TMP_FILE.fullmatch(f.name)) for f in p.iterdir())
    except OSError:
        return False


def _remove_leftovers(run_dir: Path, ckpt_root: Path) -> None:
    """Delete what a save killed mid-write left: temp checkpoint dirs and a half ``checkpoint_latest``.

    Safe because one process (rank 0) writes a run dir, and none of these names is ever read. A
    ``.step-N.old`` is kept while ``step-N`` is missing: it is then the only copy of that checkpoint.
    Only names our writers give, and only folders that are ours (:func:`_is_ours`): anything else under
    ``checkpoints/`` is left alone.
    """
    if ckpt_root.is_dir() and not ckpt_root.is_symlink():
        for p in ckpt_root.iterdir():
            if p.is_symlink() or not p.is_dir():
                continue
            if _STEP_TMP.fullmatch(p.name) and _is_ours(p, partial=True):
                shutil.rmtree(p, ignore_errors=True)
            elif _STEP_OLD.fullmatch(p.name) and (ckpt_root / p.name[1:-4]).is_dir() and _is_ours(p):
                shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(f".{LATEST}.*.tmp"):
        if _LATEST_TMP.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def _prune(ckpt_root: Path, keep: int, newest: Path) -> None:
    """Keep the ``keep`` newest of our checkpoints; a ``step-*`` folder that is not ours is neither counted
    nor deleted."""
    if keep <= 0:
        return
    done = sorted(p for p in ckpt_root.iterdir()
                  if _STEP.fullmatch(p.name) and not p.is_symlink() and p.is_dir() and _is_ours(p))
    for old in done[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def read_latest(run_dir: Path) -> str:
    try:
        return read_text_bounded(run_dir / LATEST, LATEST_MAX_BYTES, "checkpoint pointer").strip()
    except UnsafeFileError as err:
        raise CheckpointError(f"{err}; it should hold one line like checkpoints/step-0000100: give a "
                              "checkpoint folder instead, or rewrite that file") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (follows ``checkpoint_latest``)."""
    path = Path(path)
    if (path / LATEST).exists():
        path = path / read_latest(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} (give a checkpoint dir or a run dir with {LATEST})")
    return path


def verify_checkpoint(path: Path) -> None:
    sums_file = path / "checksums.json"
    if not sums_file.exists():
        raise CheckpointError(f"{sums_file} is missing: the checkpoint is incomplete; resume from an older one")
    try:
        sums = read_json_bounded(sums_file, MAX_JSON_BYTES, "checkpoint checksums.json")
    except UnsafeFileError as err:
        why = str(err).removeprefix(f"{sums_file}: ")
        raise CheckpointError(f"{sums_file} is corrupt ({why}); resume from an older checkpoint") from None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{sums_file} is corrupt (not a JSON object of file name -> sha256); resume from an "
                              "older checkpoint")
    for name, digest in sums.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f} is missing from the checkpoint")
        try:
            # bounded: a file replaced by a link to /dev/zero or a FIFO is refused at once, not hashed forever
            actual = sha256_file(f, what="checkpoint file")
        except UnsafeFileError as err:
            raise CheckpointError(f"{err}; the checkpoint is not usable: resume from an older checkpoint") from None
        if actual != digest:
            raise CheckpointError(f"{f} is corrupt (sha256 differs from checksums.json); resume from an older checkpoint")


def load_trainer_state(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Verify a checkpoint and return (dir, trainer_state, run_info). Nothing is unpickled."""
    path = resolve_checkpoint(path)
    verify_checkpoint(path)
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling error means a bad file
        raise CheckpointError(f"{path / 'trainer_state.pt'} cannot be read: {err}") from None
    try:
        run_info = read_json_bounded(path / "run.json", MAX_JSON_BYTES, "checkpoint run.json")
    except UnsafeFileError as err:
        raise CheckpointError(f"{err}; resume from an older checkpoint") from None
    return path, state, run_info


def write_final(run_dir: str | Path, ckpt: Path, *, max_length: int | None = None) -> Path:
    """Copy the last checkpoint's model (+ tokenizer) to ``<run_dir>/final``, a Hugging Face Hub model folder.

    :func:`distill_dag.model.hub.prepare_hf_folder` ships the modeling code (``auto_map``: loads with
    ``trust_remote_code=True`` and no distill_dag), sets the special token ids and the tokenizer's
    ``model_max_length`` (``max_length``, default the run's ``tokenize.max_seq_length``) and writes the model
    card. Every file gets the umask's mode. ``checksums.json`` covers the folder as written, except the card
    (``README.md``, ``model_card.json``), which the training run and the evaluation fill in later.
    """
    final = Path(run_dir) / "final"
    with atomic_dir(final) as tmp:
        for f in ckpt.iterdir():
            if f.is_file() and f.name not in ("trainer_state.pt", "checksums.json"):
                shutil.copy2(f, tmp / f.name)
                (tmp / f.name).chmod(FILE_MODE)
        prepare_hf_folder(tmp, max_length=max_length)
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name not in UNCHECKSUMMED}
        write_json_atomic(tmp / "checksums.json", sums)
    write_json_atomic(final / "source.json", {"checkpoint": str(ckpt)})
    return final
