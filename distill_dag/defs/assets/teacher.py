"""Teacher assets: the finetuned teacher (LoRA adapters, or a full finetune for tiny demo teachers) and
its top-k logit cache, one partition per data shard."""


from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from distill_dag.config import ConfigError
from distill_dag.defs.assets.common import config_metadata, resolve_config, upstream_path, stage_asset
from distill_dag.defs.assets.data import tokenized_parquet, tokenizer
from distill_dag.defs.assets.partitions import data_shards
from distill_dag.defs.assets.run_config import run_config
from distill_dag.defs.resources import PipelineConfigResource, TeacherEndpointResource

GROUP = "teacher"


def teacher_path(cfg) -> Path:
    """Where ``teacher_adapters`` writes the finetuned teacher: the core's rule."""
    from distill_dag.teacher.model import finetuned_output  # lazy: pulls torch; the code location is re-imported by every step

    return finetuned_output(cfg)


def require_teacher(context: dg.AssetExecutionContext, cfg, this: str) -> None:
    """The finetuned teacher's lineage, when the run uses it: always for a tiny demo teacher (no base
    model), else when a finetune exists; a configured base model without a finetune is used as is."""
    if cfg.teacher.model_name_or_path is None or teacher_path(cfg).exists():
        upstream_path(context, "teacher_adapters", teacher_path(cfg), this)


def refuse_adapter_without_base(cfg) -> None:
    """The core's rule (:func:`distill_dag.teacher.finetune.check_teacher_base`), before any work: a
    random-init teacher in lora mode writes an adapter on a base that is never saved (issue 32's backfill)."""
    from distill_dag.teacher.finetune import check_teacher_base  # lazy: pulls torch/numpy; the code location is re-imported by every step

    try:
        check_teacher_base(cfg)
    except ConfigError as err:
        raise dg.Failure(description=str(err)) from None


@stage_asset("teacher_adapters", group=GROUP, owner="team:modeling", kinds={"pytorch", "huggingface"}, gpu=True,
    deps=[tokenized_parquet, tokenizer],
    description="LoRA adapters of the teacher (or a full finetune for tiny teachers), with val perplexity before/after.",
    check_specs=[
        dg.AssetCheckSpec(
            "teacher_beats_base", asset="teacher_adapters", blocking=True,
            description="The finetuned teacher's held-out perplexity is below the base model's on the same val rows. "
                        "Blocking: a teacher worse than its base would only teach the student its damage."),
        dg.AssetCheckSpec(
            "meets_expected_improvement", asset="teacher_adapters",
            description="The relative held-out perplexity improvement reaches teacher_ft.expected_improvement "
                        "(a warning: the teacher is better, by less than planned)."),
    ],
)
def teacher_adapters(context: dg.AssetExecutionContext, pipeline: PipelineConfigResource):
    from distill_dag.teacher.finetune import finetune_teacher  # lazy: pulls torch/numpy; the code location is re-imported by every step

    cfg = resolve_config(context, run_config(context), pipeline)
    refuse_adapter_without_base(cfg)
    upstream_path(context, "tokenized_parquet", cfg.tokenized_dir, "teacher_adapters")  # the lineage, checked
    upstream_path(context, "tokenizer", cfg.tokenizer_dir, "teacher_adapters")
    m = finetune_teacher(cfg, log=context.log.info)
    final = Path(m["final_adapter"] or m["final_model"])
    metadata = {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) and v is not None}
    metadata["path"] = dg.MetadataValue.path(str(final))
    for k in ("final_adapter", "final_model", "merged_model"):
        if m.get(k):
            metadata[k] = dg.MetadataValue.path(str(m[k]))
    yield dg.MaterializeResult(data_version=dg.DataVersion(m["final_sha256"]),
                               metadata=metadata | config_metadata(cfg, "teacher", "teacher_ft"))
    ppl = {"val_ppl_before": m["val_ppl_before"], "val_ppl_after": m["val_ppl_after"]}
    yield dg.AssetCheckResult(
        check_name="teacher_beats_base", passed=bool(m["val_ppl_after"] < m["val_ppl_before"]), metadata=ppl,
        description=f"held-out perplexity {m['val_ppl_before']:.3f} (base) -> {m['val_ppl_after']:.3f} (finetuned)")
    yield dg.AssetCheckResult(
        check_name="meets_expected_improvement", passed=bool(m["meets_expected_improvement"]),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"relative_improvement": m["relative_improvement"], "expected": m["expected_improvement"]},
        description=f"relative improvement {m['relative_improvement']:.3f} vs expected {m['expected_improvement']:.3f}")


@stage_asset("logit_cache", group=GROUP, owner="team:modeling", kinds={"pytorch", "numpy", "duckdb"}, gpu=True,
    deps=[tokenized_parquet, teacher_adapters],
    partitions_def=data_shards,
    # no backfill_policy: a backfill then launches one plain single-partition run per shard (tag
    # dagster/partition). With BackfillPolicy.multi_run(1) each run was a one-key partition *range*, and Dagster
    # 1.13.27 records a check result of a range run without its partition: the per-partition check status stayed
    # "planned" and the UI showed cache_matches_data_shard "Skipped" after a backfill whose checks all passed
    description=(
        "The teacher's top-k log-probs for every row of one data shard (one partition per shard of "
        "tokenized_parquet), in fixed-size records for O(1) random access, with per-position DuckDB stats."
    ),
    # partitioned like the asset: each shard's check result belongs to that shard, so the UI shows check
    # status per partition and the summary after a parallel backfill is every partition's, not the last run's
    check_specs=[dg.AssetCheckSpec(
        "cache_matches_data_shard", asset="logit_cache", blocking=True, partitions_def=data_shards,
        description="The cache shard mirrors its data shard row for row: the same row count and data sha256, and "
                    "each record's tokens hash equals its data row's input ids. Blocking: a student would learn "
                    "the teacher's answers to other questions.")],
)
def logit_cache(context: dg.AssetExecutionContext, pipeline: PipelineConfigResource,
                teacher_endpoint: TeacherEndpointResource, duckdb: DuckDBResource):
    from distill_dag.teacher.cache import layout  # lazy: pulls torch/numpy; the code location is re-imported by every step
    from distill_dag.teacher.cache.reader import check_shard  # lazy: pulls torch/numpy; the code location is re-imported by every step
    from distill_dag.teacher.cache_stage import cache_shard, open_cache_teacher  # lazy: pulls torch/numpy; the code location is re-imported by every step
    from distill_dag.teacher.cache.stats import cache_stats  # lazy: pulls torch/numpy; the code location is re-imported by every step

    key = context.partition_key
    cfg = resolve_config(context, run_config(context), pipeline, teacher_endpoint.overrides())
    data = upstream_path(context, "tokenized_parquet", cfg.tokenized_dir, "logit_cache")
    require_teacher(context, cfg, "logit_cache")
    teacher_endpoint.export_token(cfg.teacher.token_env)
    teacher = open_cache_teacher(cfg, via="network" if cfg.train.teacher_mode == "network" else "direct")
    try:
        shard = cache_shard(cfg, key, teacher=teacher, log=context.log.info)
    finally:
        teacher.close()
    h = shard.header
    with duckdb.get_connection() as con:
        st = cache_stats([shard.dir / layout.STATS], con)
    rows_per_s = h["rows"] / shard.seconds if shard.seconds else None
    context.log.info(f"logit_cache {key}: {'reused' if shard.reused else 'written'} ({h['rows']} rows"
                     + (f", {rows_per_s:.1f} rows/s" if rows_per_s else "") + ")")
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(shard.data_version),
        metadata={
            "path": dg.MetadataValue.path(str(shard.dir)),
            "generation": dg.MetadataValue.path(str(shard.dir.resolve())),
            "data_shard": h["data_shard"],
            "dagster/row_count": h["rows"],
            "reused": shard.reused,
            "k": h["k"],
            "dtype": h["dtype"],
            "bytes": h["bytes"],
            "bytes_per_entry": h["bytes_per_entry"],
            "teacher_hash": h["teacher_hash"],
            "records_sha256": h["records_sha256"],
            "seconds": round(shard.seconds, 2),
            **({"rows_per_s": round(rows_per_s, 2)} if rows_per_s else {}),
            "mean_topk_mass": st["mean_topk_mass"],
            "mean_entropy_lb": st["mean_entropy_lb"],
            "mean_top1_prob": st["mean_top1_prob"],
            "coverage_histogram": dg.MetadataValue.json(st["coverage_histogram"]),
            **config_metadata(cfg, "logit_cache"),
        },
    )
    ok, detail = check_shard(cfg.cache_dir, data, key)
    yield dg.AssetCheckResult(check_name="cache_matches_data_shard", passed=ok, description=detail,
                              metadata={"data_shard": h["data_shard"], "rows": h["rows"]})
