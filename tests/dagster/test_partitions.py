"""The DAG owns the work: logit_cache partitions (one per data shard) fanned out by Dagster, content
data versions that drive staleness, and run config refused at launch.

One module-scoped Dagster instance (a DAGSTER_HOME in a temp folder) runs the real code location
(`distill_dag.definitions`) on a tiny config: stdlib text, a 512-token BPE, a 2-layer teacher. Runs
launched as separate processes (`dagster asset materialize --partition`) share that instance, as a
backfill's runs do under a run launcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from distill_dag.io import sha256_file

MATERIALIZE = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "distill_dag.definitions"]


def _cfg(root: Path, **teacher_ft) -> dict:
    return {
        "base": "demo.yaml",
        "data": {"root": str(root / "data"), "sources": [{"name": "stdlib", "kind": "stdlib", "max_bytes": 100_000}]},
        "tokenizer": {"vocab_size": 512},
        "tokenize": {"max_seq_length": 64, "rows_per_shard": 320, "val_fraction": 0.1},
        "teacher": {"init_tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "num_key_value_heads": 1}},
        "teacher_ft": {"max_steps": 4, "copy_warmup_steps": 0, "pass_key_rows_per_batch": 0, "eval_interval": 2,
                       "save_interval": 2, "eval_batches": 2, "batch_size": 4,
                       "warmup_steps": 1, "output_dir": str(root / "runs" / "teacher_ft"), **teacher_ft},
        "logit_cache": {"k": 8, "dir": str(root / "data" / "logit_cache"), "batch_rows": 16},
        "student": {"variant": "tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "intermediate_size": 64},
                    "chunk_size": 16},
        "train": {"teacher_mode": "cached", "teacher_topk": 8, "max_steps": 2, "batch_size": 4, "warmup_steps": 1,
                  "eval_interval": 2, "eval_batches": 1, "save_interval": 0, "log_interval": 1, "device": "cpu",
                  "output_dir": str(root / "runs" / "student")},
        "wandb": {"mode": "disabled"},
    }


def _write(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The instance, config and definitions, with the unpartitioned upstream materialized."""
    root = tmp_path_factory.mktemp("site")
    home = root / "dagster_home"
    home.mkdir()
    cfg = _write(root / "cfg.yaml", _cfg(root))
    old = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "DISTILL_DAG_CONFIG")}
    os.environ.update(DAGSTER_HOME=str(home), DISTILL_DAG_CONFIG=str(cfg))
    from distill_dag.definitions import defs

    instance = dg.DagsterInstance.get()
    resources = dict(defs.resources)
    resources["pipeline"] = type(resources["pipeline"])(config_file=str(cfg))
    site = {"root": root, "home": home, "cfg": cfg, "instance": instance, "defs": defs, "resources": resources,
            "env": dict(os.environ, OMP_NUM_THREADS="1", DAGSTER_HOME=str(home), DISTILL_DAG_CONFIG=str(cfg))}
    assert _materialize(site, ["raw_jsonl", "tokenizer", "tokenized_parquet", "teacher_adapters"]).success
    yield site
    instance.dispose()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _materialize(site, keys, partition=None, run_config=None):
    defs = site["defs"]
    return dg.materialize([*defs.assets, *defs.asset_checks], selection=keys, instance=site["instance"],
                          resources=site["resources"], partition_key=partition, run_config=run_config,
                          raise_on_error=False)


def _keys(site) -> list[str]:
    return site["instance"].get_dynamic_partitions("data_shards")


def _cached(root: Path) -> dict[str, str]:
    return {p.parent.name.rsplit("-", 1)[0]: sha256_file(p) for p in sorted(root.glob(".gen/*/records.npy"))}


def _child(site, *args):
    return subprocess.Popen([*MATERIALIZE, *args], env=site["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=site["root"])


def test_tokenized_parquet_registers_one_partition_per_data_shard(site):
    from distill_dag.data.manifest import Manifest

    m = Manifest.load(site["root"] / "data" / "tokenized")
    assert sorted(_keys(site)) == sorted(Path(s.path).stem for s in m.shards) and len(m.shards) >= 3


def test_two_partition_runs_at_once_equal_one_process_and_a_killed_one_reruns_alone(site):
    keys = _keys(site)
    a, b, victim = keys[0], keys[1], keys[-1]
    runs = [_child(site, "--select", "logit_cache", "--partition", k) for k in (a, b)]  # concurrently
    for r in runs:
        out = r.communicate(timeout=600)[0]
        assert r.returncode == 0, out[-4000:]
    done = site["instance"].get_materialized_partitions(dg.AssetKey("logit_cache"))
    assert {a, b} <= done and victim not in done

    # a partition run killed mid-shard: nothing published, the partition stays missing, the others untouched
    cache = site["root"] / "data" / "logit_cache"
    before = _cached(cache)
    r = _child(site, "--select", "logit_cache", "--partition", victim)
    deadline = time.time() + 300
    while not (cache / ".build" / victim / "records.npy").exists() and time.time() < deadline and r.poll() is None:
        time.sleep(0.05)
    os.killpg(r.pid, signal.SIGKILL)
    r.communicate()
    assert victim not in site["instance"].get_materialized_partitions(dg.AssetKey("logit_cache"))
    assert not (cache / victim).exists() and _cached(cache) == before
    rest = [k for k in keys if k not in (a, b)]
    for k in rest:  # the killed one (and the never-run ones) rerun alone, each its own run
        assert _materialize(site, ["logit_cache"], partition=k).success
    assert site["instance"].get_materialized_partitions(dg.AssetKey("logit_cache")) == set(keys)

    # one process, same teacher: byte-identical shards
    from distill_dag.config import load_config
    from distill_dag.teacher.cache_stage import build_logit_cache

    cfg = load_config(site["cfg"], {"logit_cache": {"dir": str(site["root"] / "one_process")}})
    build_logit_cache(cfg, log=lambda _: None)
    assert _cached(cache) == _cached(site["root"] / "one_process") and len(_cached(cache)) == len(keys)


def test_cache_partitions_carry_data_versions_and_pass_their_checks(site):
    inst = site["instance"]
    for k in _keys(site)[:2]:
        if k not in inst.get_materialized_partitions(dg.AssetKey("logit_cache")):  # when run on its own
            assert _materialize(site, ["logit_cache"], partition=k).success
        ev = inst.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("logit_cache"),
                                                               asset_partitions=[k]), limit=1).records[0].event_log_entry
        mat = ev.asset_materialization
        from distill_dag.teacher.cache.layout import read_shard_header

        assert mat.tags["dagster/data_version"] == read_shard_header(site["root"] / "data" / "logit_cache", k)["data_version"]
    key = dg.AssetCheckKey(dg.AssetKey("logit_cache"), "cache_matches_data_shard")
    record = inst.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert record.event.asset_check_evaluation.passed


STALE = """
query($key: AssetKeyInput!, $partition: String) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode { staleStatus(partition: $partition)
                                                        staleCauses(partition: $partition) { reason } } }
}"""


def _stale(workspace, asset, partition=None):
    from dagster_graphql.test.utils import execute_dagster_graphql

    # a new request context per query, as the webserver makes per HTTP request (its loaders cache)
    r = execute_dagster_graphql(workspace.create_request_context(), STALE, {"key": {"path": [asset]}, "partition": partition})
    assert not r.errors, r.errors
    node = r.data["assetNodeOrError"]
    return node["staleStatus"], [c["reason"] for c in node["staleCauses"]]


def test_staleness_follows_content_versions(site):
    from dagster_graphql.test.utils import define_out_of_process_workspace

    keys = _keys(site)
    if site["instance"].get_materialized_partitions(dg.AssetKey("logit_cache")) != set(keys):
        for k in keys:
            assert _materialize(site, ["logit_cache"], partition=k).success
    assert _materialize(site, ["student_ce_baseline", "student_ckpt"]).success
    defs_file = str(Path(__import__("distill_dag.definitions").definitions.__file__))
    with define_out_of_process_workspace(defs_file, None, site["instance"]) as ctx:
        assert _stale(ctx, "student_ckpt")[0] == "FRESH"
        assert all(_stale(ctx, "logit_cache", k)[0] == "FRESH" for k in keys)
        # the same data again: same data version, nothing downstream turns stale
        assert _materialize(site, ["tokenized_parquet"]).success
        assert _stale(ctx, "student_ckpt")[0] == "FRESH"
        assert all(_stale(ctx, "logit_cache", k)[0] == "FRESH" for k in keys)
        # a teacher trained differently: every cache partition and the KD student are stale
        rc = {"ops": {"teacher_adapters": {"config": {"teacher_ft": {"learning_rate": 0.0003}}}}}
        assert _materialize(site, ["teacher_adapters"], run_config=rc).success
        for k in keys:
            status, causes = _stale(ctx, "logit_cache", k)
            assert status == "STALE" and causes, causes  # "has a new data version" (of teacher_adapters)
        assert _stale(ctx, "student_ckpt")[0] == "STALE"
        assert _stale(ctx, "student_ce_baseline")[0] == "FRESH"  # it needs no teacher


def test_invalid_launchpad_value_is_refused_before_the_run_starts(site):
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql, infer_job_selector

    q = """query($selector: PipelineSelector!, $runConfigData: RunConfigData) {
      isPipelineConfigValid(pipeline: $selector, runConfigData: $runConfigData, mode: "default") {
        __typename ... on RunConfigValidationInvalid { errors { message } } } }"""
    defs_file = str(Path(__import__("distill_dag.definitions").definitions.__file__))
    with define_out_of_process_context(defs_file, None, site["instance"]) as ctx:
        sel = infer_job_selector(ctx, "distill_students")
        bad = {"ops": {"student_ckpt": {"config": {"train": {"teacher_mode": "bogus"}}}}}
        r = execute_dagster_graphql(ctx, q, {"selector": sel, "runConfigData": bad})
        res = r.data["isPipelineConfigValid"]
        assert res["__typename"] == "RunConfigValidationInvalid"
        assert any("bogus" in e["message"] and "teacher_mode" in e["message"] for e in res["errors"]), res
        good = {"ops": {"student_ckpt": {"config": {"train": {"teacher_mode": "network"}}}}}
        assert execute_dagster_graphql(ctx, q, {"selector": sel, "runConfigData": good}).data[
            "isPipelineConfigValid"]["__typename"] == "PipelineConfigValidationValid"
    with pytest.raises(dg.DagsterInvalidConfigError, match="bogus"):  # in process too: before any step
        site["defs"].resolve_job_def("distill_students").execute_in_process(
            instance=site["instance"], run_config={"ops": {"student_ckpt": {"config": {"train": {"teacher_mode": "bogus"}}}}})
