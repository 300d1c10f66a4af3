"""``make demo``: materialize the whole graph of the code location, partitions included, into the
Dagster instance of ``DAGSTER_HOME`` (so ``make dev`` shows the runs, lineage, checks and partitions).

Dagster runs cannot mix an unpartitioned asset with a partitioned one, so the graph goes in three
waves, each a real Dagster run of the same definitions the UI uses:

1. the unpartitioned assets upstream of the cache (and the CE-only baseline, which needs no teacher);
   ``tokenized_parquet`` registers the ``data_shards`` partitions;
2. one run per ``logit_cache`` partition (what a backfill launches; here one after another, as the
   ``gpu`` pool would on one device);
3. the remaining students and ``eval_report`` with their checks.

``--skip-eval`` leaves out ``eval_report``. Any run that fails stops the demo with its error.
"""

from __future__ import annotations

import argparse
import sys
import time

import dagster as dg


def _run(defs: dg.Definitions, instance: dg.DagsterInstance, keys: list[str], partition: str | None = None) -> None:
    sel = [dg.AssetKey(k) for k in keys]
    job = defs.resolve_implicit_job_def_def_for_assets(sel)
    t0 = time.perf_counter()
    res = job.execute_in_process(instance=instance, asset_selection=sel, partition_key=partition, raise_on_error=False)
    what = ", ".join(keys) + (f" [{partition}]" if partition else "")
    if not res.success:
        failures = [e.message for e in res.all_events if e.is_failure]
        sys.exit(f"demo: the run of {what} failed (run {res.run_id[:8]}):\n" + "\n".join(failures[-3:]))
    print(f"demo: {what} in {time.perf_counter() - t0:.1f} s (run {res.run_id[:8]})", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill_dag.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-eval", action="store_true", help="leave eval_report out")
    a = ap.parse_args(argv)
    from distill_dag.assets.partitions import DATA_SHARDS
    from distill_dag.definitions import defs

    instance = dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    names = {k.to_user_string() for k in graph.get_all_asset_keys()}
    cache_up = {k.to_user_string() for k in graph.get(dg.AssetKey("logit_cache")).parent_keys}
    first = [n for n in ("raw_jsonl", "tokenizer", "tokenized_parquet", "teacher_adapters", "student_ce_baseline")
             if n in names and (n in cache_up or n in ("raw_jsonl", "tokenizer", "student_ce_baseline"))]
    t0 = time.perf_counter()
    _run(defs, instance, first)
    for key in instance.get_dynamic_partitions(DATA_SHARDS):
        _run(defs, instance, ["logit_cache"], partition=key)
    kd_up = {k.to_user_string() for k in graph.get(dg.AssetKey("student_ckpt")).parent_keys}
    last = (["student_aligned"] if "student_aligned" in kd_up else []) + ["student_ckpt"]
    last += [] if a.skip_eval else ["eval_report"]
    _run(defs, instance, last)
    print(f"demo: the whole graph in {time.perf_counter() - t0:.0f} s; `make dev` shows it at http://127.0.0.1:3000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
