"""Config errors: :class:`ConfigError`, and a pydantic ``ValidationError`` turned into one message that
names the file and every bad key, with a hint for an unknown one (a seed key, a key in the wrong section)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from distill_dag.config.schema import PipelineConfig, vocab_errors
from distill_dag.seed_keys import SEED_KEYS


class ConfigError(ValueError):
    """A config file or dict that cannot be used; the message names the file and the key."""


def check_vocab(cfg: PipelineConfig, vocab_size: int, where: str) -> None:
    """Refuse a top-k above the vocabulary once the vocabulary is known (``where``: e.g. the manifest's
    path); raises :class:`ConfigError` naming the key."""
    errs = vocab_errors(cfg, int(vocab_size), where)
    if errs:
        raise ConfigError("invalid config:\n" + "\n".join(f"  key '{k}': {m}" for k, m in errs))


def _field_index() -> dict[str, list[str]]:
    """leaf name -> dotted keys that have it (for "did you mean" on a key in the wrong section)."""
    out: dict[str, list[str]] = {}
    for sec, f in PipelineConfig.model_fields.items():
        for name in f.annotation.model_fields:  # type: ignore[union-attr]
            out.setdefault(name, []).append(f"{sec}.{name}")
    return out


def _hint(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]

    if leaf in SEED_KEYS:
        target, note = SEED_KEYS[leaf]
        if target:
            # the note says when the meaning differs (distill_alpha is inverted): porting by hand flips it otherwise
            meaning = "" if note == "same meaning" else f" ({note})"
            return (f"a seed config key: did you mean `{target}`?{meaning} (`distill migrate-config OLD.yaml > "
                    f"NEW.yaml` converts a whole seed config)")
        return f"a seed config key with no equivalent here: {SEED_KEYS[leaf][1]}"
    where = [k for k in _field_index().get(leaf, []) if k != key]
    if where:
        return f"did you mean `{where[0]}`?"
    return "remove it or check its spelling"


def short_repr(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}' ({_hint(key)})")
        elif not e["loc"] and e["type"] == "value_error":  # a cross-section check: its message names the keys
            for m in str(e["msg"]).removeprefix("Value error, ").split("; "):
                lines.append(f"  {m}" if m.startswith("key '") else f"  key '<root>': {m}")
        else:
            msg = e["msg"]
            if e["type"] == "finite_number":
                msg = "must be a finite number (NaN and inf are refused)"
            lines.append(f"  key '{key}': {msg} (got {short_repr(e.get('input'))})")
    return "\n".join(lines)
