"""Synthetic retrieval documents mixed into the demo corpus, so the tiny teacher learns to retrieve.

A tiny Llama trained on standard-library code alone never learns to copy a pass key from 200 tokens
back (issue 19: NIAH 0.00 for every model), so the needle-in-a-haystack test could not tell a good
student from a bad one. A small share of these documents (the stdlib text stays the bulk) teaches
the copying circuit the test needs. Each document is a run of short *episodes* over real filler text
(windows of this Python's standard-library sources, the demo's own corpus), each episode one of:

- **pass key**: ``The pass key is NNNNN.`` on a line of its own at a random depth of the filler, then
  ``What is the pass key? The pass key is NNNNN.``;
- **key-value recall**: a table of ``name = NNNN`` lines (random names), filler, then
  ``assert name == NNNN`` for some of them (a name asked about appears once in the table);
- **repeated-name lookup**: ``The name of the <role> is First Last.``, filler, then ``Who is the
  <role>? The <role> is First Last.``;
- **repeat**: ``name = [n1, n2, ...]`` (random numbers), filler, the same line again.

Episodes are 20 to ~250 tokens long (the demo trains on 256-token rows): the packer cuts the
documents into rows anywhere, so most episodes sit inside one row, at every distance up to the
training length (measured: 8 % of the needles sit 180+ tokens before their question, and an episode of
``d`` tokens survives whole in a 256-token row with probability ``(256 - d) / 256``, so the long distances
come from the teacher finetune's pass-key rows, :func:`distill_dag.data.copy_rows.pass_key_rows`).
Everything is deterministic (seeded by the source name and the document index);
the source is declared as ``kind: hf`` with ``dataset: synthetic:retrieval`` (``max_rows`` documents,
default 200), which :func:`distill_dag.data.sources.gather_source` routes here (no hub id has a colon).
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path
from typing import Any, Callable, Iterator

SCHEME = "synthetic:retrieval"
VERSION = 2  # bump when the generator's output changes (it is part of the raw source's fingerprint)
DEFAULT_DOCS = 200
DOC_CHARS = 4000  # about 1,100 tokens of the demo BPE per document
CATEGORY = "retrieval"

NEEDLE = "The pass key is {key}."  # distill_dag.eval.niah asks with this wording too
QUESTION = "What is the pass key? The pass key is"

_FIRST = ["Ada", "Alan", "Grace", "Linus", "Guido", "Barbara", "Edsger", "Donald", "Margaret", "Dennis",
          "Ken", "Frances", "John", "Radia", "Leslie", "Niklaus", "Tim", "Hedy", "Katherine", "Claude",
          "Marta", "Yuki", "Omar", "Priya", "Lena", "Igor", "Sofia", "Mateo", "Amara", "Chen"]
_LAST = ["Lovelace", "Turing", "Hopper", "Torvalds", "Rossum", "Liskov", "Dijkstra", "Knuth", "Hamilton",
         "Ritchie", "Thompson", "Allen", "McCarthy", "Perlman", "Lamport", "Wirth", "Berners", "Lamarr",
         "Johnson", "Shannon", "Koval", "Tanaka", "Haddad", "Raman", "Berg", "Petrov", "Rossi", "Silva",
         "Okafor", "Wei"]
_ROLES = ["user", "owner", "author", "reviewer", "maintainer", "caller", "admin", "sender"]
_SYLL = ["ka", "lo", "mi", "ra", "to", "ne", "vu", "zi", "po", "se", "da", "fe", "gu", "hi", "ju"]


def is_synthetic(dataset: str | None) -> bool:
    """True for the dataset name this module generates (``synthetic:retrieval``)."""
    return dataset == SCHEME


def _filler_lines(max_chars: int = 600_000) -> list[str]:
    """Non-blank lines of standard-library sources (sorted files, deterministic), at most ``max_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    total = 0
    for p in sorted(root.glob("*.py")):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for ln in text.splitlines():
            if ln.strip() and len(ln) < 100 and "pass key" not in ln:
                lines.append(ln)
                total += len(ln) + 1
        if total >= max_chars:
            break
    return lines


def _filler(rng: random.Random, lines: list[str], chars: int) -> list[str]:
    """A window of consecutive filler lines of about ``chars`` characters."""
    start = rng.randrange(len(lines))
    out, n = [], 0
    i = start
    while n < chars:
        ln = lines[i % len(lines)]
        out.append(ln)
        n += len(ln) + 1
        i += 1
    return out


def _insert(body: list[str], line: str, depth: float) -> list[str]:
    pos = round(depth * len(body))
    return body[:pos] + [line] + body[pos:]


def _pass_key(rng: random.Random, lines: list[str]) -> str:
    key = str(rng.randint(10_000, 99_999))
    body = _insert(_filler(rng, lines, rng.randint(60, 800)), NEEDLE.format(key=key), rng.random())
    return "\n".join(body + [f"{QUESTION} {key}."])


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLL) for _ in range(rng.randint(2, 3))) + rng.choice(["", "_id", "_port", "_size"])


def _key_value(rng: random.Random, lines: list[str]) -> str:
    names = list(dict.fromkeys(_name(rng) for _ in range(rng.randint(3, 7))))
    table = [f"{n} = {rng.randint(100, 9999)}" for n in names]
    asked = rng.sample(table, k=min(len(table), rng.randint(1, 3)))
    body = table + _filler(rng, lines, rng.randint(0, 600))
    return "\n".join(body + [f"assert {t.replace(' = ', ' == ')}" for t in asked])


def _lookup(rng: random.Random, lines: list[str]) -> str:
    role = rng.choice(_ROLES)
    who = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    body = _insert(_filler(rng, lines, rng.randint(40, 700)), f"The name of the {role} is {who}.", rng.random() * 0.8)
    return "\n".join(body + [f"Who is the {role}? The {role} is {who}."])


def _repeat(rng: random.Random, lines: list[str]) -> str:
    """A line of random numbers, filler, the same line again: every token of the copy is predictable only
    by looking back (the densest copying signal per token, what makes an induction circuit form early)."""
    name = _name(rng)
    line = f"{name} = [" + ", ".join(str(rng.randint(0, 99_999)) for _ in range(rng.randint(4, 9))) + "]"
    body = _insert(_filler(rng, lines, rng.randint(20, 700)), line, rng.random() * 0.5)
    return "\n".join(body + [line])


_EPISODES: list[tuple[float, Callable[[random.Random, list[str]], str]]] = [
    (0.4, _pass_key), (0.3, _repeat), (0.15, _key_value), (0.15, _lookup)]


def make_document(index: int, lines: list[str], doc_chars: int = DOC_CHARS, seed: str = "retrieval") -> str:
    """Document ``index``: episodes separated by a blank line until ``doc_chars`` characters."""
    rng = random.Random(f"{seed}/{index}")
    parts, n = [], 0
    weights = [w for w, _ in _EPISODES]
    while n < doc_chars:
        (_, make), = rng.choices(_EPISODES, weights=weights)
        ep = make(rng, lines)
        parts.append(ep)
        n += len(ep) + 2
    return "\n\n".join(parts) + "\n"


def documents(n: int, doc_chars: int = DOC_CHARS, seed: str = "retrieval") -> Iterator[str]:
    lines = _filler_lines()
    for i in range(n):
        yield make_document(i, lines, doc_chars, seed)


def source_items(src: Any) -> Callable[[int], Iterator[dict[str, Any]]]:
    """``items_from(start)`` for :func:`distill_dag.data.sources.write_parts`: ``src.max_rows`` documents
    (default 200) with ``text``, ``id``, ``source``, ``category``."""
    n = src.max_rows or DEFAULT_DOCS
    category = src.category if src.category != "general" else CATEGORY

    def items(start: int) -> Iterator[dict[str, Any]]:
        lines = _filler_lines()
        for i in range(start, n):
            yield {"text": make_document(i, lines, seed=src.name), "id": f"{src.name}:{i}", "source": src.name,
                   "category": category}

    return items
