"""Checkpoint evaluation: perplexity table, needle-in-a-haystack, sample generations, a markdown report.

:func:`evaluate_checkpoint` evaluates one student checkpoint (with the teacher and a CE-only
baseline beside it when given) and writes into ``out_dir``:

- ``report.md``: the tables, the heat-map and the samples, readable on its own;
- ``perplexity.json``, ``niah.json`` (every case with its generation), ``samples.json``;
- ``niah_heatmap.png`` (and ``niah_heatmap_teacher.png``), ``loss_curves.png`` when the run's
  ``metrics.jsonl`` is found;
- ``eval.json``: the returned summary (paths and numbers, ready for asset metadata).

:func:`evaluate_run` does the same for a configured run (the ``eval_report`` asset, ``distill eval``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from distill_dag.config import PipelineConfig
from distill_dag.io import atomic_path, write_bytes_atomic, write_json_atomic


def _load_causal_lm(path: Path, device: torch.device) -> torch.nn.Module:
    import distill_dag  # noqa: F401  - registers the RetNet student with the Auto classes
    from transformers import AutoModelForCausalLM

    from distill_dag.distill.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model (give a checkpoint or a run dir)")
    return AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()


def teacher_models(cfg: PipelineConfig, teacher: Any, device: torch.device) -> dict[str, Any]:
    """``{"teacher (base)": ..., "teacher (adapted)": ...}`` from a teacher_ft output dir, a model dir, an
    adapter dir or a module. A LoRA teacher is loaded once: its base row runs with the adapter disabled."""
    from distill_dag.distill.teacher_model import build_tiny_teacher, load_teacher

    if isinstance(teacher, torch.nn.Module):
        return {"teacher": teacher.to(device).eval()}
    t = Path(teacher)
    if (t / "final_adapter").is_dir():
        t = t / "final_adapter"
    elif (t / "final_model").is_dir():
        t = t / "final_model"
    if (t / "adapter_config.json").exists():
        adapted = load_teacher(cfg.teacher, device, adapter_path=t)
        return {"teacher (base)": ("disable_adapter", adapted), "teacher (adapted)": adapted}
    if not (t / "config.json").exists():
        raise FileNotFoundError(f"teacher {teacher}: no final_model/, final_adapter/, config.json or adapter_config.json")
    out: dict[str, Any] = {}
    if cfg.teacher.model_name_or_path is None and cfg.teacher.init_tiny:
        # the demo teacher starts as a seeded random init: rebuilt exactly, it is the "before" row
        vocab = json.loads((t / "config.json").read_text())["vocab_size"]
        out["teacher (base)"] = build_tiny_teacher(vocab, cfg.teacher.init_tiny, seed=cfg.teacher_ft.seed).to(device).eval()
    out["teacher (adapted)"] = load_teacher(cfg.teacher, device, model_path=t)
    return out


def _ppl_rows(models: dict[str, Any], batches: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, Any]]:
    from distill_dag.eval.perplexity import perplexity

    rows = []
    for name, m in models.items():
        if isinstance(m, tuple):  # (the peft switch, the adapted model): score the base weights
            with m[1].disable_adapter():
                r = perplexity(m[1], batches, device=device)
        else:
            r = perplexity(m, batches, device=device)
        rows.append({"model": name, **r})
    return rows


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


def _one_line(s: str, limit: int = 160) -> str:
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def loss_curves_png(metrics_jsonl: Path, path: Path) -> Path | None:
    """Loss curves (every numeric ``*loss*`` series of train and eval rows) from a run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_jsonl.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if "step" not in row or "event" in row:
            continue
        for k, v in row.items():
            if "loss" in k and isinstance(v, (int, float)):
                series.setdefault(f"{row.get('kind', 'train')}/{k}", []).append((row["step"], float(v)))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, pts in sorted(series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=name, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("nats/token")
    ax.set_title(f"loss curves ({metrics_jsonl.parent.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _find_metrics(checkpoint: Path) -> Path | None:
    for d in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (d / "metrics.jsonl").exists():
            return d / "metrics.jsonl"
    return None


def evaluate_checkpoint(
    checkpoint_dir: str | Path | torch.nn.Module,
    cfg: PipelineConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    teacher: Any = None,
    baseline: Any = None,
    tokenizer_dir: str | Path | None = None,
    split: str | None = None,
    niah: bool | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Evaluate a student checkpoint (a dir, a run dir with ``checkpoint_latest``, or a loaded model).

    ``teacher``: a teacher_ft output dir / model dir / adapter dir / module (rows "teacher (base)" and
    "teacher (adapted)"); ``baseline``: a CE-only student (checkpoint dir or module). Settings from
    ``cfg.eval`` (``split`` and ``niah`` override it). Returns paths and numbers (see module doc).
    """
    from itertools import islice

    from distill_dag.data.tokenizer import load_tokenizer
    from distill_dag.device import pick_device
    from distill_dag.eval.niah import evaluate_niah, haystack_from_split, stdlib_haystack
    from distill_dag.eval.perplexity import split_loader, table_markdown

    ec = cfg.eval
    split = split or ec.split
    do_niah = ec.niah if niah is None else niah
    dev = torch.device(device) if isinstance(device, torch.device) else pick_device(device or cfg.train.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir or cfg.tokenizer_dir)

    if isinstance(checkpoint_dir, torch.nn.Module):
        student, ckpt_path = checkpoint_dir.to(dev).eval(), None
    else:
        from distill_dag.distill.checkpoint import resolve_checkpoint

        ckpt_path = resolve_checkpoint(checkpoint_dir)
        student = _load_causal_lm(ckpt_path, dev)
    models: dict[str, Any] = {"student": student}
    if baseline is not None:
        models["CE-only baseline"] = (baseline.to(dev).eval() if isinstance(baseline, torch.nn.Module)
                                      else _load_causal_lm(Path(baseline), dev))
    teachers = teacher_models(cfg, teacher, dev) if teacher is not None else {}
    models.update(teachers)

    limit = ec.max_batches if ec.max_batches > 0 else None
    batches = list(islice(split_loader(data_dir, split, ec.batch_size), limit))
    log(f"eval: perplexity of {list(models)} on {len(batches)} '{split}' batches")
    ppl_rows = _ppl_rows(models, batches, dev)
    write_json_atomic(out / "perplexity.json", ppl_rows)

    result: dict[str, Any] = {
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "split": split,
        "perplexity_rows": ppl_rows,
        "student_ppl": ppl_rows[0]["ppl"],
        "student_nats_per_token": ppl_rows[0]["nats_per_token"],
        "out_dir": str(out),
        "niah_png": None,
        "niah_accuracy": None,
        "loss_png": None,
    }
    for r in ppl_rows[1:]:
        result[f"{r['model']}_ppl".replace(" ", "_").replace("(", "").replace(")", "").replace("-", "_")] = r["ppl"]

    niah_sections: list[str] = []
    if do_niah:
        max_len = max(ec.niah_context_lengths)
        hay_text = haystack_from_split(tokenizer, data_dir, split, max_tokens=max(4 * max_len, 20_000))
        source = f"the '{split}' split, decoded"
        if len(tokenizer(hay_text, add_special_tokens=False)["input_ids"]) < 2 * max_len:
            hay_text, source = stdlib_haystack(), "standard-library docstrings (the split is too short)"
        kw = dict(context_lengths=ec.niah_context_lengths, depths=ec.niah_depths, trials=ec.niah_trials,
                  max_new_tokens=ec.niah_max_new_tokens, batch_size=ec.batch_size, seed=ec.seed)
        log(f"eval: needle-in-a-haystack, {len(ec.niah_context_lengths)} lengths x {len(ec.niah_depths)} depths x "
            f"{ec.niah_trials} trials, haystack from {source}")
        r = evaluate_niah(student, tokenizer, hay_text, heatmap_path=out / "niah_heatmap.png",
                          title="student: pass-key accuracy", **kw)
        niah_json = {"haystack": source, "student": r}
        result.update(niah_png=r["heatmap_path"], niah_accuracy=r["accuracy"], niah_grid=r["grid"],
                      niah_table=r["table_markdown"])
        niah_sections.append(f"### student (accuracy {r['accuracy']:.2f})\n\n{r['table_markdown']}\n\n"
                             f"![student NIAH](niah_heatmap.png)\n")
        adapted = teachers.get("teacher (adapted)") or teachers.get("teacher")
        if adapted is not None:
            rt = evaluate_niah(adapted, tokenizer, hay_text, heatmap_path=out / "niah_heatmap_teacher.png",
                               title="teacher: pass-key accuracy", **kw)
            niah_json["teacher"] = rt
            result.update(niah_teacher_png=rt["heatmap_path"], niah_teacher_accuracy=rt["accuracy"])
            niah_sections.append(f"### teacher (adapted) (accuracy {rt['accuracy']:.2f})\n\n{rt['table_markdown']}\n\n"
                                 f"![teacher NIAH](niah_heatmap_teacher.png)\n")
        write_json_atomic(out / "niah.json", niah_json)

    # prompts start documents; the whole split is scanned lazily until enough documents are found
    samples = sample_generations(student, tokenizer, split_loader(data_dir, split, ec.batch_size), n=ec.sample_prompts,
                                 prompt_tokens=ec.sample_prompt_tokens, max_new_tokens=ec.max_new_tokens)
    write_json_atomic(out / "samples.json", samples)
    result["samples"] = [{k: _one_line(v) for k, v in s.items()} for s in samples]

    metrics_file = _find_metrics(ckpt_path) if ckpt_path else None
    if metrics_file is not None:
        p = loss_curves_png(metrics_file, out / "loss_curves.png")
        result["loss_png"] = str(p) if p else None

    lines = [
        "# Evaluation report",
        "",
        f"- checkpoint: `{result['checkpoint'] or 'in-memory model'}`",
        f"- data: `{data_dir}` split `{split}`, {ppl_rows[0]['tokens']} scored tokens "
        "(labels unshifted; position t scored against label t+1)",
        "",
        "## Perplexity",
        "",
        table_markdown(ppl_rows),
        "",
    ]
    if niah_sections:
        lines += ["## Needle in a haystack", "",
                  f"Needle \"The pass key is NNNNN.\" in {niah_json['haystack']}; greedy generation, exact match of "
                  "the digits. Rows: depth of the needle; columns: context length in tokens.", ""]
        lines += niah_sections
    if result["loss_png"]:
        lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    lines += ["## Sample generations (greedy, held-out prompts)", ""]
    for i, s in enumerate(samples, 1):
        lines += [f"### sample {i}", "", "prompt:", "```", s["prompt"], "```", "generated:", "```", s["generated"],
                  "```", "reference:", "```", s["reference"], "```", ""]
    report = out / "report.md"
    write_bytes_atomic(report, "\n".join(lines).encode())
    result["report_path"] = str(report)
    write_json_atomic(out / "eval.json", result)
    log(f"eval: student ppl {result['student_ppl']:.3f}"
        + (f", NIAH accuracy {result['niah_accuracy']:.2f}" if result["niah_accuracy"] is not None else "")
        + f"; report {report}")
    return result


def evaluate_run(
    cfg: PipelineConfig,
    *,
    checkpoint: str | Path | None = None,
    split: str | None = None,
    niah: bool | None = None,
    out_dir: str | Path | None = None,
    teacher: Any = "auto",
    baseline: Any = "auto",
    device: str | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Evaluate the configured run: ``<run_dir>/final`` (or ``checkpoint``), the finetuned teacher of
    ``teacher_ft.output_dir`` and the CE-only baseline ``<run_dir>_ce_only/final`` when they exist."""
    ckpt = Path(checkpoint) if checkpoint is not None else cfg.run_dir / "final"
    if teacher == "auto":
        t = cfg.teacher_ft_dir
        teacher = t if (t / "final_model").is_dir() or (t / "final_adapter").is_dir() else None
        if teacher is None and cfg.teacher.model_name_or_path:
            teacher = cfg.teacher.adapter_path or None
    if baseline == "auto":
        b = Path(str(cfg.run_dir) + "_ce_only") / "final"
        baseline = b if b.is_dir() else None
    out = Path(out_dir) if out_dir is not None else (cfg.path(cfg.eval.output_dir) if cfg.eval.output_dir
                                                     else cfg.run_dir / "eval")
    result = evaluate_checkpoint(ckpt, cfg, cfg.tokenized_dir, out, teacher=teacher, baseline=baseline,
                                 split=split, niah=niah, device=device, log=log)
    from distill_dag.model.hub import add_eval_to_model_card  # the student's model card gets the tables

    add_eval_to_model_card(result["checkpoint"], result)
    return result
