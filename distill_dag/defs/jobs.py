"""Jobs, the re-tokenization schedule and the new-raw-data sensor."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from distill_dag.defs.assets.common import location_config
from distill_dag.io import sha256_json

retokenize_job = dg.define_asset_job(
    "retokenize",
    selection=dg.AssetSelection.assets("raw_jsonl", "tokenizer", "tokenized_parquet"),
    description="Gather raw JSONL and re-tokenize (skip_existing: only changed inputs are re-tokenized); "
                "registers the data_shards partitions of the new shards.",
)

teacher_job = dg.define_asset_job(
    "teacher", selection=dg.AssetSelection.assets("teacher_adapters"),
    description="Finetune the teacher on the tokenized data (LoRA, or full for tiny teachers).",
)

logit_cache_job = dg.define_asset_job(
    "logit_cache_shards", selection=dg.AssetSelection.assets("logit_cache"),
    description="One logit_cache partition per run; backfill it over data_shards to fan the cache out "
                "(the gpu pool keeps one run per GPU).",
)

student_job = dg.define_asset_job(
    "distill_students",
    # the group, not names: student_aligned and student_hybrid are in it only where the config uses them
    selection=dg.AssetSelection.groups("student"),
    description="The students the code location's config uses: CE-only baseline and KD student, plus the stage-1 "
                "aligned student (student.init: from_teacher) and the hybrid (hybrid.enabled).",
)

eval_job = dg.define_asset_job(
    "evaluate", selection=dg.AssetSelection.assets("eval_report"),
    description="Perplexity, NIAH and long-context evaluation of the students against the teacher.",
)


def _retokenize_schedule() -> dg.ScheduleDefinition:
    """Cron from ``data.retokenize_cron`` of the code location's config."""
    cron = location_config().data.retokenize_cron
    return dg.ScheduleDefinition(
        name="retokenize_schedule", job=retokenize_job, cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Re-tokenize on data.retokenize_cron ({cron}; unchanged inputs are reused; unchanged shards keep "
                    "their data version, so nothing downstream turns stale). Off until started on this page: it "
                    "starts stopped in every configuration.",
    )


retokenize_schedule = _retokenize_schedule()


def _sensor_description() -> str:
    """What the sensor does, and whether it can do anything in the code location's configuration."""
    watch = location_config().data.watch_dir
    state = (f"Active in this configuration once started: it watches {watch}." if watch else
             "INACTIVE in this configuration: data.watch_dir is not set in the code location's config "
             "(DISTILL_DAG_CONFIG), so every tick skips. Set data.watch_dir and reload the code location to use it.")
    return f"Starts re-tokenization when data.watch_dir gains or changes JSONL files. {state}"


def raw_files_fingerprint(watch_dir: Path) -> dict[str, list[float]]:
    """``{relative path: [size, mtime]}`` of the JSONL files under ``watch_dir``."""
    if not watch_dir.is_dir():
        return {}
    out = {}
    for p in sorted(watch_dir.rglob("*.jsonl")):
        st = p.stat()
        out[str(p.relative_to(watch_dir))] = [st.st_size, st.st_mtime]
    return out


@dg.sensor(job=retokenize_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description=_sensor_description())
def new_raw_data_sensor(context: dg.SensorEvaluationContext):
    """Starts re-tokenization when ``data.watch_dir`` gains or changes JSONL files."""
    cfg = location_config()
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
