"""Data assets: raw_jsonl -> tokenizer -> tokenized_parquet, with DuckDB stats and asset checks."""

import dagster as dg

from distill_dag.assets.common import md_table, pipeline_config, require_upstream
from distill_dag.assets.run_config import DistillRunConfig
from distill_dag.resources import DuckDBResource, PipelineConfigResource

GROUP = "data"


@dg.asset(
    group_name=GROUP,
    kinds={"python", "jsonl"},
    owners=["team:data"],
    code_version="raw-1",
    description="The configured sources (local JSONL, Hugging Face datasets, the stdlib demo corpus) as JSONL.",
)
def raw_jsonl(context: dg.AssetExecutionContext, config: DistillRunConfig, pipeline: PipelineConfigResource) -> dg.MaterializeResult:
    from distill_dag.data.sources import gather_sources

    cfg = pipeline_config(config, pipeline)
    per_source = gather_sources(cfg)
    rows = [
        {"source": name, "kind": r.get("kind"), "rows": r["rows"], "bytes": r["bytes"], "rejects": r["rejects"]}
        for name, r in per_source.items()
    ]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(cfg.raw_dir)),
            "rows": sum(r["rows"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "rejects": sum(r["rejects"] for r in rows),
            "sources": md_table(rows),
        }
    )


@dg.asset(
    deps=[raw_jsonl],
    group_name=GROUP,
    kinds={"huggingface"},
    owners=["team:data"],
    code_version="tokenizer-1",
    description="The tokenizer: a hub/local one, or (demo) a byte-level BPE trained on raw_jsonl.",
)
def tokenizer(context: dg.AssetExecutionContext, config: DistillRunConfig, pipeline: PipelineConfigResource) -> dg.MaterializeResult:
    from distill_dag.data.tokenizer import load_tokenizer, resolve_tokenizer

    cfg = pipeline_config(config, pipeline)
    if not cfg.tokenizer.name_or_path:
        require_upstream(cfg.raw_dir, "raw_jsonl", "tokenizer")
    path, digest = resolve_tokenizer(cfg, cfg.raw_dir, cfg.tokenizer_dir)
    tok = load_tokenizer(path)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "tokenizer_hash": digest,
            "name": cfg.tokenizer.name_or_path or "bpe (trained on raw_jsonl)",
            "vocab_size": len(tok),
            "eos_token": str(tok.eos_token),
        }
    )


@dg.asset(
    deps=[raw_jsonl, tokenizer],
    group_name=GROUP,
    kinds={"parquet", "duckdb"},
    owners=["team:data"],
    code_version="pack-1",
    description="Packed fixed-length sequences (input_ids, attention_mask, labels, position_ids) + manifest.json.",
    check_specs=[
        dg.AssetCheckSpec("rows_fit_max_seq_length", asset="tokenized_parquet"),
        dg.AssetCheckSpec("labels_aligned_with_input_ids", asset="tokenized_parquet"),
        dg.AssetCheckSpec("manifest_matches_files", asset="tokenized_parquet"),
    ],
)
def tokenized_parquet(
    context: dg.AssetExecutionContext,
    config: DistillRunConfig,
    pipeline: PipelineConfigResource,
    duckdb: DuckDBResource,
):
    from distill_dag.data import stats
    from distill_dag.data.pack import tokenize_to_parquet
    from distill_dag.data.tokenizer import tokenizer_hash

    cfg = pipeline_config(config, pipeline)
    require_upstream(cfg.raw_dir, "raw_jsonl", "tokenized_parquet")
    require_upstream(cfg.tokenizer_dir, "tokenizer", "tokenized_parquet")
    t = cfg.tokenize
    summary = tokenize_to_parquet(
        cfg.raw_dir, cfg.tokenized_dir, cfg.tokenizer_dir, t.max_seq_length,
        val_fraction=t.val_fraction, rows_per_shard=t.rows_per_shard, skip_existing=t.skip_existing,
        force=t.force, mask_prompt=t.mask_prompt, max_reject_rate=cfg.data.max_reject_rate,
        tokenizer_hash=tokenizer_hash(cfg.tokenizer_dir),
    )
    context.log.info(
        f"tokenized {len(summary['tokenized'])} input(s), reused {len(summary['reused'])}; up_to_date={summary['up_to_date']}"
    )
    with duckdb.connect() as con:
        data_stats = stats.data_stats(cfg.tokenized_dir, con=con)
        checks = stats.run_checks(cfg.tokenized_dir, con=con)
    totals = summary.get("totals", {})
    yield dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(cfg.tokenized_dir)),
            "tokenizer_hash": summary["tokenizer_hash"],
            "max_seq_length": summary["max_seq_length"],
            "shards": len(summary["shards"]),
            "rows": sum(s["rows"] for s in summary["shards"]),
            "tokens": sum(s["tokens"] for s in summary["shards"]),
            "tokenized_inputs": len(summary["tokenized"]),
            "reused_inputs": len(summary["reused"]),
            "rejects": summary["rejects"],
            "rejects_file": dg.MetadataValue.path(summary["rejects_file"]),
            "totals": dg.MetadataValue.json(totals),
            **{k: dg.MetadataValue.md(v) if isinstance(v, str) else v for k, v in stats.as_metadata(data_stats).items()},
        }
    )
    for name, (passed, description) in checks.items():
        yield dg.AssetCheckResult(check_name=name, passed=bool(passed), description=description)
