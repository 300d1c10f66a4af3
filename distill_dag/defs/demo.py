"""``make demo``: materialize the whole graph of the code location, partitions included, into the
Dagster instance of ``DAGSTER_HOME`` (so ``make dev`` shows the runs, lineage, checks and partitions).

Dagster runs cannot mix an unpartitioned asset with a partitioned one, so the graph goes in three
waves, each a real Dagster run of the same definitions the UI uses:

1. the unpartitioned assets upstream of the cache (``tokenized_parquet`` registers the
   ``data_shards`` partitions, ``teacher_adapters`` trains the teacher);
2. ``student_ce_baseline`` (it needs no teacher) and one run per ``logit_cache`` partition (what a
   backfill launches), ``--lanes`` runs at once;
3. the remaining students (the KD student beside the hybrid student, when the config enables one), then
   ``eval_report`` with its checks.

Lanes: without CUDA the ``gpu`` pool's device is the CPU. Small models use two cores poorly (measured
on 2 cores: a cache partition takes ~7.0 s on one thread, ~6.9 s on two), so by default wave 2
runs one run per core, each with one torch thread, and the instance's ``gpu`` pool allows that many
steps at once (``--lanes 1`` keeps one run at a time, as on one GPU). ``--skip-eval`` leaves out
``eval_report``. Any run that fails stops the demo with its error.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

import dagster as dg

POOL = "gpu"


class RunFailed(RuntimeError):
    pass


def _run(defs: dg.Definitions, instance: dg.DagsterInstance, keys: list[str], partition: str | None = None) -> None:
    sel = [dg.AssetKey(k) for k in keys]
    job = defs.resolve_implicit_job_def_def_for_assets(sel)
    t0 = time.perf_counter()
    res = job.execute_in_process(instance=instance, asset_selection=sel, partition_key=partition, raise_on_error=False)
    what = ", ".join(keys) + (f" [{partition}]" if partition else "")
    if not res.success:
        failures = [e.message for e in res.all_events if e.is_failure]
        raise RunFailed(f"demo: the run of {what} failed (run {res.run_id[:8]}):\n" + "\n".join(failures[-3:]))
    print(f"demo: {what} in {time.perf_counter() - t0:.1f} s (run {res.run_id[:8]})", flush=True)


def _lane_init() -> None:
    """A wave-2 worker process: one torch thread (the lanes share the cores)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _lane_run(keys: list[str], partition: str | None) -> None:
    from distill_dag.definitions import defs  # lazy: definitions.py loads this folder, so the runner builds the code location only when it runs

    _run(defs, dg.DagsterInstance.get(), keys, partition)


def _default_lanes() -> int:
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))


def _parallel(instance: dg.DagsterInstance, jobs: list[tuple[list[str], str | None]], lanes: int) -> None:
    """Each (asset keys, partition) a run of its own, ``lanes`` at once in worker processes."""
    before = instance.event_log_storage.get_concurrency_info(POOL).slot_count
    instance.event_log_storage.set_concurrency_slots(POOL, lanes)
    print(f"demo: the '{POOL}' pool allows {lanes} steps at once (was {before}); one torch thread per run",
          flush=True)
    from distill_dag.defs import demo  # lazy: by its module name, not __main__, for the spawned workers

    try:
        with ProcessPoolExecutor(lanes, mp_context=mp.get_context("spawn"), initializer=demo._lane_init) as ex:
            futures = [ex.submit(demo._lane_run, keys, part) for keys, part in jobs]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                for g in futures:
                    g.cancel()
                raise failed[0].exception()  # type: ignore[misc]
    finally:  # UI backfills run each step with every core: back to one at a time
        instance.event_log_storage.set_concurrency_slots(POOL, before if before is not None else 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill_dag.defs.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-eval", action="store_true", help="leave eval_report out")
    ap.add_argument("--lanes", type=int, default=None,
                    help="wave-2 runs at once, one torch thread each (default: 2 on a CPU machine, 1 with CUDA)")
    a = ap.parse_args(argv)
    if a.lanes is not None and a.lanes < 1:
        ap.error(f"--lanes must be >= 1, got {a.lanes}")
    lanes = a.lanes or _default_lanes()
    from distill_dag.defs.assets.partitions import DATA_SHARDS  # lazy: definitions.py loads this folder, so the runner reads the partitions only when it runs
    from distill_dag.definitions import defs  # lazy: definitions.py loads this folder, so the runner builds the code location only when it runs

    instance = dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    names = {k.to_user_string() for k in graph.get_all_asset_keys()}
    cache_up = {k.to_user_string() for k in graph.get(dg.AssetKey("logit_cache")).parent_keys}
    first = [n for n in ("raw_jsonl", "tokenizer", "tokenized_parquet", "teacher_adapters")
             if n in names and (n in cache_up or n in ("raw_jsonl", "tokenizer"))]
    t0 = time.perf_counter()
    try:
        _run(defs, instance, first)
        second: list[tuple[list[str], str | None]] = [(["student_ce_baseline"], None)] if "student_ce_baseline" in names else []
        second += [(["logit_cache"], key) for key in instance.get_dynamic_partitions(DATA_SHARDS)]
        if lanes == 1:
            for keys, part in second:
                _run(defs, instance, keys, part)
        else:
            _parallel(instance, second, lanes)
        kd_up = {k.to_user_string() for k in graph.get(dg.AssetKey("student_ckpt")).parent_keys}
        third: list[tuple[list[str], str | None]] = [
            ((["student_aligned"] if "student_aligned" in kd_up else []) + ["student_ckpt"], None)]
        if "student_hybrid" in names:  # beside the KD student: the two take about as long
            third.append((["student_hybrid"], None))
        if lanes == 1 or len(third) == 1:
            for keys, part in third:
                _run(defs, instance, keys, part)
        else:
            _parallel(instance, third, lanes)
        if not a.skip_eval:
            _run(defs, instance, ["eval_report"])
    except RunFailed as e:
        sys.exit(str(e))
    print(f"demo: the whole graph in {time.perf_counter() - t0:.0f} s; `make dev` shows it at http://127.0.0.1:3000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
