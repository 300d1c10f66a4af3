"""The curated dataset catalog (``catalog.yaml``) and one formatter per dataset schema.

A formatter maps one row of a dataset, in that dataset's real field layout, to our JSONL row:
``{"text": ...}`` or ``{"prompt": ..., "response": ...}`` (the catalog adds ``id``, ``source``,
``category``). It returns None for a row that holds nothing to train on (e.g. an APPS problem
without a solution).

Chat-shaped rows become ``{"messages": [{"role", "content"}, ...]}`` (:func:`render_chat`): they are
rendered at preprocess time with the tokenizer's own chat template (the plain template only for
tokenizers without one) and every assistant turn is trained (:mod:`distill_dag.data.chat`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    hub_id: str
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    category: str
    samples: int = Field(ge=1)
    formatter: str
    bytes_per_sample: int = Field(1000, ge=1)

    @property
    def expected_bytes(self) -> int:
        return self.samples * self.bytes_per_sample


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    categories: dict[str, str]
    datasets: list[CatalogEntry]

    def select(self, categories: list[str] | None = None) -> list[CatalogEntry]:
        """Entries of the given categories (all when empty/None); unknown names are errors."""
        if not categories:
            return list(self.datasets)
        unknown = [c for c in categories if c not in self.categories]
        if unknown:
            raise ValueError(f"unknown catalog categories {unknown}; known: {sorted(self.categories)}")
        return [d for d in self.datasets if d.category in categories]


def load_catalog(path: str | os.PathLike | None = None) -> Catalog:
    """Load and validate a catalog YAML (default: the built-in ``catalog.yaml``)."""
    path = Path(path) if path else CATALOG_PATH
    try:
        cat = Catalog.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as err:
        raise ValueError(f"{path}: invalid catalog: {err}") from None
    for d in cat.datasets:
        if d.formatter not in FORMATTERS:
            raise ValueError(f"{path}: dataset '{d.name}' names formatter '{d.formatter}'; known: {sorted(FORMATTERS)}")
        if d.category not in cat.categories:
            raise ValueError(f"{path}: dataset '{d.name}' has category '{d.category}' not listed under categories")
    names = [d.name for d in cat.datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: dataset names must be unique, got {names}")
    return cat


def plan(entries: list[CatalogEntry]) -> dict[str, Any]:
    """What a download would fetch: per dataset hub id, split, samples and expected bytes."""
    rows = [
        {"name": e.name, "hub_id": e.hub_id, "subset": e.subset, "split": e.split, "category": e.category,
         "samples": e.samples, "expected_bytes": e.expected_bytes}
        for e in entries
    ]
    return {"datasets": rows, "samples": sum(r["samples"] for r in rows),
            "expected_bytes": sum(r["expected_bytes"] for r in rows)}


# ---- formatting ------------------------------------------------------------------------------
_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "bot": "assistant", "model": "assistant"}


def render_chat(turns: list[tuple[str, str]]) -> dict[str, Any] | None:
    """``[(role, content), ...]`` -> ``{"messages": [...]}``, up to the last assistant turn with content.

    Roles are normalised (human -> user, gpt -> assistant). Turns after the last assistant turn
    are dropped (nothing would be trained on them); None when there is no assistant turn with content.
    The template is applied at preprocess time, with the tokenizer the data is packed for.
    """
    norm = [(_ROLES.get(str(r).lower(), str(r).lower()), c) for r, c in turns if isinstance(c, str)]
    last = max((i for i, (r, c) in enumerate(norm) if r == "assistant" and c.strip()), default=None)
    if last is None:
        return None
    return {"messages": [{"role": r, "content": c} for r, c in norm[: last + 1]]}


def _single(user: str, answer: str, system: str | None = None) -> dict[str, str] | None:
    turns = ([("system", system)] if system and system.strip() else []) + [("user", user), ("assistant", answer)]
    return render_chat(turns)


def fmt_sharegpt(row: dict[str, Any]) -> dict[str, str] | None:
    return render_chat([(t.get("from"), t.get("value")) for t in row.get("conversations") or []])


def fmt_messages(row: dict[str, Any]) -> dict[str, str] | None:
    return render_chat([(m.get("role"), m.get("content")) for m in row.get("messages") or []])


def fmt_dolly(row: dict[str, Any]) -> dict[str, str] | None:
    ctx = (row.get("context") or "").strip()
    user = row["instruction"] + (f"\n\n{ctx}" if ctx else "")
    return _single(user, row["response"])


def fmt_openorca(row: dict[str, Any]) -> dict[str, str] | None:
    return _single(row["question"], row["response"], row.get("system_prompt"))


def fmt_alpaca(row: dict[str, Any]) -> dict[str, str] | None:
    inp = (row.get("input") or "").strip()
    user = row["instruction"] + (f"\n\n{inp}" if inp else "")
    return _single(user, row["output"])


def fmt_code_search_net(row: dict[str, Any]) -> dict[str, str] | None:
    code = row.get("whole_func_string") or row.get("func_code_string")
    if not code:
        return None
    header = f"# {row.get('repository_name', '')}/{row.get('func_path_in_repository', '')}\n"
    return {"text": header + code}


def fmt_apps(row: dict[str, Any]) -> dict[str, str] | None:
    try:
        solutions = json.loads(row.get("solutions") or "[]")
    except json.JSONDecodeError:
        return None
    if not solutions:
        return None
    user = row["question"]
    if (row.get("starter_code") or "").strip():
        user += f"\n\nStart from:\n{row['starter_code']}"
    return _single(user, solutions[0])


def fmt_mbpp(row: dict[str, Any]) -> dict[str, str] | None:
    task = row.get("text") or row.get("prompt")  # 'full' has text, 'sanitized' has prompt
    tests = "\n".join(row.get("test_list") or [])
    user = f"{task}\nYour code should pass these tests:\n\n{tests}" if tests else task
    return _single(user, row["code"])


def fmt_metamath(row: dict[str, Any]) -> dict[str, str] | None:
    return _single(row["query"], row["response"])


def fmt_gsm8k(row: dict[str, Any]) -> dict[str, str] | None:
    return _single(row["question"], row["answer"])


def fmt_mathinstruct(row: dict[str, Any]) -> dict[str, str] | None:
    return _single(row["instruction"], row["output"])


SQUAD_NO_ANSWER = "The passage does not contain the answer."


def fmt_squad_v2(row: dict[str, Any]) -> dict[str, str] | None:
    texts = (row.get("answers") or {}).get("text") or []
    answer = texts[0] if texts else SQUAD_NO_ANSWER  # SQuAD v2: an empty list marks an unanswerable question
    return _single(f"{row['context']}\n\nQuestion: {row['question']}", answer)


def fmt_trivia_qa(row: dict[str, Any]) -> dict[str, str] | None:
    answer = (row.get("answer") or {}).get("value")
    if not answer:
        return None
    return _single(row["question"], answer)


FORMATTERS: dict[str, Callable[[dict[str, Any]], dict[str, str] | None]] = {
    "sharegpt": fmt_sharegpt,
    "messages": fmt_messages,
    "dolly": fmt_dolly,
    "openorca": fmt_openorca,
    "alpaca": fmt_alpaca,
    "code_search_net": fmt_code_search_net,
    "apps": fmt_apps,
    "mbpp": fmt_mbpp,
    "metamath": fmt_metamath,
    "gsm8k": fmt_gsm8k,
    "mathinstruct": fmt_mathinstruct,
    "squad_v2": fmt_squad_v2,
    "trivia_qa": fmt_trivia_qa,
}


def format_row(entry: CatalogEntry, row: dict[str, Any], index: int, source: str) -> dict[str, Any] | None:
    """Apply the entry's formatter and add ``id`` (``<entry>:<index>``), ``source`` and ``category``."""
    out = FORMATTERS[entry.formatter](row)
    if out is None:
        return None
    out["id"] = f"{entry.name}:{index}"
    out["source"] = f"{source}/{entry.name}"
    out["category"] = entry.category
    return out
