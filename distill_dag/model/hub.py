"""The student's ``final`` folder as a Hugging Face Hub model: shipped modeling code, ``auto_map``, special
token ids, the trained length on the tokenizer and a model card (``README.md``).

- :func:`modeling_sources` / :func:`write_modeling_code`: the student's modules (``distill_dag.model.retnet``
  and the retention kernels it calls) copied beside the weights as ``modeling_retnet.py`` and ``retention*.py``.
  Each ``from distill_dag.X import ...`` becomes ``from .<file> import ...``; an import of any other package
  than torch, transformers, huggingface_hub and the standard library (triton, fla: optional backends, imported
  only when chosen) is wrapped in ``try: ... except ImportError: raise``, which behaves exactly as before but
  keeps transformers' static requirement check (``check_imports``, which skips ``try`` blocks) from asking
  for it. The result imports nothing of ``distill_dag``; this is checked on every write.
- :func:`prepare_hf_folder`: ``config.json`` gets ``auto_map`` and ``eos/pad/bos_token_id`` from the
  tokenizer, ``generation_config.json`` the same ids (``generate`` stops at EOS), ``tokenizer_config.json``
  ``model_max_length`` = the trained row length; then the card. Used by
  :func:`distill_dag.training.checkpoint.write_final`.
- :func:`update_model_card`: facts are kept in ``model_card.json`` and ``README.md`` is rendered from them, so
  the training run (losses) and the evaluation (tables) each fill in their own section later.

A folder prepared this way loads in any Python with torch and transformers, without distill_dag::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # it reads config.json, whose AutoConfig is shipped

and uploads as it is: ``huggingface_hub.HfApi().upload_folder(folder_path=folder, repo_id=...)``.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

from distill_dag.io import write_bytes_atomic, write_json_atomic

# distill_dag module -> file (without .py) in the checkpoint folder; every distill_dag import of a shipped
# module must be in here (else ShippedCodeError names it)
SHIPPED_MODULES: dict[str, str] = {
    "distill_dag.model.retnet": "modeling_retnet",
    "distill_dag.kernels.retention": "retention",
    "distill_dag.kernels.retention.reference": "retention_reference",
    "distill_dag.kernels.retention.chunk": "retention_chunk",
    "distill_dag.kernels.retention.triton_chunk": "retention_triton",
}
MODELING_FILE = "modeling_retnet"
AUTO_MAP = {
    "AutoConfig": f"{MODELING_FILE}.RetNetConfig",
    "AutoModel": f"{MODELING_FILE}.RetNetModel",
    "AutoModelForCausalLM": f"{MODELING_FILE}.RetNetForCausalLM",
}
# what the shipped code may require (transformers' check_imports): everything else is optional
REQUIRED_PACKAGES = frozenset({"torch", "transformers", "huggingface_hub"})
CARD_FACTS = "model_card.json"
CARD = "README.md"
# files whose content changes after the folder is written (the eval fills the card in): not in checksums.json
UNCHECKSUMMED = frozenset({CARD, CARD_FACTS, "checksums.json"})


class ShippedCodeError(RuntimeError):
    """The student's modules cannot be shipped self-contained (the message names the module and import)."""


# ---- shipped modeling code ---------------------------------------------------------------------------
def _allowed(top: str) -> bool:
    return top in REQUIRED_PACKAGES or top in sys.stdlib_module_names or top == "__future__"


def _rewrite(src: str, module: str) -> str:
    """``src`` of ``module`` with distill_dag imports made relative and optional imports wrapped (module doc)."""
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []  # (first line index, end line index exclusive, new lines)

    def where(node: ast.stmt) -> str:
        return f"{module} line {node.lineno}"

    def alone(node: ast.stmt) -> None:
        before = lines[node.lineno - 1][: node.col_offset]
        if before.strip():
            raise ShippedCodeError(f"{where(node)}: put the import on a line of its own to ship it")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ShippedCodeError(f"{where(node)}: relative import; import shipped modules by their full name")
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        tops = {n.split(".")[0] for n in names}
        if "distill_dag" in tops:
            if not isinstance(node, ast.ImportFrom) or node.module not in SHIPPED_MODULES:
                raise ShippedCodeError(
                    f"{where(node)} imports {', '.join(names)}, which the checkpoint does not ship: use "
                    f"`from <module> import ...` of one of {', '.join(SHIPPED_MODULES)} (or add the module to "
                    "distill_dag.model.hub.SHIPPED_MODULES; it must itself import no other distill_dag module)"
                )
            alone(node)
            first = lines[node.lineno - 1]
            head = re.compile(rf"from\s+{re.escape(node.module)}\s+import\b")
            if not head.search(first):
                raise ShippedCodeError(f"{where(node)}: write `from {node.module} import` on one line to ship it")
            new = head.sub(f"from .{SHIPPED_MODULES[node.module]} import", first, count=1)
            edits.append((node.lineno - 1, node.lineno, [new]))
        elif not all(_allowed(t) for t in tops):
            alone(node)
            pad = " " * node.col_offset
            body = lines[node.lineno - 1 : node.end_lineno]
            body = ["    " + body[0][node.col_offset:] if i == 0 else "    " + line
                    for i, line in enumerate(body)]
            body[0] = pad + body[0]
            optional = ", ".join(sorted(t for t in tops if not _allowed(t)))
            edits.append((node.lineno - 1, node.end_lineno, [
                f"{pad}try:  # {optional}: an optional backend, required only when it is chosen\n",
                *body,
                f"{pad}except ImportError:\n",
                f"{pad}    raise\n",
            ]))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    return "".join(lines)


def modeling_sources() -> dict[str, str]:
    """``{file name: source}`` of the self-contained modeling code (see the module doc)."""
    from distill_dag import __version__

    out = {}
    for module, name in SHIPPED_MODULES.items():
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise ShippedCodeError(f"{module} (listed in SHIPPED_MODULES) cannot be found")
        origin = Path(spec.origin)
        rel = "/".join(module.split(".")) + ("/__init__.py" if origin.name == "__init__.py" else ".py")
        header = (f"# Shipped with the checkpoint by distill-dag {__version__}: a copy of {rel}, with the imports of\n"
                  "# its sibling modules made relative. It imports only torch, transformers and the files beside it.\n")
        out[f"{name}.py"] = header + _rewrite(origin.read_text(encoding="utf-8"), module)
    return out


def write_modeling_code(folder: str | Path) -> list[str]:
    """Write :func:`modeling_sources` into ``folder`` and check that transformers asks for no other package."""
    from transformers.dynamic_module_utils import get_imports

    folder = Path(folder)
    names = []
    for name, src in modeling_sources().items():
        write_bytes_atomic(folder / name, src.encode())
        extra = sorted(t for t in get_imports(folder / name) if not _allowed(t))
        if extra:
            raise ShippedCodeError(f"{folder / name} would require {', '.join(extra)} to load with trust_remote_code")
        names.append(name)
    return names


# ---- config, generation config, tokenizer ------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    from distill_dag.safe_read import read_json_bounded  # a FIFO or /dev/zero named config.json must not hang us

    if not path.exists():
        return {}
    d = read_json_bounded(path, what="checkpoint JSON file")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: the top level must be a JSON object, got {type(d).__name__}")
    return d


def special_token_ids(folder: str | Path) -> dict[str, int | None]:
    """``{"eos_token_id", "pad_token_id", "bos_token_id"}`` of the tokenizer saved in ``folder`` (pad falls back to
    EOS, as the pipeline's tokenizers do); ``{}`` when the folder holds no tokenizer."""
    folder = Path(folder)
    if not (folder / "tokenizer_config.json").exists():
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": tok.bos_token_id}


def prepare_hf_folder(folder: str | Path, *, max_length: int | None = None,
                      card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make a saved student folder a Hub model (see the module doc). ``max_length``: the trained row length
    (default: ``tokenize.max_seq_length`` of the folder's ``run.json``). ``card``: extra card facts.

    Returns what was set (``ids``, ``max_length``, ``code`` files)."""
    folder = Path(folder)
    run = _read_json(folder / "run.json")
    if max_length is None:
        max_length = (run.get("config") or {}).get("tokenize", {}).get("max_seq_length")
    ids = special_token_ids(folder)  # before config.json has an auto_map

    code = write_modeling_code(folder)
    config = _read_json(folder / "config.json")
    if not config:
        raise FileNotFoundError(f"{folder / 'config.json'} is missing: not a saved model")
    config["auto_map"] = dict(AUTO_MAP)
    config.update(ids)
    write_json_atomic(folder / "config.json", config)

    gen = _read_json(folder / "generation_config.json")
    gen.update({k: v for k, v in ids.items() if v is not None})
    if gen:
        gen.setdefault("transformers_version", config.get("transformers_version"))
        write_json_atomic(folder / "generation_config.json", gen)

    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists() and max_length:
        t = _read_json(tok_cfg)
        t["model_max_length"] = int(max_length)
        write_json_atomic(tok_cfg, t)

    facts = {"run": _run_facts(run, folder), "ids": ids, "max_length": max_length}
    update_model_card(folder, **facts, **(card or {}))
    return {"ids": ids, "max_length": max_length, "code": code}


# ---- model card ------------------------------------------------------------------------------------------
def _run_facts(run: dict[str, Any], folder: Path) -> dict[str, Any]:
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
    all_facts = _read_json(folder / CARD_FACTS)
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
