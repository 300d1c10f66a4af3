"""Needle in a haystack (pass-key retrieval) with real multi-token greedy generation.

A prompt of exactly ``context_length`` tokens: real text (the held-out split decoded, or the
standard library's docstrings), the needle ``"The pass key is NNNNN."`` inserted at a line boundary
near ``depth`` (0 = start, 1 = just before the question), and the question
``"What is the pass key? The pass key is"`` at the end. The model continues the prompt with
``model.generate`` (greedy; a RetNet student generates from its recurrent state), and a case is
correct when the first run of digits it produces is exactly the key. Accuracy is reported per
depth x context length, as a table and a heat-map PNG.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from distill_dag.data.retrieval_docs import NEEDLE, QUESTION  # the demo corpus' wording: one definition
from distill_dag.eval.plots import figsize, pyplot, save_png, text_color
from distill_dag.loss.perplexity import split_loader



@dataclass
class NiahCase:
    context_length: int
    depth: float
    trial: int
    key: str
    input_ids: list[int]  # exactly context_length tokens
    needle_start: int  # token index where the needle begins


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def is_retrieval_doc(text: str) -> bool:
    """A synthetic retrieval document of the demo corpus (distill_dag/data/retrieval_docs.py): its own
    pass keys would be rival needles in a haystack, so haystacks leave them out."""
    return "The pass key is" in text or "What is the pass key?" in text


def haystack_from_split(tokenizer: Any, data_dir: str | Path, split: str = "val", max_tokens: int = 200_000) -> str:
    """The split's documents decoded back to text (special tokens dropped, documents split by a blank line).

    Decoded and re-encoded rather than spliced as ids, so the prompt has no EOS inside it: a model
    that keeps documents apart would otherwise forget the needle at the first EOS. Synthetic
    retrieval documents (:func:`is_retrieval_doc`) are left out: their pass keys would be rival needles.
    """
    eos = tokenizer.eos_token_id
    docs: list[str] = []
    cur: list[int] = []
    used = 0
    for batch in split_loader(data_dir, split, batch_size=64):
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            for t, m in zip(ids, mask):
                if not m:
                    continue
                used += 1
                if t == eos:
                    docs.append(tokenizer.decode(cur, skip_special_tokens=True))
                    cur = []
                else:
                    cur.append(t)
        if used >= max_tokens:
            break
    if cur:
        docs.append(tokenizer.decode(cur, skip_special_tokens=True))
    return "\n\n".join(d.strip("\n") for d in docs if d.strip() and not is_retrieval_doc(d))


def haystack_for(tokenizer: Any, data_dir: str | Path, split: str, context_length: int) -> tuple[str, str]:
    """``(text, where it came from)``: the haystack of the report's NIAH section and of the pass-key task for
    contexts up to ``context_length`` tokens: the split decoded (:func:`haystack_from_split`, at least 20k
    tokens of it), or the standard library's docstrings when that gives fewer than 2x ``context_length``."""
    text = haystack_from_split(tokenizer, data_dir, split, max_tokens=max(4 * context_length, 20_000))
    if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 2 * context_length:
        return stdlib_haystack(), "standard-library docstrings (the split is too short)"
    return text, f"the '{split}' split, decoded (synthetic retrieval documents left out)"


def stdlib_haystack(max_chars: int = 400_000) -> str:
    """Docstrings of this Python's standard library modules (real English prose, no download)."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for p in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, SyntaxError, OSError, ValueError):
            continue  # a few stdlib files are not UTF-8 / not parseable by this Python
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
                    total += len(doc)
        if total >= max_chars:
            break
    return "\n\n".join(parts)


def _line_starts(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Token indices i where token i-1 ends a line (a needle put there starts on its own line)."""
    ends_line = {t for t in set(ids) if tokenizer.decode([t]).endswith("\n")}
    return [i for i in range(1, len(ids)) if ids[i - 1] in ends_line]


def build_cases(tokenizer: Any, haystack: str | Sequence[int], context_lengths: Iterable[int], depths: Iterable[float],
                trials: int, *, seed: int = 0) -> list[NiahCase]:
    """One case per (context length, depth, trial): a different haystack window and key for each trial.

    ``haystack`` is text or already-encoded token ids; it is cycled when shorter than a window.
    """
    hay = list(haystack) if not isinstance(haystack, str) else _encode(tokenizer, haystack)
    if len(hay) < 16:
        raise ValueError("needle-in-a-haystack: the haystack text is (nearly) empty")
    starts = set(_line_starts(tokenizer, hay))
    question = _encode(tokenizer, "\n" + QUESTION)
    cases = []
    for L in context_lengths:
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"eval.niah_depths: {depth} is outside [0, 1]")
            for trial in range(trials):
                rng = random.Random(f"{seed}/{L}/{depth}/{trial}")
                key = str(rng.randint(10_000, 99_999))
                needle = _encode(tokenizer, NEEDLE.format(key=key) + "\n")
                body_len = L - len(needle) - len(question)
                if body_len < 1:
                    raise ValueError(f"eval.niah_context_lengths: {L} tokens cannot hold the needle and the question")
                off = rng.randrange(len(hay))
                body = [hay[(off + i) % len(hay)] for i in range(body_len)]
                target = round(depth * body_len)
                # nearest line start within a small window, so the needle is a line of its own
                win = max(4, body_len // 20)
                cands = [i for i in range(max(0, target - win), min(body_len, target + win) + 1) if (off + i) % len(hay) in starts]
                pos = min(cands, key=lambda i: abs(i - target)) if cands else target
                ids = body[:pos] + needle + body[pos:] + question
                assert len(ids) == L
                cases.append(NiahCase(L, float(depth), trial, key, ids, pos))
    return cases


_DIGITS = re.compile(r"\s*(\d+)")


def score(generated: str, key: str) -> bool:
    """Exact match: the first run of digits of the continuation (after optional spaces) is the key."""
    m = _DIGITS.match(generated)
    return bool(m) and m.group(1) == key


@torch.no_grad()
def run_cases(
    model: torch.nn.Module,
    tokenizer: Any,
    cases: Sequence[NiahCase],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Greedy ``model.generate`` on every case (cases of one length are batched: no padding needed)."""
    dev = device if device is not None else next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[dict[str, Any]] = []
    try:
        by_len: dict[int, list[NiahCase]] = {}
        for c in cases:
            by_len.setdefault(c.context_length, []).append(c)
        for L, group in by_len.items():
            for s in range(0, len(group), batch_size):
                chunk = group[s : s + batch_size]
                x = torch.tensor([c.input_ids for c in chunk], dtype=torch.long, device=dev)
                gen = model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                )
                for c, g in zip(chunk, gen[:, L:].tolist()):
                    text = tokenizer.decode(g, skip_special_tokens=True)
                    rec = {k: v for k, v in asdict(c).items() if k != "input_ids"}
                    rec.update(generated=text, correct=score(text, c.key))
                    out.append(rec)
    finally:
        model.train(was_training)
    return out


def accuracy_grid(results: Sequence[dict[str, Any]], depths: Sequence[float], lengths: Sequence[int]) -> list[list[float]]:
    """``grid[i][j]`` = accuracy at ``depths[i]`` x ``lengths[j]`` (NaN where there is no case)."""
    grid = []
    for d in depths:
        row = []
        for L in lengths:
            hits = [r["correct"] for r in results if r["context_length"] == L and abs(r["depth"] - d) < 1e-9]
            row.append(sum(hits) / len(hits) if hits else float("nan"))
        grid.append(row)
    return grid


def grid_markdown(grid: list[list[float]], depths: Sequence[float], lengths: Sequence[int]) -> str:
    head = "| depth \\ context | " + " | ".join(str(L) for L in lengths) + " |"
    lines = [head, "|---|" + "---:|" * len(lengths)]
    for d, row in zip(depths, grid):
        lines.append(f"| {d:g} | " + " | ".join(f"{a:.2f}" for a in row) + " |")
    return "\n".join(lines)


def plot_heatmap(
    grid: list[list[float]], depths: Sequence[float], lengths: Sequence[int], path: str | Path, title: str = "NIAH accuracy"
) -> Path:
    """Accuracy heat-map (rows: depth, columns: context length) written atomically as PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize(1.2 + 1.1 * len(lengths), 1.0 + 0.6 * len(depths)))
    cmap = plt.get_cmap("RdYlGn")
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, a in enumerate(row):
            ax.text(j, i, "-" if a != a else f"{a:.2f}", ha="center", va="center", fontsize=9,
                    color=text_color(a, 0.0, 1.0, cmap))
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, path)


def ratio_grid(grid: list[list[float]], ref: list[list[float]]) -> list[list[float]]:
    """``grid / ref`` per cell (NaN where the reference is 0 or missing): the student/teacher ratio."""
    return [[a / r if r == r and a == a and r > 0 else float("nan") for a, r in zip(row, rrow)]
            for row, rrow in zip(grid, ref)]


def plot_heatmaps(
    grids: dict[str, list[list[float]]],
    depths: Sequence[float],
    lengths: Sequence[int],
    path: str | Path,
    *,
    reference: str | None = None,
    train_len: int | None = None,
    title: str = "NIAH pass-key accuracy",
) -> Path:
    """Every model's accuracy heat-map side by side (rows: depth, columns: context length) and, under
    each non-reference model, its per-cell ratio to ``reference`` (the teacher); one PNG, atomically.

    Column labels past ``train_len`` get a ``*`` (beyond the training length)."""
    plt = pyplot()
    names = list(grids)
    others = [n for n in names if n != reference] if reference in grids else []
    nrows = 2 if others else 1
    w = 1.2 + 0.75 * len(lengths)
    fig, axes = plt.subplots(nrows, len(names), figsize=figsize(w * len(names), (1.2 + 0.5 * len(depths)) * nrows),
                             squeeze=False)  # at most ~1000 px wide: the UI's pop-up cut wider figures off
    xt = [f"{L}*" if train_len and L > train_len else str(L) for L in lengths]

    def panel(ax: Any, grid: list[list[float]], label: str, vmax: float, cmap_name: str) -> Any:
        cmap = plt.get_cmap(cmap_name)
        im = ax.imshow(grid, vmin=0.0, vmax=vmax, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(lengths)), xt, fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        for i, row in enumerate(grid):
            for j, a in enumerate(row):
                ax.text(j, i, "-" if a != a else f"{a:.2f}", ha="center", va="center", fontsize=8,
                        color=text_color(a, 0.0, vmax, cmap))  # white on dark cells
        ax.set_title(label, fontsize=9)
        return im

    for j, n in enumerate(names):
        panel(axes[0][j], grids[n], n, 1.0, "RdYlGn")
        axes[0][j].set_xlabel("context length" + (" (* > training length)" if train_len else ""), fontsize=8)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    if others:
        for j, n in enumerate(names):
            ax = axes[1][j]
            if n == reference:
                ax.axis("off")
                ax.text(0.5, 0.5, f"ratios: model / {reference}\n(1.0 = as good as the teacher;\n- where the "
                                  "teacher scores 0)", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            panel(ax, ratio_grid(grids[n], grids[reference]), f"{n} / {reference}", 1.0, "RdYlBu")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def comparison_markdown(grids: dict[str, list[list[float]]], depths: Sequence[float], lengths: Sequence[int],
                        reference: str | None = None) -> str:
    """One table: a row per (model, depth), a column per context length; ``a (r)`` with ``r`` the
    ratio to the reference model's cell."""
    head = "| model | depth | " + " | ".join(str(L) for L in lengths) + " |"
    lines = [head, "|---|---|" + "---:|" * len(lengths)]
    ref = grids.get(reference) if reference else None
    for name, grid in grids.items():
        ratios = ratio_grid(grid, ref) if ref is not None and name != reference else None
        for i, (d, row) in enumerate(zip(depths, grid)):
            cells = []
            for j, a in enumerate(row):
                c = "-" if a != a else f"{a:.2f}"
                if ratios is not None:
                    r = ratios[i][j]
                    c += " (-)" if r != r else f" ({r:.2f})"
                cells.append(c)
            lines.append(f"| {name} | {d:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_niah(
    model: torch.nn.Module,
    tokenizer: Any,
    haystack: str | Sequence[int],
    *,
    context_lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    heatmap_path: str | Path | None = None,
    title: str = "NIAH accuracy",
) -> dict[str, Any]:
    """Build the cases, generate, score. Returns accuracy (overall and per cell), the table, the results."""
    cases = build_cases(tokenizer, haystack, context_lengths, depths, trials, seed=seed)
    results = run_cases(model, tokenizer, cases, max_new_tokens=max_new_tokens, batch_size=batch_size)
    grid = accuracy_grid(results, depths, context_lengths)
    out: dict[str, Any] = {
        "accuracy": sum(r["correct"] for r in results) / len(results),
        "grid": grid,
        "depths": list(depths),
        "context_lengths": list(context_lengths),
        "table_markdown": grid_markdown(grid, depths, context_lengths),
        "results": results,
    }
    if heatmap_path is not None:
        out["heatmap_path"] = str(plot_heatmap(grid, depths, context_lengths, heatmap_path, title))
    return out
