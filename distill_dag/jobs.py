"""Jobs, the re-tokenization schedule and the new-raw-data sensor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from distill_dag.config import load_config
from distill_dag.io import sha256_json

retokenize_job = dg.define_asset_job(
    "retokenize",
    selection=dg.AssetSelection.assets("raw_jsonl", "tokenizer", "tokenized_parquet"),
    description="Gather raw JSONL and re-tokenize (skip_existing: only changed inputs are re-tokenized).",
)

student_job = dg.define_asset_job(
    "distill_student",
    selection=dg.AssetSelection.assets("student_ckpt").upstream(),
    description="Everything up to the student checkpoint.",
)


def _config_file() -> str:
    return os.environ.get("DISTILL_DAG_CONFIG", "demo.yaml")


def retokenize_schedule() -> dg.ScheduleDefinition:
    """Cron from ``data.retokenize_cron`` of the code location's config."""
    cron = load_config(_config_file()).data.retokenize_cron
    return dg.ScheduleDefinition(
        name="retokenize_schedule", job=retokenize_job, cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )


def raw_files_fingerprint(watch_dir: Path) -> dict[str, list[float]]:
    """``{relative path: [size, mtime]}`` of the JSONL files under ``watch_dir``."""
    if not watch_dir.is_dir():
        return {}
    out = {}
    for p in sorted(watch_dir.rglob("*.jsonl")):
        st = p.stat()
        out[str(p.relative_to(watch_dir))] = [st.st_size, st.st_mtime]
    return out


@dg.sensor(job=retokenize_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def new_raw_data_sensor(context: dg.SensorEvaluationContext):
    """Starts re-tokenization when ``data.watch_dir`` gains or changes JSONL files."""
    cfg = load_config(_config_file())
    if not cfg.data.watch_dir:
        return dg.SkipReason("data.watch_dir is not set in the config")
    watch = cfg.path(cfg.data.watch_dir)
    current = raw_files_fingerprint(watch)
    previous = json.loads(context.cursor) if context.cursor else {}
    if current == previous:
        return dg.SkipReason(f"no new or changed JSONL under {watch}")
    changed = sorted(k for k in current if previous.get(k) != current[k])
    context.update_cursor(json.dumps(current))
    if not changed:  # files were only removed
        return dg.SkipReason(f"JSONL files removed under {watch}; nothing new to tokenize")
    # a content key (not Python's per-process salted hash) so Dagster de-duplicates the same change
    return dg.RunRequest(run_key=f"raw-{sha256_json(current)[:16]}", tags={"changed_files": ",".join(changed[:20])})
