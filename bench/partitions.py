"""Partitions at scale: loading the code location and querying logit_cache's partition status with
N registered data-shard keys (half of them materialized), against the same with 10 keys.

    python bench/partitions.py            # N = 5000 (the issue's scale; goal: each <= 5 s)
    python bench/partitions.py --quick    # N = 200, seconds (the test suite runs this)

``load_s``: a fresh interpreter imports ``distill_dag.definitions`` and validates it
(``Definitions.validate_loadable``: the asset graph, checks, jobs, partitions), timed inside the
process (the interpreter's own start is not ours); then the webserver's GraphQL repository query over
a code server of the same file (dynamic partition keys included). ``status_s``: the GraphQL
``assetPartitionStatuses`` of ``logit_cache`` (what the UI's partition bar draws) plus
``instance.get_materialized_partitions``. Materializations are recorded as runless events
(``report_runless_asset_event``), so nothing is computed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:  # python -m bench.partitions
    from bench._common import ROOT, bench_parser
else:  # python bench/partitions.py, from any folder: bench/ is sys.path[0]
    from _common import ROOT, bench_parser

STATUS = """
query { assetNodeOrError(assetKey: {path: ["logit_cache"]}) { ... on AssetNode {
  assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } } } } }"""
REPO = """
query { repositoriesOrError { ... on RepositoryConnection { nodes { name assetNodes { assetKey { path } } } } } }"""


def _site(n: int) -> dict:
    import dagster as dg  # lazy: --help without dagster

    home = Path(tempfile.mkdtemp(prefix=f"bench-partitions-{n}-"))
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    instance = dg.DagsterInstance.get()
    keys = [f"train-{i:05d}" for i in range(n)]
    instance.add_dynamic_partitions("data_shards", keys)
    for k in keys[::2]:
        instance.report_runless_asset_event(dg.AssetMaterialization("logit_cache", partition=k))
    return {"instance": instance, "keys": keys, "home": home}


def _measure(n: int) -> dict[str, float]:
    import dagster as dg  # lazy: --help without dagster
    from dagster_graphql.test.utils import define_out_of_process_workspace, execute_dagster_graphql

    site = _site(n)
    inst = site["instance"]
    code = ("import time; t = time.perf_counter(); import dagster as dg; from distill_dag.definitions import defs; "
            "dg.Definitions.validate_loadable(defs); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    load_s = float(out.stdout.strip().splitlines()[-1])
    with define_out_of_process_workspace(str(ROOT / "distill_dag" / "definitions.py"), None, inst) as ws:
        t0 = time.perf_counter()
        r = execute_dagster_graphql(ws.create_request_context(), REPO)
        assert not r.errors, r.errors
        load_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        r = execute_dagster_graphql(ws.create_request_context(), STATUS)
        assert not r.errors, r.errors
        ranges = r.data["assetNodeOrError"]["assetPartitionStatuses"]["materializedPartitions"]
        done = inst.get_materialized_partitions(dg.AssetKey("logit_cache"))
        status_s = time.perf_counter() - t1
    assert len(done) == (n + 1) // 2 and ranges, (len(done), n)
    inst.dispose()
    shutil.rmtree(site["home"], ignore_errors=True)  # the instance's storage: this bench's only files
    return {"load_s": load_s, "status_s": status_s}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__.split("\n\n")[0], quick="200 keys instead of 5000")
    ap.add_argument("--keys", type=int, default=None)
    a = ap.parse_args(argv)
    n = a.keys or (200 if a.quick else 5000)
    base, big = _measure(10), _measure(n)
    budget = 5.0
    print(f"keys=10   load_s={base['load_s']:.2f} status_s={base['status_s']:.2f}")
    print(f"keys={n} load_s={big['load_s']:.2f} status_s={big['status_s']:.2f}")
    for k in ("load_s", "status_s"):
        print(f"ratio {k} keys={n}/keys=10: {big[k] / base[k]:.2f}   budget ratio ({k} / {budget:g} s): "
              f"{big[k] / budget:.2f} {'ok' if big[k] <= budget else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
