"""The new-raw-data sensor starts re-tokenization when the watched folder gains or changes JSONL."""

from __future__ import annotations

import dagster as dg
import yaml

from distill_dag.definitions import defs
from distill_dag.defs.jobs import new_raw_data_sensor


def test_sensor_requests_a_run_for_new_or_changed_jsonl_only(tmp_path, monkeypatch):
    watch = tmp_path / "incoming"
    watch.mkdir()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"watch_dir": str(watch)}}))
    monkeypatch.setenv("DISTILL_DAG_CONFIG", str(cfg))
    instance = dg.DagsterInstance.ephemeral()

    def evaluate(cursor):
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
        return new_raw_data_sensor.evaluate_tick(ctx)

    empty = evaluate(None)
    assert not empty.run_requests
    (watch / "a.jsonl").write_text('{"text": "hello"}\n')
    first = evaluate(empty.cursor)
    assert len(first.run_requests) == 1 and first.run_requests[0].tags["changed_files"] == "a.jsonl"
    again = evaluate(first.cursor)
    assert not again.run_requests  # nothing changed since the last tick
    (watch / "a.jsonl").write_text('{"text": "hello"}\n{"text": "more"}\n')
    changed = evaluate(again.cursor)
    assert len(changed.run_requests) == 1
    assert changed.run_requests[0].run_key != first.run_requests[0].run_key
