"""Checkpoint evaluation: perplexity table, needle-in-a-haystack, sample generations, a markdown report.

:func:`evaluate_checkpoint` evaluates one student checkpoint (with the teacher and a CE-only
baseline beside it when given) and writes into ``out_dir``:

- ``report.md``: the tables, the heat-map and the samples, readable on its own;
- ``perplexity.json``, ``niah.json`` (every case with its generation), ``samples.json``;
- ``niah_heatmap.png`` (and ``niah_heatmap_teacher.png``), ``loss_curves.png`` when the run's
  ``metrics.jsonl`` is found;
- ``eval.json``: the returned summary (paths and numbers, ready for asset metadata);
- ``long_context.json`` / ``long_context.png``: perplexity by position and context length, generation
  memory and ms/token (:mod:`distill_dag.eval.long_context`).

:func:`evaluate_run` does the same for a configured run (the ``eval_report`` asset, ``distill eval``).

The compared models: ``student`` (the KD student), ``CE-only baseline``, ``converted student`` (when
given) and ``teacher (adapted)`` (or ``teacher``). Keys of the returned dict:

- ``checkpoint``, ``split``, ``out_dir``, ``report_path``, ``loss_png``, ``samples``;
- ``perplexity_rows`` (one row per model), ``student_ppl``, ``student_nats_per_token``, ``<model>_ppl``;
- NIAH (None/absent without NIAH): ``niah_png`` (every model's heat-map side by side, and under each
  student its per-cell ratio to the teacher), ``niah_accuracy`` (the student's), ``niah_grid``,
  ``niah_table``, ``niah_teacher_accuracy``, ``niah_models`` ({model: {accuracy, grid,
  accuracy_at_train_len, accuracy_within_train_len, accuracy_beyond_train_len}}), ``niah_ratio_grids``
  ({student: grid of student/teacher}), ``niah_comparison_table`` (markdown), ``niah_context_lengths``,
  ``niah_depths``, ``niah_train_len``;
- long context (absent with ``long_context=False``): ``long_context_png``, ``long_context_table``
  (markdown), ``long_context_ppl`` ({lengths, train_len, by_length: {model: [nats]}, bucket_edges,
  by_position: {model: [nats]}, contexts, tokens}), ``generation_cost`` ({model: [{context_length,
  cache_bytes, cache_bytes_end, ms_per_token, prefill_ms}]}).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from distill_dag.config import PipelineConfig
from distill_dag.eval.plots import pyplot, save_png
from distill_dag.io import write_bytes_atomic, write_json_atomic


def _load_causal_lm(path: Path, device: torch.device) -> torch.nn.Module:
    import distill_dag  # noqa: F401  - registers the RetNet student with the Auto classes
    from transformers import AutoModelForCausalLM

    from distill_dag.training.checkpoint import resolve_checkpoint, verify_checkpoint

    path = resolve_checkpoint(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model (give a checkpoint or a run dir)")
    from distill_dag.model.variants import check_saved_model

    check_saved_model(path)  # before hashing or loading: no endless file, no 10M-layer config.json
    if (path / "checksums.json").exists():  # our checkpoints: a truncated or corrupt file is named before loading
        verify_checkpoint(path)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    except (OSError, ValueError, RuntimeError) as err:  # safetensors' SafetensorError is an Exception subclass
        raise RuntimeError(f"{path}: cannot load the model ({type(err).__name__}: {err}); re-save it or pick "
                           "another checkpoint") from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise RuntimeError(f"{path / 'model.safetensors'}: not a readable safetensors file ({err}); re-save it or "
                           "pick another checkpoint") from err


def teacher_models(cfg: PipelineConfig, teacher: Any, device: torch.device) -> dict[str, Any]:
    """``{"teacher (base)": ..., "teacher (adapted)": ...}`` from a teacher_ft output dir, a model dir, an
    adapter dir or a module. A LoRA teacher is loaded once: its base row runs with the adapter disabled."""
    from distill_dag.teacher.model import build_tiny_teacher, load_teacher

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
    from distill_dag.model.variants import check_saved_model

    saved = check_saved_model(t)  # the same bounds as a student's: no endless file, no 10M-layer config.json
    out: dict[str, Any] = {}
    if cfg.teacher.model_name_or_path is None and cfg.teacher.init_tiny:
        # the demo teacher starts as a seeded random init: rebuilt exactly, it is the "before" row
        vocab = saved["vocab_size"]
        out["teacher (base)"] = build_tiny_teacher(vocab, cfg.teacher.init_tiny, seed=cfg.teacher_ft.seed).to(device).eval()
    out["teacher (adapted)"] = load_teacher(cfg.teacher, device, model_path=t)
    return out


def _ppl_rows(models: dict[str, Any], batches: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, Any]]:
    from distill_dag.loss.perplexity import perplexity

    from distill_dag.training.telemetry import progress

    rows = []
    for name, m in progress(list(models.items()), total=len(models), desc="eval perplexity (models)"):
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
    """Loss curves from a run's metrics.jsonl, like beside like: train CE, held-out CE and the KD term (KL)
    each on its own axis. ``train/loss`` (the KD objective, a mix of CE and KL) is never drawn beside a CE:
    on one axis it suggested a train/val gap that does not exist."""
    from distill_dag.eval.plots import panels_png, read_history, training_panels

    history = read_history(metrics_jsonl)
    panels = [p for p in training_panels({"student": history}) if any(p[2].values())]
    if not panels:
        return None
    write_bytes_atomic(Path(path), panels_png(panels, width=3.3, height=3.0))
    return Path(path)


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
    converted: Any = None,
    hybrid: Any = None,
    tokenizer_dir: str | Path | None = None,
    split: str | None = None,
    niah: bool | None = None,
    long_context: bool | None = None,
    long_context_multiples: Sequence[int] | None = None,
    long_context_contexts: int | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Evaluate a student checkpoint (a dir, a run dir with ``checkpoint_latest``, or a loaded model).

    ``teacher``: a teacher_ft output dir / model dir / adapter dir / module (rows "teacher (base)" and
    "teacher (adapted)"); ``baseline``: a CE-only student (checkpoint dir or module); ``converted``: a
    student converted from the teacher (e.g. the aligned stage-1 student). Settings from ``cfg.eval``
    (``split`` and ``niah`` override it). ``long_context``: perplexity by position and context length
    at ``long_context_multiples`` x the training length (``tokenize.max_seq_length``), and generation
    memory / ms per token at each length. Returns paths and numbers (see module doc).
    """
    from itertools import islice

    from distill_dag.data.tokenizer import load_tokenizer
    from distill_dag.device import pick_device
    from distill_dag.eval.niah import evaluate_niah, haystack_from_split, stdlib_haystack
    from distill_dag.loss.perplexity import split_loader, table_markdown

    ec = cfg.eval
    split = split or ec.split
    do_niah = ec.niah if niah is None else niah
    long_context = ec.long_context if long_context is None else long_context
    long_context_multiples = tuple(long_context_multiples or ec.long_context_multiples)
    long_context_contexts = long_context_contexts or ec.long_context_contexts
    dev = torch.device(device) if isinstance(device, torch.device) else pick_device(device or cfg.train.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir or cfg.tokenizer_dir)

    if isinstance(checkpoint_dir, torch.nn.Module):
        student, ckpt_path = checkpoint_dir.to(dev).eval(), None
    else:
        from distill_dag.training.checkpoint import resolve_checkpoint

        ckpt_path = resolve_checkpoint(checkpoint_dir)
        student = _load_causal_lm(ckpt_path, dev)
    models: dict[str, Any] = {"student": student}
    if baseline is not None:
        models["CE-only baseline"] = (baseline.to(dev).eval() if isinstance(baseline, torch.nn.Module)
                                      else _load_causal_lm(Path(baseline), dev))
    if converted is not None:
        models["converted student"] = (converted.to(dev).eval() if isinstance(converted, torch.nn.Module)
                                       else _load_causal_lm(Path(converted), dev))
    if hybrid is not None:  # hybrid.enabled: the converted student that keeps some of the teacher's attention
        models["hybrid student"] = (hybrid.to(dev).eval() if isinstance(hybrid, torch.nn.Module)
                                    else _load_causal_lm(Path(hybrid), dev))
    teachers = teacher_models(cfg, teacher, dev) if teacher is not None else {}
    models.update(teachers)
    adapted = teachers.get("teacher (adapted)") or teachers.get("teacher")
    teacher_name = "teacher (adapted)" if "teacher (adapted)" in teachers else ("teacher" if adapted is not None else None)
    # the models compared by NIAH and long context: every student, then the trained teacher
    compared = {n: m for n, m in models.items()
                if n in ("student", "CE-only baseline", "converted student", "hybrid student")}
    if adapted is not None:
        compared[teacher_name] = adapted
    train_len = cfg.tokenize.max_seq_length

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
    niah_json: dict[str, Any] = {}
    if do_niah:
        from distill_dag.eval.niah import comparison_markdown, plot_heatmaps, ratio_grid

        max_len = max(ec.niah_context_lengths)
        hay_text = haystack_from_split(tokenizer, data_dir, split, max_tokens=max(4 * max_len, 20_000))
        source = f"the '{split}' split, decoded (synthetic retrieval documents left out)"
        if len(tokenizer(hay_text, add_special_tokens=False)["input_ids"]) < 2 * max_len:
            hay_text, source = stdlib_haystack(), "standard-library docstrings (the split is too short)"
        lengths, depths = list(ec.niah_context_lengths), list(ec.niah_depths)
        kw = dict(context_lengths=lengths, depths=depths, trials=ec.niah_trials,
                  max_new_tokens=ec.niah_max_new_tokens, batch_size=ec.batch_size, seed=ec.seed)
        log(f"eval: needle-in-a-haystack for {list(compared)}, {len(lengths)} lengths x {len(depths)} depths x "
            f"{ec.niah_trials} trials, haystack from {source}")
        niah_json = {"haystack": source, "train_len": train_len}
        per_model: dict[str, dict[str, Any]] = {}
        for i, (name, m) in enumerate(compared.items(), 1):
            t0 = time.perf_counter()  # a phase of minutes on a real model: say which model it is on
            log(f"eval: needle-in-a-haystack {i}/{len(compared)}: {name} ...")
            r = evaluate_niah(m, tokenizer, hay_text, **kw)
            log(f"eval: needle-in-a-haystack {i}/{len(compared)}: {name} accuracy {r['accuracy']:.2f} "
                f"({time.perf_counter() - t0:.1f} s)")
            niah_json[name] = r
            at = [r["results"][i]["correct"] for i in range(len(r["results"])) if r["results"][i]["context_length"] == train_len]
            beyond = [x["correct"] for x in r["results"] if x["context_length"] > train_len]
            within = [x["correct"] for x in r["results"] if x["context_length"] <= train_len]
            per_model[name] = {"accuracy": r["accuracy"], "grid": r["grid"],
                               "accuracy_at_train_len": sum(at) / len(at) if at else None,
                               "accuracy_within_train_len": sum(within) / len(within) if within else None,
                               "accuracy_beyond_train_len": sum(beyond) / len(beyond) if beyond else None}
        grids = {n: v["grid"] for n, v in per_model.items()}
        png = plot_heatmaps(grids, depths, lengths, out / "niah_heatmap.png", reference=teacher_name,
                            train_len=train_len, title="NIAH pass-key accuracy; bottom: ratio to the teacher per cell")
        ratios = {n: ratio_grid(g, grids[teacher_name]) for n, g in grids.items()
                  if teacher_name is not None and n != teacher_name}
        r = niah_json["student"]
        result.update(niah_png=str(png), niah_accuracy=r["accuracy"], niah_grid=r["grid"],
                      niah_table=r["table_markdown"], niah_models=per_model, niah_ratio_grids=ratios,
                      niah_context_lengths=lengths, niah_depths=depths, niah_train_len=train_len,
                      niah_comparison_table=comparison_markdown(grids, depths, lengths, teacher_name))
        result.update(niah_accuracy_at_train_len=per_model["student"]["accuracy_at_train_len"])
        if teacher_name is not None:
            result.update(niah_teacher_accuracy=per_model[teacher_name]["accuracy"],
                          niah_teacher_accuracy_at_train_len=per_model[teacher_name]["accuracy_at_train_len"])
        summary = ["| model | overall | at the training length (" + str(train_len) + ") | within | beyond |",
                   "|---|---:|---:|---:|---:|"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        for n, v in per_model.items():
            summary.append(f"| {n} | {v['accuracy']:.2f} | {fmt(v['accuracy_at_train_len'])} | "
                           f"{fmt(v['accuracy_within_train_len'])} | {fmt(v['accuracy_beyond_train_len'])} |")
        niah_sections += ["\n".join(summary), "", "![NIAH heat-maps](niah_heatmap.png)", "",
                          "Per cell: accuracy (ratio to the teacher's cell):", "", result["niah_comparison_table"], ""]
        write_json_atomic(out / "niah.json", niah_json)

    lc_sections: list[str] = []
    if long_context and compared:
        from distill_dag.eval.long_context import (generation_cost, long_context_perplexity, markdown,
                                                   plot_long_context, token_stream)
        from distill_dag.eval.niah import is_retrieval_doc

        lens = [m * train_len for m in long_context_multiples]
        stream = token_stream(data_dir, split, max(lens) * long_context_contexts,
                              exclude=lambda ids: is_retrieval_doc(tokenizer.decode(ids)))
        if len(stream) < 2 * train_len:  # a tiny val split: the train split has the text
            stream = token_stream(data_dir, "train", max(lens) * long_context_contexts)
        log(f"eval: long context for {list(compared)} at {lens} tokens ({long_context_contexts} contexts each, "
            f"{len(stream)} held-out tokens)")
        t0 = time.perf_counter()
        lc = long_context_perplexity(compared, stream, train_len, multiples=long_context_multiples,
                                     contexts=long_context_contexts, device=dev)
        log(f"eval: long context: perplexity by position done ({time.perf_counter() - t0:.1f} s); generation cost "
            f"of {len(compared)} model(s) at {lens} tokens ...")
        cost = {}
        for i, (n, m) in enumerate(compared.items(), 1):
            t0 = time.perf_counter()
            cost[n] = generation_cost(m, stream, lens, device=dev)
            log(f"eval: long context {i}/{len(compared)}: {n} generation cost measured ({time.perf_counter() - t0:.1f} s)")
        png = plot_long_context(lc, cost, out / "long_context.png")
        table = markdown(lc, cost)
        write_json_atomic(out / "long_context.json", {"perplexity": lc, "generation": cost})
        result.update(long_context_png=str(png), long_context_table=table, long_context_ppl=lc,
                      generation_cost=cost)
        lc_sections = [table, "", "![long context](long_context.png)", ""]

    from distill_dag.eval.harness import lm_eval_section  # the field's benchmarks, as a share of the teacher

    lm_eval_lines = lm_eval_section(
        cfg, compared, {"student": ckpt_path, "CE-only baseline": baseline, "converted student": converted,
                        "hybrid student": hybrid, teacher_name: teacher}, teacher_name=teacher_name, data_dir=data_dir, out_dir=out,
        tokenizer=tokenizer, tokenizer_dir=tokenizer_dir or cfg.tokenizer_dir, split=split, device=dev,
        result=result, log=log)

    # prompts start documents; the whole split is scanned lazily until enough documents are found
    samples = sample_generations(student, tokenizer, split_loader(data_dir, split, ec.batch_size), n=ec.sample_prompts,
                                 prompt_tokens=ec.sample_prompt_tokens, max_new_tokens=ec.max_new_tokens)
    if "hybrid student" in models:  # the same prompts, so the two read side by side
        hyb = sample_generations(models["hybrid student"], tokenizer, split_loader(data_dir, split, ec.batch_size),
                                 n=ec.sample_prompts, prompt_tokens=ec.sample_prompt_tokens,
                                 max_new_tokens=ec.max_new_tokens)
        for s, h in zip(samples, hyb):
            s["hybrid generated"] = h["generated"]
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
                  f"the digits. Rows: depth of the needle; columns: context length in tokens (training length "
                  f"{train_len}; `*` marks lengths beyond it).", ""]
        lines += niah_sections
    if lc_sections:
        lines += ["## Long context", "",
                  f"Contexts of 1x-{long_context_multiples[-1]}x the training length ({train_len}) cut from "
                  "held-out text (documents concatenated, positions 0..L-1). The student's recurrent state has "
                  "a fixed size; the teacher's KV cache grows with the context.", ""]
        lines += lc_sections
    lines += lm_eval_lines
    if result["loss_png"]:
        lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    lines += ["## Sample generations (greedy, held-out prompts)", ""]
    for i, s in enumerate(samples, 1):
        lines += [f"### sample {i}", "", "prompt:", "```", s["prompt"], "```", "generated:", "```", s["generated"],
                  "```"]
        if "hybrid generated" in s:
            lines += ["generated by the hybrid student:", "```", s["hybrid generated"], "```"]
        lines += ["reference:", "```", s["reference"], "```", ""]
    report = out / "report.md"
    write_bytes_atomic(report, "\n".join(lines).encode())
    result["report_path"] = str(report)
    write_json_atomic(out / "eval.json", result)
    log(f"eval: student ppl {result['student_ppl']:.3f}"
        + (f", NIAH accuracy {result['niah_accuracy']:.2f}" if result["niah_accuracy"] is not None else "")
        + f"; report {report}")
    return result


def report_dir_of(checkpoint: str | Path) -> Path:
    """The default report folder, beside the evaluated checkpoint: ``<run>/eval`` for ``<run>/final`` or a run
    folder, ``<run>/eval-<name>`` for any other checkpoint folder, so that evaluating two checkpoints never
    overwrites one report."""
    c = Path(checkpoint)
    if c.name == "final":
        return c.parent / "eval"
    if (c / "final").is_dir() or (c / "checkpoint_latest").exists():  # a run folder
        return c / "eval"
    return c.parent / f"eval-{c.name}"


def evaluate_run(
    cfg: PipelineConfig,
    *,
    checkpoint: str | Path | None = None,
    split: str | None = None,
    niah: bool | None = None,
    out_dir: str | Path | None = None,
    teacher: Any = "auto",
    baseline: Any = "auto",
    converted: Any = "auto",
    hybrid: Any = "auto",
    long_context: bool | None = None,
    device: str | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Evaluate the configured run: ``<run_dir>/final`` (or ``checkpoint``), the finetuned teacher of
    ``teacher_ft.output_dir``, the CE-only baseline ``<run_dir>_ce_only/final`` and the converted
    (aligned) student of ``student.init: from_teacher`` when they exist. Result keys: see the module doc."""
    ckpt = Path(checkpoint) if checkpoint is not None else cfg.run_dir / "final"
    if teacher == "auto":
        t = cfg.teacher_ft_dir
        teacher = t if (t / "final_model").is_dir() or (t / "final_adapter").is_dir() else None
        if teacher is None and cfg.teacher.model_name_or_path:
            teacher = cfg.teacher.adapter_path or None
    if baseline == "auto":
        b = Path(str(cfg.run_dir) + "_ce_only") / "final"
        baseline = b if b.is_dir() else None
    if converted == "auto":  # stage 1 of student.init from_teacher: the converted + aligned student
        from distill_dag.student.align import aligned_dir

        c = aligned_dir(cfg) / "final"
        converted = c if (c / "config.json").exists() else None
    if hybrid == "auto":  # hybrid.enabled: <run_dir>_hybrid/final
        h = Path(str(cfg.run_dir) + "_hybrid") / "final"
        hybrid = h if (h / "config.json").exists() and cfg.hybrid.enabled else None
    out = Path(out_dir) if out_dir is not None else (cfg.path(cfg.eval.output_dir) if cfg.eval.output_dir
                                                     else report_dir_of(ckpt))
    result = evaluate_checkpoint(ckpt, cfg, cfg.tokenized_dir, out, teacher=teacher, baseline=baseline,
                                 converted=converted, hybrid=hybrid, split=split, niah=niah,
                                 long_context=long_context,
                                 device=device, log=log)
    from distill_dag.model.hub import add_eval_to_model_card  # the student's model card gets the tables

    add_eval_to_model_card(result["checkpoint"], result)
    from distill_dag.training.telemetry import log_eval_run  # W&B (job_type eval, the training runs' group)

    scalars = {k: v for k, v in result.items() if k.endswith(("_ppl", "_accuracy", "nats_per_token")) and
               isinstance(v, (int, float)) and not isinstance(v, bool)}
    result.update(log_eval_run(cfg, out, scalars, tables={"perplexity": result["perplexity_rows"]}, echo=log))
    return result
