"""The field's benchmarks through lm-evaluation-harness (``lm_eval``), reported as a share of the teacher.

Distillation papers (RADLADS, LoLCATs, fla's hybrid distillation) and torchtune's KD recipes report
lm-eval zero-shot tasks as ``student score / teacher score``; this module runs lm-eval itself (no
harness of our own) on every saved model and builds that table.

- :func:`build_local_tasks` writes task YAMLs that run offline, built from the held-out split:
  ``distill_heldout_continuation`` (4-way "which continuation": a window of held-out tokens decoded
  to text, its true next span and 3 spans of other held-out rows; metrics ``acc``, ``acc_norm``) and
  ``distill_passkey`` (the needle-in-a-haystack pass-key prompt of :mod:`distill_dag.eval.niah` at
  the training length, as a ``generate_until`` task scored by exact match of the key).
- :func:`run_lm_eval` runs ``lm_eval.simple_evaluate`` for each model folder, in a child Python
  (:mod:`distill_dag.eval.lm_eval_child`, which never imports distill_dag): ``trust_remote_code``
  (our RetNet students load from the code shipped in their folder, not from distill_dag), fp32, and
  a LoRA teacher as ``pretrained=BASE`` + ``peft=ADAPTER``. It returns per task the teacher's
  score, each student's and the student/teacher share, plus a mean-share row.
- A task is a registered lm-eval name (arc_easy, hellaswag, mmlu, ...: their data comes from the
  Hugging Face Hub), one of the ``distill_`` tasks, or a path to a task YAML (its folder is
  included). Where the Hub cannot be reached, lm-eval runs offline, and a task whose data is not
  local fails before any model runs, with one error naming it and how to point it at local files.

``lm_eval`` is imported only inside the functions: it pulls in evaluate, sklearn and friends, which
``distill --help`` and the Dagster code location must not pay for.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

from distill_dag.data.dataset import PackedDataset
from distill_dag.device import pick_device
from distill_dag.eval import lm_eval_child
from distill_dag.eval.lm_eval_child import CONTINUATION_TASK, LOCAL_TASKS, PASSKEY_TASK, LmEvalTaskError
from distill_dag.eval.niah import build_cases, haystack_for, is_retrieval_doc
from distill_dag.io import write_bytes_atomic, write_json_atomic
from distill_dag.safe_read import MAX_JSON_BYTES, read_text_bounded
from distill_dag.teacher.model import FINAL_ADAPTER, FINAL_MODEL
from distill_dag.training.checkpoint import resolve_checkpoint

STANDARD_SUITE = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "lambada_openai", "mmlu")
# the metric each task is ranked by, as the distillation papers report them (acc_norm where the
# choices differ in length); any other task: the first metric of its own metric_list
MAIN_METRIC = {"arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc",
               "winogrande": "acc", "lambada_openai": "acc", "mmlu": "acc",
               CONTINUATION_TASK: "acc", PASSKEY_TASK: "exact_match"}
N_CHOICES = 4


# ---- local tasks built from the held-out split -------------------------------------------------------
def _segments(data_dir: str | Path, split: str, eos_id: int | None,
              max_rows: int | None = None) -> Iterator[tuple[int, int, list[int]]]:
    """``(row, first column, token ids)`` of every contiguous piece of one document inside one row of
    ``split`` (pieces end at a document start, at padding and at the row's end; EOS dropped); the first
    ``max_rows`` rows only, when given."""
    ds = PackedDataset(data_dir, split)
    for i in range(min(len(ds), max_rows or len(ds))):
        item = ds[i]
        ids, mask, pos = item["input_ids"].tolist(), item["attention_mask"].tolist(), item["position_ids"].tolist()
        width = sum(mask)
        start = 0
        for t in range(1, width + 1):
            if t == width or pos[t] == 0:
                piece = ids[start:t]
                while piece and piece[-1] == eos_id:
                    piece = piece[:-1]
                if piece:
                    yield i, start, piece
                start = t


def _write_task(folder: Path, name: str, rows: list[dict[str, Any]], spec: dict[str, Any]) -> Path:
    import yaml

    data = folder / f"{name}.jsonl"
    write_bytes_atomic(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    # cache_dir: the prepared copy stays beside the task, not in the user's Hugging Face cache (one per eval run)
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())},
                               "cache_dir": str((folder / "hf_datasets_cache").resolve())},
            "test_split": "test", **spec, "metadata": {"version": 1}}
    path = folder / f"{name}.yaml"
    write_bytes_atomic(path, yaml.safe_dump(task, sort_keys=False, allow_unicode=True).encode())
    return path


def continuation_examples(
    tokenizer: Any,
    data_dir: str | Path,
    *,
    split: str = "val",
    n: int = 200,
    context_tokens: int = 128,
    continuation_tokens: int = 16,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of the "which continuation" task: ``context`` (``context_tokens`` held-out tokens as text),
    ``choices`` (4 spans of ``continuation_tokens`` tokens as text), ``gold`` (index of the true next
    span), and where it came from (``row``, ``column``: the window's first token in the split).

    One window per document piece (pieces shuffled by ``seed``); the 3 distractors are spans of other
    rows. Synthetic retrieval documents are left out: a pass key is no continuation a model can know.
    """
    need = context_tokens + continuation_tokens
    # a real held-out split has far more rows than a few hundred examples need: read a bounded prefix
    pieces = list(_segments(data_dir, split, tokenizer.eos_token_id, max_rows=max(16 * n, 1024)))
    pieces = [p for p in pieces if not is_retrieval_doc(tokenizer.decode(p[2]))]
    long = [p for p in pieces if len(p[2]) >= need]
    spans = [p for p in pieces if len(p[2]) >= continuation_tokens]
    if not long or len({p[0] for p in spans}) < N_CHOICES:
        raise ValueError(
            f"{data_dir}: the '{split}' split has {len(long)} document pieces of >= {need} tokens in "
            f"{len({p[0] for p in spans})} rows; the continuation task needs one and {N_CHOICES} rows: lower "
            "the window (context_tokens / continuation_tokens) or tokenize with a larger tokenize.val_fraction")
    rng = random.Random(f"{seed}/continuation")
    rng.shuffle(long)
    out: list[dict[str, Any]] = []
    for row, col, ids in long[:n]:
        off = rng.randrange(len(ids) - need + 1)
        context = tokenizer.decode(ids[off : off + context_tokens])
        gold = tokenizer.decode(ids[off + context_tokens : off + need])
        others: list[str] = []
        for _ in range(200):  # distinct spans of other rows; a tiny split may repeat text, so retry
            r2, _, ids2 = spans[rng.randrange(len(spans))]
            if r2 == row:
                continue
            o = rng.randrange(len(ids2) - continuation_tokens + 1)
            text = tokenizer.decode(ids2[o : o + continuation_tokens])
            if text != gold and text not in others:
                others.append(text)
            if len(others) == N_CHOICES - 1:
                break
        if len(others) < N_CHOICES - 1:
            continue
        g = rng.randrange(N_CHOICES)
        choices = others[:g] + [gold] + others[g:]
        out.append({"context": context, "choices": choices, "gold": g, "row": row, "column": col + off})
    return out


def passkey_examples(tokenizer: Any, data_dir: str | Path, *, split: str = "val", context_length: int = 256, n: int = 20,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Rows of the pass-key task: ``context`` (a NIAH prompt of ``context_length`` tokens, as text, ending
    with the question), ``key`` (the answer), ``depth``: :func:`distill_dag.eval.niah.build_cases` with the
    same haystack as the report's NIAH section (the split decoded; stdlib docstrings when it is short)."""
    hay, _ = haystack_for(tokenizer, data_dir, split, context_length)
    depths = [(i + 0.5) / n for i in range(n)]
    cases = build_cases(tokenizer, hay, [context_length], depths, 1, seed=seed)
    return [{"context": tokenizer.decode(c.input_ids), "key": c.key, "depth": c.depth} for c in cases]


def build_local_tasks(
    data_dir: str | Path,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    names: Sequence[str] = LOCAL_TASKS,
    split: str = "val",
    train_len: int = 256,
    seed: int = 0,
    n_examples: int = 200,
    context_tokens: int | None = None,
    continuation_tokens: int | None = None,
    passkey_examples_n: int = 20,
    max_new_tokens: int = 8,
) -> dict[str, Path]:
    """Write the ``distill_`` tasks of ``names`` (task YAML + JSONL) into ``out_dir``; ``{name: yaml path}``.

    ``train_len``: the training row length (``tokenize.max_seq_length``): the continuation window is
    half of it (at most 128 tokens) followed by ``continuation_tokens`` (default ``min(16, train_len // 8)``),
    and the pass-key prompt is exactly ``train_len`` tokens, as NIAH's cell at the training length.
    """
    unknown = [t for t in names if t not in LOCAL_TASKS]
    if unknown:
        raise LmEvalTaskError(f"eval.lm_eval_tasks: {unknown} are not tasks this package builds ({list(LOCAL_TASKS)})")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = context_tokens or min(128, max(8, train_len // 2))
    cont = continuation_tokens or min(16, max(2, train_len // 8))
    out: dict[str, Path] = {}
    if CONTINUATION_TASK in names:
        rows = continuation_examples(tokenizer, data_dir, split=split, n=n_examples, context_tokens=ctx,
                                     continuation_tokens=cont, seed=seed)
        # target_delimiter "": the choice is the raw next text (its own leading space, if any, included)
        out[CONTINUATION_TASK] = _write_task(folder, CONTINUATION_TASK, rows, {
            "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "gold", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]})
    if PASSKEY_TASK in names:
        rows = passkey_examples(tokenizer, data_dir, split=split, context_length=train_len, n=passkey_examples_n,
                                seed=seed)
        # the first run of digits after optional spaces must be the key: eval/niah.py's score()
        out[PASSKEY_TASK] = _write_task(folder, PASSKEY_TASK, rows, {
            "output_type": "generate_until", "doc_to_text": "context", "doc_to_target": "key",
            "target_delimiter": " ",
            "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": max_new_tokens, "do_sample": False},
            "filter_list": [{"name": "first_digits", "filter": [
                {"function": "regex", "regex_pattern": r"^\s*(\d+)"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]})
    return out


# ---- which tasks, and whether their data loads ----------------------------------------------------------
def _yaml_task_name(path: Path) -> str:
    import yaml

    class _Loose(yaml.SafeLoader):  # lm-eval YAMLs use `!function module.fn`: keep the tag's text
        pass

    _Loose.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        # the loader driven by hand (what yaml.load does): a SafeLoader subclass, so no tag builds an object
        loader = _Loose(path.read_text(encoding="utf-8"))
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise LmEvalTaskError(f"eval.lm_eval_tasks: {path} is not a readable task YAML ({err})") from err
    name = doc.get("task") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        raise LmEvalTaskError(f"eval.lm_eval_tasks: {path} has no `task: NAME` line; lm-eval names every task "
                              "YAML's task (see lm-eval's docs/new_task_guide.md)")
    return name


def resolve_tasks(tasks: Sequence[str], local_dir: str | Path | None = None) -> tuple[list[str], list[Path]]:
    """``eval.lm_eval_tasks`` entries -> (lm-eval task names, folders to include). A ``.yaml``/``.yml`` path
    is a task YAML: its ``task:`` name runs and its folder is included; the ``distill_``
    tasks are in ``local_dir`` (written by :func:`build_local_tasks`)."""
    names: list[str] = []
    include: list[Path] = []
    for t in tasks:
        p = Path(t).expanduser()
        if t.endswith((".yaml", ".yml")):
            if not p.is_file():
                raise LmEvalTaskError(f"eval.lm_eval_tasks: task YAML {p} does not exist (a path is relative to the "
                                      "current directory, or to the config file's folder in a config file)")
            names.append(_yaml_task_name(p))
            if p.resolve().parent not in include:
                include.append(p.resolve().parent)
        else:
            names.append(t)
            if t in LOCAL_TASKS and local_dir is not None and Path(local_dir).resolve() not in include:
                include.append(Path(local_dir).resolve())
    return names, include


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT``) answers a TCP connect; False when offline is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct connect says nothing behind a proxy: let the Hub client try
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False



# ---- running lm-eval ------------------------------------------------------------------------------------
def finetuned_folder(folder: str | Path) -> Path:
    """The model inside a teacher_ft output folder (its ``final_adapter/``, else its ``final_model/``); any other
    folder as it is."""
    p = Path(folder)
    for sub in (FINAL_ADAPTER, FINAL_MODEL):
        if (p / sub).is_dir():
            return p / sub
    return p


def hflm_args(model: str | Path | Mapping[str, Any], base: str | None = None) -> dict[str, Any]:
    """lm-eval ``hf`` model arguments for a model folder: a full model (``pretrained=DIR``), a LoRA adapter
    (``pretrained=BASE, peft=DIR``: BASE is ``base`` or the adapter's ``base_model_name_or_path``), or a
    teacher_ft output folder (its ``final_model/`` or ``final_adapter/``). A mapping passes through."""
    if isinstance(model, Mapping):
        return dict(model)
    p = finetuned_folder(model)
    if (p / "adapter_config.json").exists():
        b = base or json.loads(read_text_bounded(p / "adapter_config.json", MAX_JSON_BYTES, "adapter_config.json")).get("base_model_name_or_path")
        if not b:
            raise LmEvalTaskError(f"{p}: a LoRA adapter without base_model_name_or_path; set "
                                  "teacher.model_name_or_path")
        return {"pretrained": str(b), "peft": str(p)}
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p}: no config.json (nor final_model/, final_adapter/, adapter_config.json): "
                                "not a saved model for lm-eval")
    return {"pretrained": str(p)}


def _main_metric(task: str, task_result: Mapping[str, Any], config: Mapping[str, Any] | None) -> tuple[str, str]:
    """(metric, result key) of a task's headline number: :data:`MAIN_METRIC`, else its metric_list's first."""
    ml = (config or {}).get("metric_list") or []
    wants = [MAIN_METRIC.get(task)] + [m.get("metric") for m in ml if isinstance(m, dict)]
    keys = [k for k in task_result if "," in k and "_stderr" not in k and isinstance(task_result[k], (int, float))]
    for want in [w for w in wants if w]:  # a task YAML of one's own may drop the usual metric: its own first
        for k in keys:
            if k.split(",")[0] == want:
                return want, k
    if keys:
        return keys[0].split(",")[0], keys[0]
    raise LmEvalTaskError(f"lm-eval returned no metric for task '{task}' (got {sorted(task_result)})")


def scores_from_results(results: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{task: {"metric", "value", "stderr", "higher_is_better", "n"}}`` from ``simple_evaluate``'s output
    (a group such as mmlu reads its aggregate row)."""
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        r = (results.get("results") or {}).get(t) or (results.get("groups") or {}).get(t)
        if r is None:
            raise LmEvalTaskError(f"lm-eval returned nothing for task '{t}' (got {sorted(results.get('results', {}))})")
        metric, key = _main_metric(t, r, (results.get("configs") or {}).get(t))
        se = r.get(key.replace(",", "_stderr,", 1))
        hib = ((results.get("higher_is_better") or {}).get(t) or {}).get(metric, True)
        n = (results.get("n-samples") or {}).get(t, {})
        out[t] = {"metric": metric, "value": float(r[key]),
                  "stderr": float(se) if isinstance(se, (int, float)) else None,
                  "higher_is_better": bool(hib), "n": n.get("effective") if isinstance(n, dict) else None}
    return out


def share(student: float, teacher: float, higher_is_better: bool = True) -> float | None:
    """Student as a share of the teacher (1.0 = as good): ``student / teacher``, or ``teacher / student``
    for a lower-is-better metric; None where the denominator is 0 (the share says nothing there)."""
    num, den = (student, teacher) if higher_is_better else (teacher, student)
    return num / den if den and math.isfinite(den) and math.isfinite(num) else None


def share_rows(scores: Mapping[str, Mapping[str, Mapping[str, Any]]], teacher: str,
               tasks: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """The table: one row per task (``task``, ``metric``, each model's score, ``<student> share``), then a
    ``mean share`` row (over the tasks where the share is defined). ``scores``: {model: {task: score}} as
    :func:`scores_from_results` gives; ``teacher`` names the reference model. Returns (rows, mean shares)."""
    students = [m for m in scores if m != teacher]
    rows: list[dict[str, Any]] = []
    per: dict[str, list[float]] = {s: [] for s in students}
    for t in tasks:
        ref = scores[teacher][t]
        row: dict[str, Any] = {"task": t, "metric": ref["metric"], teacher: ref["value"]}
        for s in students:
            row[s] = scores[s][t]["value"]
        for s in students:
            sh = share(scores[s][t]["value"], ref["value"], ref["higher_is_better"])
            row[f"{s} share"] = sh
            if sh is not None:
                per[s].append(sh)
        rows.append(row)
    mean = {s: (sum(v) / len(v) if v else None) for s, v in per.items()}
    last: dict[str, Any] = {"task": "mean share", "metric": "", teacher: None}
    last.update({s: None for s in students})
    last.update({f"{s} share": mean[s] for s in students})
    rows.append(last)
    return rows, mean


def rows_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The share table as markdown (scores to 3 decimals, shares to 2, '-' where undefined)."""
    if not rows:
        return "_(no lm-eval tasks)_"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append("-" if c not in ("task", "metric") else "")
            elif isinstance(v, float):
                cells.append(f"{v:.2f}" if c.endswith(" share") else f"{v:.3f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_lm_eval(
    models: Mapping[str, str | Path | Mapping[str, Any]],
    tasks: Sequence[str],
    limit: int | None = None,
    *,
    teacher: str | None = None,
    include_paths: Sequence[str | Path] = (),
    device: str | None = None,
    batch_size: int = 8,
    tokenizer: str | Path | None = None,
    max_length: int | None = None,
    base: str | None = None,
    offline: bool | None = None,
    seed: int = 0,
    workdir: str | Path | None = None,
    timeout_s: float | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on each of ``models`` ({name: model folder, or hf model args}).

    ``teacher``: the name of the reference model (default: the last one); ``limit``: examples per task
    (None: all); ``include_paths``: folders of task YAMLs (:func:`resolve_tasks`); ``tokenizer``: passed to
    every model (our students' folders may not ship one); ``base``: the base model of a LoRA teacher;
    ``offline``: None probes the Hub (:func:`hub_reachable`). Every model loads with ``trust_remote_code``,
    in float32, on ``device`` (:func:`distill_dag.device.pick_device`).

    lm-eval runs in a child Python that never imports distill_dag: in a process where distill_dag has
    registered the RetNet student with the Auto classes, transformers prefers that registration over the
    code shipped in the folder, so only a clean process proves that the checkpoint loads the way a user of
    the Hub loads it. The child's output goes to ``<workdir>/lm_eval.log``.

    Returns ``rows`` / ``mean_share`` (:func:`share_rows`), ``scores`` ({model: {task: score}}),
    ``seconds`` ({model: wall time in the child: load + evaluate}), ``wall_s`` (the whole call), ``model_class``
    ({model: the module.class transformers loaded}), ``tasks``, ``limit``, ``teacher``, ``offline``, ``log``.
    """
    import subprocess
    import sys
    import tempfile

    import torch

    if not models:
        raise ValueError("run_lm_eval: no models")
    teacher = teacher or list(models)[-1]
    if teacher not in models:
        raise ValueError(f"run_lm_eval: teacher {teacher!r} is not among the models {list(models)}")
    if limit is not None and limit < 1:
        raise ValueError(f"eval.lm_eval_limit: {limit} must be >= 1 (or null for every example)")
    wall = time.perf_counter()
    offline = (not hub_reachable()) if offline is None else offline
    tasks = list(tasks)
    specs = {}
    for name, spec in models.items():
        args = {**hflm_args(spec, base), "trust_remote_code": True, "dtype": "float32",
                "device": str(pick_device(device or "auto")), "batch_size": batch_size}
        if tokenizer is not None:
            args.setdefault("tokenizer", str(tokenizer))
        if max_length is not None:
            args.setdefault("max_length", max_length)
        specs[name] = args
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lm_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    job = {"models": specs, "tasks": tasks, "limit": limit, "include": [str(Path(p).resolve()) for p in include_paths],
           "seed": seed, "threads": torch.get_num_threads(), "offline": offline, "out": str(work / "lm_eval_raw.json")}
    (work / "lm_eval_job.json").write_text(json.dumps(job, indent=1))
    env = dict(os.environ)
    if offline:  # read by huggingface_hub and datasets at import: set before the child starts
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # nothing of this checkout on the child's path beyond the installed packages
    log(f"lm-eval: {tasks} (limit {limit}) on {list(specs)}" + (", offline" if offline else "") +
        f"; log {work / 'lm_eval.log'}")
    with open(work / "lm_eval.log", "wb") as out:
        child = [sys.executable, "-I", str(Path(lm_eval_child.__file__).resolve()), str(work / "lm_eval_job.json")]
        proc = subprocess.run(child, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(work), timeout=timeout_s)
    raw = json.loads(Path(job["out"]).read_text()) if Path(job["out"]).exists() else {}
    if raw.get("task_error"):
        raise LmEvalTaskError(raw["task_error"])
    if proc.returncode != 0 or "models" not in raw:
        tail = (work / "lm_eval.log").read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"lm-eval failed (exit {proc.returncode}); {work / 'lm_eval.log'} ends:\n" + "\n".join(tail))
    result: dict[str, Any] = {"tasks": tasks, "limit": limit, "teacher": teacher, "offline": offline,
                              "log": str(work / "lm_eval.log"), "scores": {}, "seconds": {}, "model_class": {}}
    for name in specs:
        r = raw["models"][name]
        result["scores"][name] = scores_from_results(r["results"], tasks)
        result["seconds"][name] = r["seconds"]
        result["model_class"][name] = r["model_class"]
        log(f"lm-eval: {name}: " + ", ".join(f"{t} {s['metric']} {s['value']:.3f}"
                                             for t, s in result["scores"][name].items())
            + f" ({r['seconds']:.1f} s, {r['model_class']})")
    result["rows"], result["mean_share"] = share_rows(result["scores"], teacher, tasks)
    result["wall_s"] = time.perf_counter() - wall  # the child's start, lm-eval's import and task loading included
    return result


def loads_without_distill_dag(folder: str | Path) -> bool:
    """Whether transformers alone can load the model saved in ``folder``: its ``config.json`` has an ``auto_map``
    (code shipped beside the weights) or a ``model_type`` transformers knows (Llama, ...)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    p = finetuned_folder(folder)
    if (p / "adapter_config.json").exists():
        return True  # a LoRA adapter: its base model is a hub / local transformers model
    try:
        cfg = json.loads(read_text_bounded(p / "config.json", MAX_JSON_BYTES, "model config.json"))
    except (OSError, ValueError):
        return False
    return bool(cfg.get("auto_map")) or cfg.get("model_type") in CONFIG_MAPPING_NAMES


def _saved_dir(module: Any) -> Path | None:
    """The folder a loaded transformers model came from (``config._name_or_path``), when it holds one."""
    cfg = getattr(module[1] if isinstance(module, tuple) else module, "config", None)
    p = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return Path(p) if p and (Path(p) / "config.json").exists() else None


def lm_eval_section(
    cfg: Any,
    compared: Mapping[str, Any],
    dirs: Mapping[str, Any],
    *,
    teacher_name: str | None,
    data_dir: str | Path,
    out_dir: str | Path,
    tokenizer: Any,
    tokenizer_dir: str | Path,
    split: str,
    device: Any,
    result: dict[str, Any],
    log: Callable[[str], Any] = print,
) -> list[str]:
    """The report's lm-eval section (:func:`distill_dag.eval.report.evaluate_checkpoint`): lm-eval on the teacher
    and every model of ``compared`` that is saved on disk, ``eval.lm_eval_tasks`` / ``eval.lm_eval_limit``.

    ``dirs``: {name: folder, or None for a model given in memory}; a model of ``compared`` not in ``dirs`` is
    found by the folder it was loaded from (:func:`_saved_dir`), so a model added to ``compared`` later is
    evaluated without more wiring. Fills ``result`` (``lm_eval_rows``, ``lm_eval_mean_share`` {student: share},
    ``lm_eval_table``, ``lm_eval_seconds``, ``lm_eval_model_class``, ``lm_eval_tasks``; ``lm_eval_skipped``
    says why when it did not run), writes ``lm_eval.json`` and returns the markdown lines."""
    ec = cfg.eval
    if not ec.lm_eval_tasks:
        result["lm_eval_skipped"] = "eval.lm_eval_tasks is empty"
        return []
    if teacher_name is None or teacher_name not in compared:
        result["lm_eval_skipped"] = "no teacher to take the share of"
        log("lm-eval: skipped (no teacher)")
        return []
    folders: dict[str, Any] = {}
    unloadable: list[str] = []
    for name, module in compared.items():
        d = dirs[name] if name in dirs else _saved_dir(module)
        if not isinstance(d, (str, Path)):
            continue
        if name != teacher_name:  # a run dir -> its checkpoint, as the report loaded it
            d = resolve_checkpoint(d)
            if not loads_without_distill_dag(d):
                unloadable.append(f"{name} ({d}: no auto_map, its model_type unknown to transformers)")
                continue
        folders[name] = d
    for u in unloadable:
        log(f"lm-eval: skipping {u}; a folder written by distill_dag.training.checkpoint.write_final ships its code")
    if teacher_name not in folders:
        result["lm_eval_skipped"] = f"the teacher ({teacher_name}) is not saved on disk"
        log(f"lm-eval: skipped ({result['lm_eval_skipped']})")
        return []
    models = {n: f for n, f in folders.items() if n != teacher_name} | {teacher_name: folders[teacher_name]}
    if len(models) < 2:
        result["lm_eval_skipped"] = "no student saved on disk that loads through trust_remote_code"
        log(f"lm-eval: skipped ({result['lm_eval_skipped']})")
        return []
    out = Path(out_dir)
    train_len = cfg.tokenize.max_seq_length
    local = [t for t in ec.lm_eval_tasks if t in LOCAL_TASKS]
    if local:
        build_local_tasks(data_dir, tokenizer, out / "lm_eval_tasks", names=local, split=split, train_len=train_len,
                          seed=ec.seed, max_new_tokens=ec.niah_max_new_tokens)
    names, include = resolve_tasks(ec.lm_eval_tasks, out / "lm_eval_tasks")
    r = run_lm_eval(models, names, ec.lm_eval_limit, teacher=teacher_name, include_paths=include, device=str(device),
                    batch_size=ec.batch_size, tokenizer=tokenizer_dir, max_length=max(2048, 2 * train_len),
                    base=cfg.teacher.model_name_or_path, seed=ec.seed, workdir=out / "lm_eval", log=log)
    table = rows_markdown(r["rows"])
    write_json_atomic(out / "lm_eval.json", r)
    result.update(lm_eval_rows=r["rows"], lm_eval_mean_share=r["mean_share"], lm_eval_table=table,
                  lm_eval_seconds=r["seconds"], lm_eval_wall_s=r["wall_s"], lm_eval_model_class=r["model_class"],
                  lm_eval_tasks=names)
    skipped = [n for n in compared if n not in models and not any(u.startswith(n + " (") for u in unloadable)]
    return ["## lm-evaluation-harness (share of the teacher)", "",
            f"lm-eval {_version()} zero-shot, {('all' if ec.lm_eval_limit is None else f'at most {ec.lm_eval_limit}')} "
            f"examples per task; each model loaded from its folder with trust_remote_code, float32. A share is "
            f"student / {teacher_name} on the task's metric; the mean share is over the tasks where the teacher "
            f"scores above 0. `distill_` tasks are built from the '{split}' split: which of 4 spans continues a "
            f"held-out window, and the pass-key question at the training length ({train_len} tokens)."
            + (f" Not run (in memory only): {', '.join(skipped)}." if skipped else "")
            + (f" Not run (cannot load through trust_remote_code): {'; '.join(unloadable)}." if unloadable else ""),
            "", table, ""]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "?"
