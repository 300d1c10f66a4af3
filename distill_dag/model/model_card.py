"""The model card of a student's ``final`` folder: facts kept in ``model_card.json``, ``README.md`` rendered
from them.

:func:`update_model_card` merges a section of facts and re-renders the card, so the folder's preparation
(:func:`distill_dag.model.hub.prepare_hf_folder`: the run and the ids), the training run (losses) and the
evaluation (tables, :func:`add_eval_to_model_card`) each fill in their own section. Every value from a
config, a path or a result is rendered as inert text (no Markdown or HTML of its own).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from distill_dag.io import write_bytes_atomic, write_json_atomic
from distill_dag.safe_read import read_json_bounded

CARD_FACTS = "model_card.json"
CARD = "README.md"


def read_folder_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a model folder (``{}`` when it is missing), read bounded: a FIFO or /dev/zero
    named config.json must not hang us."""
    if not path.exists():
        return {}
    d = read_json_bounded(path, what="checkpoint JSON file")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: the top level must be a JSON object, got {type(d).__name__}")
    return d


def run_facts(run: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What the card says about training, from the folder's ``run.json`` and weights."""
    cfg = run.get("config") or {}
    train = cfg.get("train") or {}
    lin = run.get("lineage") or {}
    facts: dict[str, Any] = {
        "kind": run.get("kind", "student"),
        "step": run.get("step"),
        "tokens": run.get("tokens"),
        "ce_only": bool(run.get("pretrain_ce_only", train.get("pretrain_ce_only", False))),
        "teacher": lin.get("teacher"),
        "teacher_mode": lin.get("teacher_mode", train.get("teacher_mode")),
        "manifest_hash": lin.get("manifest_hash"),
        "tokenizer_hash": lin.get("tokenizer_hash"),
        "config_hash": lin.get("config_hash"),
        "student": cfg.get("student"),
        "temperature": train.get("temperature"),
        "distill_alpha": train.get("distill_alpha"),
        "teacher_topk": train.get("teacher_topk"),
    }
    facts["parameters"] = _parameter_count(folder)
    return facts


def _parameter_count(folder: Path) -> int | None:
    weights = folder / "model.safetensors"
    if not weights.exists():
        return None
    from safetensors import safe_open

    n = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            size = 1
            for s in shape:
                size *= s
            n += size
    return n


def update_model_card(folder: str | Path, **facts: Any) -> Path:
    """Merge ``facts`` (top-level sections: ``run``, ``training``, ``evaluation``, ...) into ``model_card.json`` and
    re-render ``README.md``. Returns the card's path."""
    folder = Path(folder)
    all_facts = read_folder_json(folder / CARD_FACTS)
    all_facts.update({k: v for k, v in facts.items()})
    write_json_atomic(folder / CARD_FACTS, all_facts)
    card = folder / CARD
    write_bytes_atomic(card, render_model_card(all_facts).encode())
    return card


def add_eval_to_model_card(checkpoint: str | Path | None, result: dict[str, Any]) -> Path | None:
    """Fill the card's evaluation section from an :func:`distill_dag.eval.report.evaluate_checkpoint` result.

    Only a folder that has a card (a prepared ``final``) is touched; returns the card or None."""
    if checkpoint is None or not (Path(checkpoint) / CARD_FACTS).exists():
        return None
    keep = ("split", "perplexity_rows", "student_ppl", "student_nats_per_token", "niah_accuracy", "niah_table",
            "niah_teacher_accuracy", "report_path")
    return update_model_card(checkpoint, evaluation={k: result[k] for k in keep if result.get(k) is not None})


# The Markdown punctuation that can act in the middle of a line (the card puts values mid-line or in table
# cells, never at a line's start): code spans, emphasis, links and images, cell breaks, strikethrough.
# & < > go through html.escape.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#])")
_SAFE_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+")


def _one_line(s: str) -> str:
    """Line breaks and other control characters become spaces: a value cannot start a heading or a new row."""
    return "".join(" " if (ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029") else c for c in s)


def _md(x: Any) -> str:
    """A value from a config, a path or a result as inert card text: one line, Markdown punctuation
    backslash-escaped, HTML special characters as entities (so ``<img onerror=...>`` shows as text)."""
    return html.escape(_MD_SPECIAL.sub(r"\\\1", _one_line(str(x))), quote=False)


def _code(x: Any) -> str:
    """A value shown as inline code: one line, in a backtick fence longer than any backtick run inside it
    (CommonMark), ``|`` escaped for the table it sits in. Inside a code span HTML is not rendered."""
    s = _one_line(str(x)).replace("|", "\\|")
    fence = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or not s.strip() else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _url(x: Any) -> str:
    s = str(x)
    return f"<{s}>" if _SAFE_URL.fullmatch(s) else _md(s)


def _table_md(table: Any) -> str:
    """A Markdown table we generated (the NIAH grid), re-checked: only ``|``-rows are kept, each cell's
    text escaped as :func:`_md` does (the grid's numbers pass through unchanged)."""
    rows = []
    for line in str(table).splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            continue
        cells = line[1:-1].split("|")
        if all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in cells):
            rows.append(line)  # the header separator
        else:
            rows.append("| " + " | ".join(_md(c.strip()) for c in cells) + " |")
    return "\n".join(rows)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.{digits}f}"
    return _md(x)


def _teacher_line(t: Any) -> str:
    if not t:
        return "none (cross-entropy only)"
    if not isinstance(t, dict):
        return _code(t)
    parts = [_code(t.get('model') or t.get('name') or t.get('url') or 'unknown')]
    if t.get("adapter"):
        parts.append(f"with adapter {_code(t['adapter'])}")
    if t.get("weights_sha256"):
        parts.append(f"(weights sha256 {_code(str(t['weights_sha256'])[:16] + '…')})")
    if t.get("provider"):
        parts.append(f"via {_md(t['provider'])}")
    return " ".join(parts)


def render_model_card(facts: dict[str, Any]) -> str:
    """``README.md``: YAML front-matter for the Hub, then what the student is, how it was made and measured."""
    run = facts.get("run") or {}
    tr = facts.get("training") or {}
    ev = facts.get("evaluation") or {}
    student = run.get("student") or {}
    ce_only = run.get("ce_only")
    aligned = run.get("kind") == "align"
    teacher = _teacher_line(None if ce_only else run.get("teacher"))
    how = ("retention alignment to the teacher (stage 1 of from_teacher init), not yet distilled" if aligned else
           "cross-entropy on the data only (the CE-only baseline)" if ce_only else
           f"knowledge distillation: sparse top-{_md(run.get('teacher_topk'))} KL to the teacher at temperature "
           f"{_md(run.get('temperature'))} (weight {_md(run.get('distill_alpha'))}) plus cross-entropy on the data "
           f"(weight {_md(None if not isinstance(run.get('distill_alpha'), (int, float)) else round(1 - run['distill_alpha'], 6))})")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "license: other  # PLACEHOLDER, not set by distill-dag: put the license of your data and teacher here",
        "tags:",
        "- retnet",
        "- knowledge-distillation",
        "- distill-dag",
        "- custom_code",
        "---",
        "",
        f"# RetNet student{' (CE-only baseline)' if ce_only else ''}",
        "",
        f"A {_fmt(run.get('parameters'))}-parameter RetNet (Sun et al. 2023, \"Retentive Network\") causal LM trained "
        f"by distill-dag with {how}. It generates with a constant-size recurrent state: memory per token does not "
        "grow with the context.",
        "",
        "> **License: placeholder.** The `license: other` above was not chosen by anyone. Before publishing, set it "
        "to the license that binds this model (a student distilled from a teacher and trained on a corpus is "
        "usually bound by both).",
        "",
        "## Intended use",
        "",
        "Research and experimentation: a small, fast student to compare with its teacher, study distillation into "
        "recurrent (linear-attention) models, or run where a constant memory per token matters. It is trained on "
        "a narrow corpus for few tokens; it is not instruction-tuned, not evaluated for safety or bias, and not "
        "meant for production or user-facing text generation.",
        "",
        "## How to use",
        "",
        "The modeling code ships in this folder (`modeling_retnet.py`, `retention*.py`; they need only torch and "
        "transformers), hence `trust_remote_code=True`. Pass it to `AutoTokenizer` too: it reads `config.json`, "
        "whose `AutoConfig` is that code (without it, transformers asks before running it).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "PATH_OR_REPO_ID"',
        "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        'out = model.generate(**tok("def main(", return_tensors="pt"), max_new_tokens=64)  # stops at EOS',
        "print(tok.decode(out[0]))",
        "```",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {teacher} |",
        f"| teacher mode | {_fmt(None if ce_only else run.get('teacher_mode'))} |",
        f"| objective | {how} |",
        f"| data manifest hash (sha256) | {_code(run.get('manifest_hash') or 'n/a')} |",
        f"| tokenizer hash | {_code(run.get('tokenizer_hash') or 'n/a')} |",
        f"| run config hash | {_code(run.get('config_hash') or 'n/a')} |",
        f"| training tokens | {_fmt(tr.get('tokens', run.get('tokens')))} |",
        f"| optimizer steps | {_fmt(tr.get('steps', run.get('step')))} |",
        f"| trained sequence length (tokenizer `model_max_length`) | {_fmt(facts.get('max_length'))} |",
        f"| student | variant {_code(student.get('variant', 'n/a'))}, overrides "
        f"{_code(json.dumps(student.get('overrides') or {}))} |",
        f"| special tokens | eos {_fmt((facts.get('ids') or {}).get('eos_token_id'))}, pad "
        f"{_fmt((facts.get('ids') or {}).get('pad_token_id'))}, bos {_fmt((facts.get('ids') or {}).get('bos_token_id'))} |",
    ]
    if tr.get("wandb_url"):
        lines.append(f"| W&B run | {_url(tr['wandb_url'])} |")
    hy = facts.get("hybrid") or {}
    if hy.get("retention_window"):
        lines += ["", f"Every retention layer also attends with softmax to its last {_fmt(hy['retention_window'])} "
                      "tokens (a sliding window beside retention, as LoLCATs and Liger do)."]
    if hy.get("attention_layers"):
        lines += ["", "### Hybrid: layers kept as softmax attention", "",
                  f"Layers {_md(', '.join(str(i) for i in hy['attention_layers']))} are the teacher's own softmax "
                  "attention (config.json `layer_types`); the others are retention. Their K/V cache grows with the "
                  "context; the retention layers' state does not."]
        if hy.get("layer_gains"):
            lines += ["", "Chosen by KL gain after alignment: the KL(teacher || student) per token with each layer "
                      "alone restored to attention.", "",
                      "| layer | KL, pure | KL, this layer restored | gain | kept |", "|---:|---:|---:|---:|---|"]
            lines += [f"| {_fmt(r.get('layer'))} | {_fmt(r.get('kl_pure'), 4)} | {_fmt(r.get('kl'), 4)} | "
                      f"{_fmt(r.get('gain'), 4)} | {'yes' if r.get('kept') else ''} |" for r in hy["layer_gains"]]
    lines += ["", "### Losses", ""]
    losses = tr.get("losses") or {}
    if losses:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {_md(name)} | {_fmt(v)} |" for name, v in losses.items()]
    else:
        lines.append("Not recorded yet (the training run fills this in when it finishes).")
    lines += ["", "## Evaluation", ""]
    if ev:
        lines.append(f"On the held-out {_code(ev.get('split', 'val'))} split of the same data.")
        rows = ev.get("perplexity_rows") or []
        if rows:
            lines += ["", "| model | nats/token | bits/token | perplexity | tokens |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {_md(r.get('model'))} | {_fmt(r.get('nats_per_token'))} | {_fmt(r.get('bits_per_token'))} | "
                      f"{_fmt(r.get('ppl'), 3)} | {_fmt(r.get('tokens'))} |" for r in rows]
        if ev.get("niah_table"):
            lines += ["", f"Needle in a haystack (pass-key retrieval, greedy; accuracy {_fmt(ev.get('niah_accuracy'), 2)}"
                      + (f", teacher {_fmt(ev['niah_teacher_accuracy'], 2)}" if ev.get("niah_teacher_accuracy")
                         is not None else "") + "): rows are the needle's depth, columns the context length.",
                      "", _table_md(ev["niah_table"])]
    else:
        lines.append("Not evaluated yet: `distill eval` (or the `eval_report` asset) fills this section in.")
    lines += [
        "",
        "## Files and publishing",
        "",
        "`model.safetensors`, `config.json` (with `auto_map` to the shipped code), `generation_config.json`, the "
        "tokenizer, this card and its facts (`model_card.json`), and the pipeline's records: `run.json` (the "
        "resolved config and lineage hashes), `checksums.json`, `source.json`. The folder is ready to upload as it "
        "is, once the license is set:",
        "",
        "```python",
        "from huggingface_hub import HfApi",
        'HfApi().upload_folder(folder_path="THIS_FOLDER", repo_id="you/retnet-student", repo_type="model")',
        "```",
        "",
    ]
    return "\n".join(lines)
