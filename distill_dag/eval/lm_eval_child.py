"""The child process of :func:`distill_dag.eval.harness.run_lm_eval`: ``python -I lm_eval_child.py JOB`` loads each
model of the job with lm-eval's ``hf`` model (``trust_remote_code``: our students load from the code shipped in
their folder), evaluates the tasks and dumps JSON.

This file runs as a plain file in an isolated interpreter: it must never import ``distill_dag`` (the point is
that the checkpoints load without it), so it holds everything the child needs and imports only the standard
library, torch and lm-eval. :mod:`distill_dag.eval.harness` imports its names.
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any, Sequence

CONTINUATION_TASK = "distill_heldout_continuation"
PASSKEY_TASK = "distill_passkey"
LOCAL_TASKS = (CONTINUATION_TASK, PASSKEY_TASK)


class LmEvalTaskError(RuntimeError):
    """An ``eval.lm_eval_tasks`` entry that cannot run (unknown, or its data cannot be loaded)."""



def check_tasks(names: Sequence[str], task_manager: Any, *, offline: bool) -> None:
    """Load each task's data once, before any model runs; one :class:`LmEvalTaskError` names every task that
    is unknown or whose data cannot be loaded, and says how to point it at local files."""
    unknown, failed = [], []
    known = set(task_manager.all_tasks)
    for name in names:
        if name in LOCAL_TASKS and name in known:
            continue  # written from the split just now: local JSON, nothing to fetch
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            unknown.append(f"eval.lm_eval_tasks: '{name}' is not an lm-eval task, a task YAML path or one of "
                           f"{list(LOCAL_TASKS)}" + (f" (did you mean {', '.join(close)}?)" if close else
                                                     " (`lm-eval ls tasks` lists lm-eval's)"))
            continue
        try:
            task_manager.load([name])
        except Exception as err:  # datasets/hub raise ConnectionError, FileNotFoundError, OfflineModeIsEnabled...
            failed.append((name, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
    msgs = list(unknown)
    for name, why in failed:
        where = "the Hugging Face Hub is not reachable (offline mode)" if offline else "its data did not load"
        msgs.append(
            f"eval.lm_eval_tasks: task '{name}' cannot load its data: {where} ({why}). Point it at local files: "
            f"copy lm-eval's {name} YAML, set `dataset_path: json` and `dataset_kwargs: {{data_files: {{test: "
            f"/path/to/{name}.jsonl}}}}` (rows with the fields its doc_to_text/doc_to_target read), and list that "
            f"YAML's path in eval.lm_eval_tasks instead of '{name}'; or run where the Hub is reachable once (the "
            "data is then cached under HF_HOME)")
    if msgs:
        raise LmEvalTaskError("\n".join(msgs))



def main(job_path: str) -> int:
    """The child of :func:`~distill_dag.eval.harness.run_lm_eval`: load each model, evaluate, dump JSON."""
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    import torch

    torch.set_num_threads(job["threads"])
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import logging

    logging.basicConfig(level=logging.WARNING)
    # indexing lm-eval's own few thousand task YAMLs takes seconds: skipped when the included folders hold them all
    tm = TaskManager(include_path=job["include"] or None, include_defaults=False) if job["include"] else None
    if tm is None or not set(job["tasks"]) <= set(tm.all_tasks):
        tm = TaskManager(include_path=job["include"] or None)
    try:
        check_tasks(job["tasks"], tm, offline=job["offline"])
    except LmEvalTaskError as err:
        out.write_text(json.dumps({"task_error": str(err)}))
        return 3
    done: dict[str, Any] = {}
    for name, args in job["models"].items():
        t0 = time.perf_counter()
        lm = get_model("hf")(**args)
        res = lm_eval.simple_evaluate(model=lm, tasks=job["tasks"], limit=job["limit"], task_manager=tm,
                                      log_samples=False, bootstrap_iters=1000, random_seed=job["seed"],
                                      numpy_random_seed=job["seed"], torch_random_seed=job["seed"],
                                      fewshot_random_seed=job["seed"])
        model = lm.model
        if "peft" in args:  # PeftModel -> LoraModel -> the transformers model
            model = model.base_model.model
        keep = {k: res.get(k) for k in ("results", "groups", "higher_is_better", "n-samples")}
        keep["configs"] = {t: {"metric_list": c.get("metric_list")} for t, c in (res.get("configs") or {}).items()}
        done[name] = {"results": keep, "seconds": time.perf_counter() - t0,
                      "model_class": f"{type(model).__module__}.{type(model).__qualname__}"}
        print(f"{name}: {done[name]['seconds']:.1f} s, {done[name]['model_class']}", flush=True)
        del lm, res, model
    out.write_text(json.dumps({"models": done}, default=str))
    return 0


if __name__ == "__main__":
    import sys

    # run as a file, this folder would be first on sys.path, and its modules (report, plots, ...) would
    # shadow any top-level module of the same name that lm-eval imports
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    raise SystemExit(main(sys.argv[1]))
