"""The measurements of a checkpoint evaluation (:func:`distill_dag.eval.report.evaluate_checkpoint`): they run
the models and return numbers and generations; they write no file and render nothing
(:mod:`distill_dag.eval.render` does).

- :func:`perplexity_rows`: one row per model on the same held-out batches;
- :func:`measure_niah`: needle-in-a-haystack for every compared model, with the accuracy at, within and
  beyond the training length;
- :func:`measure_long_context`: perplexity by position and context length, and the generation cost;
- :func:`sample_generations` / :func:`samples`: greedy continuations of held-out prompts.
"""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from distill_dag.config import EvalConfig
from distill_dag.eval.long_context import generation_cost, long_context_perplexity, token_stream
from distill_dag.eval.niah import evaluate_niah, haystack_for, is_retrieval_doc
from distill_dag.loss.perplexity import perplexity, split_loader
from distill_dag.training.telemetry import progress

STUDENTS = ("student", "CE-only baseline", "converted student", "hybrid student")


def perplexity_rows(models: dict[str, Any], batches: list[dict[str, torch.Tensor]],
                    device: torch.device) -> list[dict[str, Any]]:
    """``[{"model": name, **perplexity}]`` in the order of ``models``; a ``(peft switch, adapted model)`` entry
    is scored with its adapter disabled (the base weights)."""
    rows = []
    for name, m in progress(list(models.items()), total=len(models), desc="eval perplexity (models)"):
        if isinstance(m, tuple):  # (the peft switch, the adapted model): score the base weights
            with m[1].disable_adapter():
                r = perplexity(m[1], batches, device=device)
        else:
            r = perplexity(m, batches, device=device)
        rows.append({"model": name, **r})
    return rows


def eval_batches(data_dir: str | Path, split: str, ec: EvalConfig) -> list[dict[str, torch.Tensor]]:
    """The held-out batches every model's perplexity is measured on (``eval.max_batches`` of them, 0: all)."""
    limit = ec.max_batches if ec.max_batches > 0 else None
    return list(islice(split_loader(data_dir, split, ec.batch_size), limit))


def _share(xs: list[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def measure_niah(compared: dict[str, Any], tokenizer: Any, data_dir: str | Path, split: str, ec: EvalConfig,
                 train_len: int, log: Callable[[str], Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Needle in a haystack for each model of ``compared`` (``eval.niah_*`` settings). Returns ``(raw, per_model)``:
    ``raw`` is ``niah.json`` (the haystack's source, ``train_len`` and every model's full result), ``per_model``
    ``{model: {accuracy, grid, accuracy_at_train_len, accuracy_within_train_len, accuracy_beyond_train_len}}``."""
    lengths, depths = list(ec.niah_context_lengths), list(ec.niah_depths)
    hay_text, source = haystack_for(tokenizer, data_dir, split, max(lengths))
    kw = dict(context_lengths=lengths, depths=depths, trials=ec.niah_trials,
              max_new_tokens=ec.niah_max_new_tokens, batch_size=ec.batch_size, seed=ec.seed)
    log(f"eval: needle-in-a-haystack for {list(compared)}, {len(lengths)} lengths x {len(depths)} depths x "
        f"{ec.niah_trials} trials, haystack from {source}")
    raw: dict[str, Any] = {"haystack": source, "train_len": train_len}
    per_model: dict[str, dict[str, Any]] = {}
    for i, (name, m) in enumerate(compared.items(), 1):
        t0 = time.perf_counter()  # a phase of minutes on a real model: say which model it is on
        log(f"eval: needle-in-a-haystack {i}/{len(compared)}: {name} ...")
        r = evaluate_niah(m, tokenizer, hay_text, **kw)
        log(f"eval: needle-in-a-haystack {i}/{len(compared)}: {name} accuracy {r['accuracy']:.2f} "
            f"({time.perf_counter() - t0:.1f} s)")
        raw[name] = r
        res = r["results"]
        per_model[name] = {"accuracy": r["accuracy"], "grid": r["grid"],
                           "accuracy_at_train_len": _share([x["correct"] for x in res if x["context_length"] == train_len]),
                           "accuracy_within_train_len": _share([x["correct"] for x in res
                                                                if x["context_length"] <= train_len]),
                           "accuracy_beyond_train_len": _share([x["correct"] for x in res
                                                                if x["context_length"] > train_len])}
    return raw, per_model


def measure_long_context(compared: dict[str, Any], tokenizer: Any, data_dir: str | Path, split: str, train_len: int,
                         multiples: Sequence[int], contexts: int, device: torch.device,
                         log: Callable[[str], Any]) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Perplexity by position and context length at ``multiples`` x ``train_len`` (``contexts`` held-out contexts
    each), then each model's generation cost at those lengths. Returns ``(perplexity, cost)``."""
    lens = [m * train_len for m in multiples]
    stream = token_stream(data_dir, split, max(lens) * contexts,
                          exclude=lambda ids: is_retrieval_doc(tokenizer.decode(ids)))
    if len(stream) < 2 * train_len:  # a tiny val split: the train split has the text
        stream = token_stream(data_dir, "train", max(lens) * contexts)
    log(f"eval: long context for {list(compared)} at {lens} tokens ({contexts} contexts each, "
        f"{len(stream)} held-out tokens)")
    t0 = time.perf_counter()
    lc = long_context_perplexity(compared, stream, train_len, multiples=multiples, contexts=contexts, device=device)
    log(f"eval: long context: perplexity by position done ({time.perf_counter() - t0:.1f} s); generation cost "
        f"of {len(compared)} model(s) at {lens} tokens ...")
    cost = {}
    for i, (n, m) in enumerate(compared.items(), 1):
        t0 = time.perf_counter()
        cost[n] = generation_cost(m, stream, lens, device=device)
        log(f"eval: long context {i}/{len(compared)}: {n} generation cost measured ({time.perf_counter() - t0:.1f} s)")
    return lc, cost


@torch.no_grad()
def sample_generations(
    model: torch.nn.Module,
    tokenizer: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    n: int,
    prompt_tokens: int,
    max_new_tokens: int,
) -> list[dict[str, str]]:
    """Greedy continuations of the first ``prompt_tokens`` of ``n`` held-out documents (one per row),
    with the document's real continuation as the reference."""
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[dict[str, str]] = []
    if n <= 0:
        return out
    for b in batches:
        for ids, pos, mask in zip(b["input_ids"], b["position_ids"], b["attention_mask"]):
            width = int(mask.sum())
            starts = [t for t in (pos[:width] == 0).nonzero().flatten().tolist()]
            for s in starts:
                end = s + 1
                while end < width and pos[end] != 0:
                    end += 1
                if end - s < prompt_tokens + 4:
                    continue
                prompt = ids[s : s + prompt_tokens]
                ref = ids[s + prompt_tokens : min(end, s + prompt_tokens + max_new_tokens)]
                x = prompt[None].to(dev)
                g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                   do_sample=False, num_beams=1, pad_token_id=pad)
                out.append({
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                    "generated": tokenizer.decode(g[0, x.shape[1]:], skip_special_tokens=True),
                    "reference": tokenizer.decode(ref, skip_special_tokens=True),
                })
                if len(out) >= n:
                    return out
                break  # one prompt per row: spread the samples over documents
    return out


def samples(models: dict[str, Any], tokenizer: Any, data_dir: str | Path, split: str,
            ec: EvalConfig) -> list[dict[str, str]]:
    """The student's sample generations; with a hybrid student, its continuation of the same prompts beside
    (``hybrid generated``), so the two read side by side."""
    def generate(model: torch.nn.Module) -> list[dict[str, str]]:
        # prompts start documents; the whole split is scanned lazily until enough documents are found
        return sample_generations(model, tokenizer, split_loader(data_dir, split, ec.batch_size), n=ec.sample_prompts,
                                  prompt_tokens=ec.sample_prompt_tokens, max_new_tokens=ec.max_new_tokens)

    out = generate(models["student"])
    if "hybrid student" in models:
        for s, h in zip(out, generate(models["hybrid student"])):
            s["hybrid generated"] = h["generated"]
    return out
