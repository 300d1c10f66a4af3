"""Long-context evaluation: quality and generation cost as the context grows past the training length.

What RetNet is for: the student keeps a constant-size recurrent state, the teacher's KV cache grows
with the context. Three measurements, for every model on the same tokens:

- :func:`long_context_perplexity`: contexts of ``m x`` the training length ``T`` (``m`` in 1, 2, 4, 8),
  cut from one stream of held-out tokens (documents concatenated with their EOS, positions
  0 .. L-1 with no restart, so a context really is L tokens long for both models). Reported: the
  mean next-token NLL of each context length, and, on the longest contexts, the NLL per position
  bucket ``[0, T/2), [T/2, T), [T, 2T), [2T, 4T), [4T, 8T)`` (positions past ``T`` were never
  trained on). Scores shift once: the output at position t is scored against token t + 1.
- :func:`generation_cost`: for each length L, prefill L tokens, then greedy decode steps one token
  at a time through the model's own cache; reported: the cache's bytes after the prefill (KV
  tensors for the teacher, the retention state for the student) and the milliseconds per decoded
  token (median of the steps after two warm-up ones).
- :func:`plot_long_context`: one PNG, three panels: NLL by position bucket, NLL by context length,
  cache MB and ms/token by context length (teacher and students side by side).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from distill_dag.eval.plots import STYLES, figsize, plot_lines, pyplot, save_png
from distill_dag.loss.perplexity import _accepts, split_loader

MULTIPLES = (1, 2, 4, 8)


def token_stream(data_dir: str | Path, split: str, max_tokens: int, exclude: Any = None) -> list[int]:
    """Up to ``max_tokens`` token ids of a tokenized split in order (padding dropped, EOS kept).

    ``exclude(doc_ids) -> bool`` drops a document (e.g. the synthetic retrieval documents)."""
    out: list[int] = []
    doc: list[int] = []
    for batch in split_loader(data_dir, split, batch_size=64):
        for ids, pos, mask in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(),
                                  batch["attention_mask"].tolist()):
            for t, p, m in zip(ids, pos, mask):
                if not m:
                    continue
                if p == 0 and doc:
                    if exclude is None or not exclude(doc):
                        out.extend(doc)
                    doc = []
                doc.append(t)
        if len(out) >= max_tokens:
            return out[:max_tokens]
    if doc and (exclude is None or not exclude(doc)):
        out.extend(doc)
    return out[:max_tokens]


def _call(model: Any, input_ids: torch.Tensor) -> Any:
    """Forward a whole context (positions 0..L-1, no cache)."""
    if isinstance(model, tuple):  # (the peft switch, the adapted model): the base weights
        with model[1].disable_adapter():
            return model[1](input_ids=input_ids, use_cache=False)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
    return model(input_ids=input_ids, position_ids=pos, use_cache=False)


def _module(model: Any) -> torch.nn.Module:
    return model[1] if isinstance(model, tuple) else model


def bucket_edges(train_len: int, max_len: int) -> list[int]:
    """``[0, T/2, T, 2T, 4T, ...]`` up to ``max_len``."""
    edges = [0, max(1, train_len // 2), train_len]
    while edges[-1] < max_len:
        edges.append(min(max_len, edges[-1] * 2))
    return edges


@torch.no_grad()
def long_context_perplexity(
    models: dict[str, Any],
    tokens: Sequence[int],
    train_len: int,
    *,
    multiples: Sequence[int] = MULTIPLES,
    contexts: int = 4,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """NLL (nats/token) by context length and, on the longest contexts, by position bucket.

    ``contexts`` windows of each length are cut from ``tokens`` (consecutive, wrapping when short).
    Returns ``{"lengths": [...], "by_length": {model: [nats per length]}, "bucket_edges": [...],
    "by_position": {model: [nats per bucket]}, "contexts": n, "tokens": stream length}``.
    """
    if len(tokens) < 2:
        raise ValueError("long-context perplexity: the token stream is empty")
    lengths = [m * train_len for m in multiples]
    max_len = max(lengths)
    edges = bucket_edges(train_len, max_len)
    stream = torch.tensor(list(tokens), dtype=torch.long)

    def windows(L: int) -> torch.Tensor:
        rows = []
        for i in range(contexts):
            idx = (torch.arange(L) + i * L) % len(stream)
            rows.append(stream[idx])
        return torch.stack(rows)

    by_length: dict[str, list[float]] = {}
    by_position: dict[str, list[float]] = {}
    for name, model in models.items():
        mod = _module(model)
        was = mod.training
        mod.eval()
        try:
            by_length[name] = []
            for L in lengths:
                x = windows(L).to(device)
                nll_sum, n = 0.0, 0
                per_pos = torch.zeros(L - 1, dtype=torch.float64)
                for b in range(x.shape[0]):  # one context at a time: [L, V] logits only
                    logits = _call(model, x[b : b + 1]).logits[0, :-1].float()
                    nll = F.cross_entropy(logits, x[b, 1:], reduction="none").double().cpu()
                    per_pos += nll
                    nll_sum += float(nll.sum())
                    n += nll.numel()
                by_length[name].append(nll_sum / n)
                if L == max_len:
                    per_pos /= x.shape[0]
                    # the output at position t predicts token t + 1: bucket by the predicted token's position
                    by_position[name] = [float(per_pos[max(lo - 1, 0) : hi - 1].mean())
                                         for lo, hi in zip(edges[:-1], edges[1:])]
        finally:
            mod.train(was)
    return {"lengths": lengths, "train_len": train_len, "by_length": by_length, "bucket_edges": edges,
            "by_position": by_position, "contexts": contexts, "tokens": len(tokens)}


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor reachable from a generation cache (KV tensors, recurrent states)."""
    seen: set[int] = set()
    total = 0

    def walk(o: Any, depth: int) -> None:
        nonlocal total
        if depth > 6 or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__") and not isinstance(o, (torch.nn.Module, type)):
            for v in vars(o).values():
                walk(v, depth + 1)

    walk(cache, 0)
    return total


def _cache_of(out: Any) -> Any:
    c = getattr(out, "past_key_values", None)
    return c if c is not None else getattr(out, "cache", None)


@torch.no_grad()
def generation_cost(
    model: Any,
    tokens: Sequence[int],
    lengths: Sequence[int],
    *,
    new_tokens: int = 16,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Per length L: ``{"context_length", "cache_bytes", "ms_per_token", "prefill_ms"}``.

    Prefill of L tokens of ``tokens`` (one sequence), then ``new_tokens`` greedy steps of one token
    each through the returned cache; ms/token is the median step after two warm-up steps."""
    mod = _module(model)
    was = mod.training
    mod.eval()
    rows = []
    try:
        stream = torch.tensor(list(tokens), dtype=torch.long)
        for L in lengths:
            x = stream[torch.arange(L) % len(stream)][None].to(device)
            t0 = time.perf_counter()
            out = mod(input_ids=x, use_cache=True)
            prefill = time.perf_counter() - t0
            cache = _cache_of(out)
            if cache is None:
                raise RuntimeError(f"{type(mod).__name__} returned no cache with use_cache=True")
            size = cache_bytes(cache)
            nxt = out.logits[:, -1:].argmax(-1)
            key = "cache" if _accepts(mod, "cache") else "past_key_values"  # transformers 5 renamed it
            steps = []
            for _ in range(new_tokens + 2):
                t0 = time.perf_counter()
                out = mod(input_ids=nxt, use_cache=True, **{key: cache})
                steps.append(time.perf_counter() - t0)
                cache = _cache_of(out) or cache
                nxt = out.logits[:, -1:].argmax(-1)
            rows.append({"context_length": L, "cache_bytes": size, "cache_bytes_end": cache_bytes(cache),
                         "ms_per_token": 1000 * statistics.median(steps[2:]), "prefill_ms": 1000 * prefill})
    finally:
        mod.train(was)
    return rows


def markdown(ppl: dict[str, Any], cost: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """Tables: NLL (ppl) by context length, NLL by position bucket, cache MB and ms/token by length."""
    T = ppl["train_len"]
    lens = ppl["lengths"]
    lines = ["NLL in nats/token (ppl in brackets) by context length "
             f"(training length {T}; {ppl['contexts']} contexts per length):", "",
             "| model | " + " | ".join(f"{L} ({L // T}x)" for L in lens) + " |", "|---|" + "---:|" * len(lens)]
    for name, vals in ppl["by_length"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f} ({math.exp(v):.1f})" for v in vals) + " |")
    e = ppl["bucket_edges"]
    lines += ["", f"NLL by position on the {lens[-1]}-token contexts:", "",
              "| model | " + " | ".join(f"{lo}-{hi}" for lo, hi in zip(e[:-1], e[1:])) + " |",
              "|---|" + "---:|" * (len(e) - 1)]
    for name, vals in ppl["by_position"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    if cost:
        first = next(iter(cost.values()))
        cl = [r["context_length"] for r in first]
        lines += ["", "Generation: cache size after the prefill (MB) / ms per decoded token, by context length:", "",
                  "| model | " + " | ".join(str(L) for L in cl) + " |", "|---|" + "---:|" * len(cl)]
        for name, rows in cost.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['cache_bytes'] / 2**20:.3f} MB / {r['ms_per_token']:.2f} ms"
                                                     for r in rows) + " |")
    return "\n".join(lines)


def plot_long_context(ppl: dict[str, Any], cost: dict[str, list[dict[str, Any]]] | None, path: str | Path) -> Path:
    """One PNG: NLL by position bucket, NLL by context length, and (with ``cost``) cache MB and ms/token."""
    plt = pyplot()
    n = 3 if cost else 2
    fig, axes = plt.subplots(1, n, figsize=figsize(3.3 * n, 3.4))  # <= ~1000 px: the UI pop-up is 1280 px
    T = ppl["train_len"]
    e = ppl["bucket_edges"]
    mids = [(lo + hi) / 2 for lo, hi in zip(e[:-1], e[1:])]
    plot_lines(axes[0], {name: list(zip(mids, vals)) for name, vals in ppl["by_position"].items()})
    axes[0].set_xscale("log", base=2)
    axes[0].axvline(T, color="gray", ls=":", lw=1)
    axes[0].set_xlabel(f"position in a {ppl['lengths'][-1]}-token context (bucket middle)")
    axes[0].set_ylabel("nats/token")
    axes[0].set_title("NLL by position (dotted: training length)")
    plot_lines(axes[1], {name: list(zip(ppl["lengths"], vals)) for name, vals in ppl["by_length"].items()})
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(ppl["lengths"], [f"{L // T}x" for L in ppl["lengths"]])
    axes[1].set_xlabel(f"context length (x training length {T})")
    axes[1].set_title("mean NLL by context length")
    axes[1].legend(fontsize=7)
    if cost:
        ax, ax2 = axes[2], axes[2].twinx()
        n_models = max(len(cost), 1)
        for i, (name, rows) in enumerate(cost.items()):
            xs = [r["context_length"] for r in rows]
            # models with equal caches (two RetNets) overlap exactly: shift each a little along x (log scale)
            # and give it its own marker, so the one drawn first does not hide under the other
            shift = 2 ** (0.06 * (i - (n_models - 1) / 2))
            mk = STYLES[i % len(STYLES)]["marker"]
            ax.plot([x * shift for x in xs], [r["cache_bytes"] / 2**20 for r in rows], ls="-", marker=mk,
                    color=f"C{i}", label=f"{name}: cache MB", alpha=0.85)
            ax2.plot([x * shift for x in xs], [r["ms_per_token"] for r in rows], ls="--", marker=mk, mfc="none",
                     color=f"C{i}", label=f"{name}: ms/token", alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("cache after prefill (MB, solid)")
        ax2.set_ylabel("ms per decoded token (dashed)")
        ax.set_title("generation memory and latency", fontsize=9)
        # one legend for both axes: the dashed latency lines get their entries too
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        # below the panel, not over it: with four models the 8 entries covered the latency lines
        ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                  frameon=False)
    fig.tight_layout()
    return save_png(fig, path)
