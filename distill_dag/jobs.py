"""Jobs, the re-tokenization schedule and the new-raw-data sensor."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from distill_dag.assets.common import location_config
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
    selection=dg.AssetSelection.assets("student_aligned", "student_ce_baseline", "student_ckpt")
    | dg.AssetSelection.groups("student"),  # student_hybrid too, where the location's config enables it
    description="The students: stage-1 aligned (teacher-init), CE-only baseline, KD student (and the hybrid).",
)

eval_job = dg.define_asset_job(
    "evaluate", selection=dg.AssetSelection.assets("eval_report"),
    description="Perplexity, NIAH and long-context evaluation of the students against the teacher.",
)


def retokenize_schedule() -> dg.ScheduleDefinition:
    """Cron from ``data.retokenize_cron`` of the code location's config."""
    return dg.ScheduleDefinition(
        name="retokenize_schedule", job=retokenize_job, cron_schedule=location_config().data.retokenize_cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-tokenize on data.retokenize_cron (unchanged inputs are reused; unchanged shards keep their "
                    "data version, so nothing downstream turns stale).",
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


@dg.sensor(job=retokenize_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Starts re-tokenization when data.watch_dir gains or changes JSONL files.")
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
