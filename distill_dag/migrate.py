"""``distill migrate-config``: a seed-style flat config (``model_variant: 500M``, ``train_data_path: ...``)
turned into this project's sectioned config, with the mapping and what has no equivalent, and why.

:data:`SEED_KEYS` is also what the config loader uses to answer an unknown seed key with
"did you mean `student.variant`". Beside the standard library, only the config package is imported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from distill_dag.config import ConfigError, PipelineConfig, read_yaml
from distill_dag.seed_keys import SEED_KEYS  # the mapping table; config reads it too

_NO_EQUIVALENT_DEFAULT = "not a setting of distill-dag"
# keys the seed had that are known to have no equivalent, with why
_DROPPED: dict[str, str] = {
    "use_bf16": "precision follows the device (bf16 teacher on CUDA, float32 on the CPU)",
    "teacher_device": "the teacher runs on train.device (or behind a server: teacher_mode network)",
    "use_8bit_optimizer": "Muon/AdamW keep full-precision state",
    "min_lr": "the cosine floor is relative here: train.min_lr_ratio (set from min_lr / learning_rate when both "
              "are given)",
    "enable_wandb": "W&B is on (offline without WANDB_API_KEY); wandb.mode: disabled turns it off",
    "wandb_offline": "wandb.mode: offline",
    "pretokenized_splits": "one manifest per dataset folder; there are no named splits to filter",
}


# seed keys whose value is a path: relative to the seed's project root (the current directory when it ran)
_PATH_KEYS = ("train_data_path", "cache_dir", "output_dir", "teacher_adapter_path", "resume_from")
# name-or-path keys: a local folder when it exists under the root or is spelled as a path, else a hub id
_NAME_OR_PATH_KEYS = ("teacher_model", "tokenizer_name")


def _value(key: str, v: Any, notes: list[str]) -> Any:
    if key == "cache_logits":
        return "cached"
    if key == "resume_from" and isinstance(v, str) and Path(v).name == "checkpoint_latest.pt":
        notes.append(f"  resume_from: {v!r} -> its run folder (ours follows the folder's checkpoint_latest)")
        return str(Path(v).parent)
    if key == "distill_alpha" and isinstance(v, (int, float)) and not isinstance(v, bool):
        return round(1.0 - float(v), 12)
    if key == "device" and isinstance(v, str) and v.startswith("cuda:"):
        notes.append(f"  device: {v!r} -> 'cuda' (the device index comes from LOCAL_RANK under torchrun)")
        return "cuda"
    if key == "optimizer_type" and isinstance(v, str):
        return {"adamw_torch": "adamw"}.get(v, v)
    return v


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}_{k}" if prefix else str(k)
        if isinstance(v, dict):  # the seed flattens nested sections: {"a": {"b": 1}} is a_b
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _put(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _local(v: str, root: Path) -> bool:
    return v.startswith(("/", "./", "../", "~")) or (root / v).exists()


def _relocate(v: str, root: Path, new_dir: Path | None) -> str:
    """``v`` (relative to the seed's ``root``) as written in NEW.yaml: relative to ``new_dir`` when known,
    else absolute, so it points at the same file wherever NEW.yaml is written."""
    p = Path(os.path.expanduser(v))
    p = p if p.is_absolute() else root / p
    p = Path(os.path.normpath(p))
    return os.path.relpath(p, new_dir) if new_dir is not None else str(p)


def migrate(seed: dict[str, Any], root: str | os.PathLike | None = None,
            new_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], list[str]]:
    """``(our config dict, report lines)`` for a seed-style flat config dict.

    ``root``: the seed's project root, against which its relative paths were resolved (default: the
    current directory, where the seed's scripts ran). ``new_dir``: the folder NEW.yaml is written to; paths
    are written relative to it, or absolute when it is not known (NEW.yaml on stdout), so they point where the
    seed's pointed wherever NEW.yaml lands."""
    flat = _flatten(seed)
    root_p = Path(root if root is not None else Path.cwd()).resolve()
    new_p = Path(new_dir).resolve() if new_dir is not None else None
    out: dict[str, Any] = {}
    mapped, dropped, notes = [], [], []
    for k, v in flat.items():
        target, why = SEED_KEYS.get(k, (None, _DROPPED.get(k, _NO_EQUIVALENT_DEFAULT)))
        if k == "cache_logits" and v is not True:
            target, why = None, "false: the teacher runs as train.teacher_mode says"
        if k == "teacher_mode" and flat.get("cache_logits") is True and v != "cached":
            notes.append(f"  teacher_mode: {v!r} ignored: cache_logits: true trains from the cache (teacher_mode: "
                         "cached)")
            continue
        if target is None:
            if k == "val_data_path" and v is not None and v == flat.get("train_data_path"):
                why = "same folder as train_data_path: its val split is used"
            dropped.append(f"  {k}: {v!r}  ({why})")
            continue
        new = _value(k, v, notes)
        if isinstance(new, str) and (k in _PATH_KEYS or k in _NAME_OR_PATH_KEYS and _local(new, root_p)):
            new = _relocate(new, root_p, new_p)
        _put(out, target, new)
        shown = f"{v!r} -> {new!r}" if new != v else repr(v)
        mapped.append(f"  {k:<28} -> {target:<32} {shown}  ({why})")
    # the derived ones
    if "min_lr" in flat and "learning_rate" in flat and flat["learning_rate"]:
        try:
            ratio = float(flat["min_lr"]) / float(flat["learning_rate"])
            if 0.0 <= ratio <= 1.0:
                _put(out, "train.min_lr_ratio", round(ratio, 12))
                mapped.append(f"  {'min_lr':<28} -> {'train.min_lr_ratio':<32} {ratio:.6g} (min_lr / learning_rate)")
        except (TypeError, ValueError):
            pass
    if "teacher_model" in flat and "tokenizer_name" not in flat and flat["teacher_model"]:
        tok = out.get("teacher", {}).get("model_name_or_path", flat["teacher_model"])
        _put(out, "tokenizer.name_or_path", tok)
        notes.append(f"  tokenizer.name_or_path set to the teacher ({tok!r}): KD needs the teacher's tokenizer; "
                     "every stage fetches it into <data.root>/tokenizer when that folder is missing")
    if "train_data_path" in flat:  # raw/, tokenizer/ under the seed's data/ folder, as its QUICKSTART lays them out
        _put(out, "data.root", _relocate("data", root_p, new_p))
    if flat.get("cache_logits") is True:
        notes.append("  cache_logits: true -> train.teacher_mode: cached: fill the cache first with `distill "
                     "cache-logits --config NEW.yaml`, then `distill train --config NEW.yaml` reads it")
    if flat.get("use_pretokenized_data") is False:
        notes.append("  use_pretokenized_data was false: tokenize the raw JSONL first, `distill preprocess --input RAW "
                     "--output DATA_DIR --tokenizer TOK`, and point data.tokenized_dir at DATA_DIR")
    paths = [k for k in _PATH_KEYS if isinstance(flat.get(k), str) and not Path(flat[k]).is_absolute()]
    if paths:
        where = f"relative to {new_p}" if new_p is not None else "absolute"
        notes.append(f"  relative paths ({', '.join(paths)}) were relative to the seed's project root {root_p}; "
                     f"written {where}, so they point at the same files wherever NEW.yaml is")
    report = ["seed key                        our key                          value  (note)", *mapped]
    if dropped:
        report += ["no equivalent (dropped):", *dropped]
    if notes:
        report += ["notes:", *notes]
    return out, report


def load_seed_yaml(path: str | Path, read: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    data = (read or read_yaml)(Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a seed config is a mapping of keys, got {type(data).__name__}")
    return data


def looks_like_ours(data: dict[str, Any]) -> bool:
    return bool(data) and all(k in PipelineConfig.model_fields or k == "base" for k in data)
