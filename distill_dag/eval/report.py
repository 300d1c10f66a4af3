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

This module loads the models and runs the parts in order; :mod:`distill_dag.eval.measure` measures (runs the
models, writes nothing) and :mod:`distill_dag.eval.render` renders (JSON, PNG, the markdown report).

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

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM

import distill_dag  # noqa: F401  - registers the RetNet student with the Auto classes
from distill_dag.config import PipelineConfig
from distill_dag.data.tokenizer import load_tokenizer
from distill_dag.device import pick_device
from distill_dag.eval.harness import finetuned_folder, lm_eval_section
from distill_dag.eval.measure import (STUDENTS, eval_batches, measure_long_context, measure_niah, perplexity_rows,
                                      samples)
from distill_dag.eval.render import (find_metrics, loss_curves_png, one_line, render_long_context, render_niah,
                                     report_markdown)
from distill_dag.io import write_bytes_atomic, write_json_atomic
from distill_dag.model.model_card import add_eval_to_model_card
from distill_dag.model.variants import check_saved_model
from distill_dag.student.align import aligned_dir
from distill_dag.teacher.model import build_tiny_teacher, load_teacher
from distill_dag.training.checkpoint import resolve_checkpoint, verify_checkpoint
from distill_dag.training.telemetry import log_eval_run


def _load_causal_lm(path: Path, device: torch.device) -> torch.nn.Module:
    path = resolve_checkpoint(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model (give a checkpoint or a run dir)")
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
    if isinstance(teacher, torch.nn.Module):
        return {"teacher": teacher.to(device).eval()}
    t = finetuned_folder(teacher)
    if (t / "adapter_config.json").exists():
        adapted = load_teacher(cfg.teacher, device, adapter_path=t)
        return {"teacher (base)": ("disable_adapter", adapted), "teacher (adapted)": adapted}
    if not (t / "config.json").exists():
        raise FileNotFoundError(f"teacher {teacher}: no final_model/, final_adapter/, config.json or adapter_config.json")
    saved = check_saved_model(t)  # the same bounds as a student's: no endless file, no 10M-layer config.json
    out: dict[str, Any] = {}
    if cfg.teacher.model_name_or_path is None and cfg.teacher.init_tiny:
        # the demo teacher starts as a seeded random init: rebuilt exactly, it is the "before" row
        vocab = saved["vocab_size"]
        out["teacher (base)"] = build_tiny_teacher(vocab, cfg.teacher.init_tiny, seed=cfg.teacher_ft.seed).to(device).eval()
    out["teacher (adapted)"] = load_teacher(cfg.teacher, device, model_path=t)
    return out


def _model(m: Any, device: torch.device) -> torch.nn.Module:
    """A model given in memory, or the checkpoint folder of one, on ``device`` in eval mode."""
    return m.to(device).eval() if isinstance(m, torch.nn.Module) else _load_causal_lm(Path(m), device)


def load_models(cfg: PipelineConfig, checkpoint: str | Path | torch.nn.Module, device: torch.device, *,
                teacher: Any = None, baseline: Any = None, converted: Any = None,
                hybrid: Any = None) -> tuple[dict[str, Any], Path | None, str | None]:
    """``(models, checkpoint path, teacher name)``: every model of the report by its row name (``student``,
    ``CE-only baseline``, ``converted student``, ``hybrid student``, then the teacher rows), the student's
    resolved checkpoint (None for a model given in memory), and the row of the trained teacher (None without
    one)."""
    if isinstance(checkpoint, torch.nn.Module):
        student, ckpt_path = checkpoint.to(device).eval(), None
    else:
        ckpt_path = resolve_checkpoint(checkpoint)
        student = _load_causal_lm(ckpt_path, device)
    models: dict[str, Any] = {"student": student}
    if baseline is not None:
        models["CE-only baseline"] = _model(baseline, device)
    if converted is not None:
        models["converted student"] = _model(converted, device)
    if hybrid is not None:  # hybrid.enabled: the converted student that keeps some of the teacher's attention
        models["hybrid student"] = _model(hybrid, device)
    teachers = teacher_models(cfg, teacher, device) if teacher is not None else {}
    models.update(teachers)
    adapted = teachers.get("teacher (adapted)") or teachers.get("teacher")
    teacher_name = "teacher (adapted)" if "teacher (adapted)" in teachers else ("teacher" if adapted is not None else None)
    return models, ckpt_path, teacher_name


def compared_models(models: dict[str, Any], teacher_name: str | None) -> dict[str, Any]:
    """The models compared by NIAH, long context and lm-eval: every student, then the trained teacher."""
    compared = {n: m for n, m in models.items() if n in STUDENTS}
    if teacher_name is not None:
        compared[teacher_name] = models[teacher_name]
    return compared


def _result_key(model: str) -> str:
    """``<model>_ppl``'s stem: the row name as an identifier (``teacher (adapted)`` -> ``teacher_adapted``)."""
    return model.replace(" ", "_").replace("(", "").replace(")", "").replace("-", "_")


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

    Each part is measured (:mod:`distill_dag.eval.measure`), then written (:mod:`distill_dag.eval.render`)
    before the next part runs, so a long evaluation that fails late keeps what it had measured.
    """
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
    models, ckpt_path, teacher_name = load_models(cfg, checkpoint_dir, dev, teacher=teacher, baseline=baseline,
                                                  converted=converted, hybrid=hybrid)
    compared = compared_models(models, teacher_name)
    train_len = cfg.tokenize.max_seq_length

    batches = eval_batches(data_dir, split, ec)
    log(f"eval: perplexity of {list(models)} on {len(batches)} '{split}' batches")
    ppl_rows = perplexity_rows(models, batches, dev)
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
        result[f"{_result_key(r['model'])}_ppl"] = r["ppl"]

    niah_sections: list[str] = []
    niah_haystack = None
    if do_niah:
        raw, per_model = measure_niah(compared, tokenizer, data_dir, split, ec, train_len, log)
        niah_haystack = raw["haystack"]
        niah_sections = render_niah(raw, per_model, teacher_name, list(ec.niah_context_lengths), list(ec.niah_depths),
                                    train_len, out, result)

    lc_sections: list[str] = []
    if long_context and compared:
        lc, cost = measure_long_context(compared, tokenizer, data_dir, split, train_len, long_context_multiples,
                                        long_context_contexts, dev, log)
        lc_sections = render_long_context(lc, cost, out, result)

    lm_eval_lines = lm_eval_section(  # the field's benchmarks, as a share of the teacher
        cfg, compared, {"student": ckpt_path, "CE-only baseline": baseline, "converted student": converted,
                        "hybrid student": hybrid, teacher_name: teacher}, teacher_name=teacher_name, data_dir=data_dir, out_dir=out,
        tokenizer=tokenizer, tokenizer_dir=tokenizer_dir or cfg.tokenizer_dir, split=split, device=dev,
        result=result, log=log)

    sample_rows = samples(models, tokenizer, data_dir, split, ec)
    write_json_atomic(out / "samples.json", sample_rows)
    result["samples"] = [{k: one_line(v) for k, v in s.items()} for s in sample_rows]

    metrics_file = find_metrics(ckpt_path) if ckpt_path else None
    if metrics_file is not None:
        p = loss_curves_png(metrics_file, out / "loss_curves.png")
        result["loss_png"] = str(p) if p else None

    report = out / "report.md"
    text = report_markdown(result, data_dir=data_dir, split=split, train_len=train_len, niah_haystack=niah_haystack,
                           niah_sections=niah_sections, long_context_multiples=long_context_multiples,
                           lc_sections=lc_sections, lm_eval_lines=lm_eval_lines, samples=sample_rows)
    write_bytes_atomic(report, text.encode())
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
    add_eval_to_model_card(result["checkpoint"], result)  # the student's model card gets the tables
    # W&B (job_type eval, the training runs' group)
    scalars = {k: v for k, v in result.items() if k.endswith(("_ppl", "_accuracy", "nats_per_token")) and
               isinstance(v, (int, float)) and not isinstance(v, bool)}
    result.update(log_eval_run(cfg, out, scalars, tables={"perplexity": result["perplexity_rows"]}, echo=log))
    return result
