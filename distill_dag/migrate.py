"""``distill migrate-config``: a seed-style flat config (``model_variant: 500M``, ``train_data_path: ...``)
turned into this project's sectioned config, with the mapping and what has no equivalent, and why.

:data:`SEED_KEYS` is also what the config loader uses to answer an unknown seed key with
"did you mean `student.variant`". Only the standard library and PyYAML are imported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from distill_dag.seed_keys import SEED_KEYS  # noqa: E402  (the mapping table; config reads it too)

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


def _value(key: str, v: Any, notes: list[str]) -> Any:
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


def migrate(seed: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(our config dict, report lines)`` for a seed-style flat config dict."""
    flat = _flatten(seed)
    out: dict[str, Any] = {}
    mapped, dropped, notes = [], [], []
    for k, v in flat.items():
        target, why = SEED_KEYS.get(k, (None, _DROPPED.get(k, _NO_EQUIVALENT_DEFAULT)))
        if target is None:
            if k == "val_data_path" and v is not None and v == flat.get("train_data_path"):
                why = "same folder as train_data_path: its val split is used"
            dropped.append(f"  {k}: {v!r}  ({why})")
            continue
        new = _value(k, v, notes)
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
        _put(out, "tokenizer.name_or_path", flat["teacher_model"])
        notes.append(f"  tokenizer.name_or_path set to the teacher ({flat['teacher_model']!r}): KD needs the "
                     "teacher's tokenizer")
    if flat.get("use_pretokenized_data") is False:
        notes.append("  use_pretokenized_data was false: tokenize the raw JSONL first, `distill preprocess --input RAW "
                     "--output DATA_DIR --tokenizer TOK`, and point data.tokenized_dir at DATA_DIR")
    if "train_data_path" in flat:
        notes.append("  the tokenizer is read from <data.root>/tokenizer: build it with `distill tokenizer --output "
                     "<data.root>/tokenizer ...` or set data.root to the folder that holds it")
    paths = [k for k in ("train_data_path", "cache_dir", "output_dir", "teacher_adapter_path", "resume_from")
             if isinstance(flat.get(k), str) and not Path(flat[k]).is_absolute()]
    if paths:
        notes.append(f"  relative paths ({', '.join(paths)}) now resolve against the new config file's folder (the "
                     "seed resolved them against its project root): keep NEW.yaml where they still point right")
    report = ["seed key                        our key                          value  (note)", *mapped]
    if dropped:
        report += ["no equivalent (dropped):", *dropped]
    if notes:
        report += ["notes:", *notes]
    return out, report


def load_seed_yaml(path: str | Path, read: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    from distill_dag.config import ConfigError, read_yaml

    data = (read or read_yaml)(Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a seed config is a mapping of keys, got {type(data).__name__}")
    return data


def looks_like_ours(data: dict[str, Any]) -> bool:
    from distill_dag.config import PipelineConfig

    return bool(data) and all(k in PipelineConfig.model_fields or k == "base" for k in data)
