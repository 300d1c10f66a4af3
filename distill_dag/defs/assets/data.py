"""Data assets: raw_jsonl -> tokenizer -> tokenized_parquet (which registers the data-shard partitions)."""


from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from distill_dag.data.manifest import Manifest
from distill_dag.data.sources import gather_sources
from distill_dag.defs.assets.common import config_metadata, resolve_config, table, upstream_path, stage_asset
from distill_dag.defs.assets.partitions import sync_data_shards
from distill_dag.defs.assets.run_config import run_config
from distill_dag.defs.resources import PipelineConfigResource
from distill_dag.io import sha256_dir

GROUP = "data"

# name -> (description, blocking): a blocking check's failure stops downstream steps of the same run
TOKENIZED_CHECKS = {
    "manifest_matches_files": (
        "The manifest lists exactly the shard files on disk, each with the size, sha256 and row count it records. "
        "Blocking: a consumer that trusts a wrong manifest trains on other data than its lineage says.", True),
    "tokenizer_matches_manifest": (
        "The shards were built with the tokenizer asset's current tokenizer (hash, vocabulary size). "
        "Blocking: ids of another tokenizer make the teacher, cache and students meaningless.", True),
    "rows_fit_max_seq_length": (
        "No packed row is longer than tokenize.max_seq_length, and a row's input_ids, attention_mask, labels and "
        "position_ids are equally long. Blocking: longer rows break the cache records and the model inputs.", True),
    "labels_aligned_with_input_ids": (
        "The label convention holds: labels[i] is input_ids[i] or -100 (not shifted), and -100 wherever "
        "attention_mask is 0; every loss shifts once itself.", False),
}


@stage_asset("raw_jsonl", group=GROUP, owner="team:data", kinds={"python", "jsonl"},
    description="The configured sources (local JSONL, Hugging Face datasets, the stdlib demo corpus) as JSONL.",
)
def raw_jsonl(context: dg.AssetExecutionContext, pipeline: PipelineConfigResource) -> dg.MaterializeResult:

    cfg = resolve_config(context, run_config(context), pipeline)
    per_source = gather_sources(cfg)
    rows = [
        {"source": name, "kind": r.get("kind"), "rows": r["rows"], "bytes": r["bytes"], "rejects": r["rejects"]}
        for name, r in per_source.items()
    ]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(sha256_dir(cfg.raw_dir)),
        metadata={
            "path": dg.MetadataValue.path(str(cfg.raw_dir)),
            "dagster/row_count": sum(r["rows"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "rejects": sum(r["rejects"] for r in rows),
            "sources": table(rows),
            **config_metadata(cfg, "data"),
        },
    )


@stage_asset("tokenizer", group=GROUP, owner="team:data", kinds={"huggingface"},
    deps=[raw_jsonl],
    description="The tokenizer: a hub/local one, or (demo) a byte-level BPE trained on raw_jsonl.",
)
def tokenizer(context: dg.AssetExecutionContext, pipeline: PipelineConfigResource) -> dg.MaterializeResult:
    from distill_dag.data.tokenizer import load_tokenizer, resolve_tokenizer  # lazy: pulls tokenizers/pyarrow/duckdb; the code location is re-imported by every step

    cfg = resolve_config(context, run_config(context), pipeline)
    raw = upstream_path(context, "raw_jsonl", cfg.raw_dir, "tokenizer") if not cfg.tokenizer.name_or_path else cfg.raw_dir
    path, digest = resolve_tokenizer(cfg, raw, cfg.tokenizer_dir)
    tok = load_tokenizer(path)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(digest),
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "tokenizer_hash": digest,
            "name": cfg.tokenizer.name_or_path or "bpe (trained on raw_jsonl)",
            "vocab_size": len(tok),
            "eos_token": str(tok.eos_token),
            **config_metadata(cfg, "tokenizer"),
        },
    )


SHARD_COLUMNS = dg.TableSchema(columns=[
    dg.TableColumn("input_ids", "list<int32>", description="token ids, packed documents, padded to max_seq_length"),
    dg.TableColumn("attention_mask", "list<int8>", description="1 on tokens, 0 on padding"),
    dg.TableColumn("labels", "list<int32>", description="input_ids[i] or -100 (unshifted; each loss shifts once)"),
    dg.TableColumn("position_ids", "list<int32>", description="restart at 0 at each document start"),
    dg.TableColumn("source", "string", description="the source of the row's first document"),
])


@stage_asset("tokenized_parquet", group=GROUP, owner="team:data", kinds={"parquet", "duckdb"},
    deps=[raw_jsonl, tokenizer],
    description=(
        "Packed fixed-length rows (input_ids, attention_mask, labels, position_ids) in parquet shards + manifest.json. "
        "Registers one data_shards partition per shard (and removes those of shards that are gone)."
    ),
    check_specs=[dg.AssetCheckSpec(name, asset="tokenized_parquet", description=d, blocking=b)
                 for name, (d, b) in TOKENIZED_CHECKS.items()],
)
def tokenized_parquet(context: dg.AssetExecutionContext, pipeline: PipelineConfigResource,
                      duckdb: DuckDBResource):
    from distill_dag.data import stats  # lazy: pulls tokenizers/pyarrow/duckdb; the code location is re-imported by every step
    from distill_dag.data.pack import tokenize_stage  # lazy: pulls tokenizers/pyarrow/duckdb; the code location is re-imported by every step
    from distill_dag.data.tokenizer import tokenizer_hash  # lazy: pulls tokenizers/pyarrow/duckdb; the code location is re-imported by every step

    cfg = resolve_config(context, run_config(context), pipeline)
    raw = upstream_path(context, "raw_jsonl", cfg.raw_dir, "tokenized_parquet")
    tok_dir = upstream_path(context, "tokenizer", cfg.tokenizer_dir, "tokenized_parquet")
    summary = tokenize_stage(cfg, inputs=raw, tokenizer_dir=tok_dir, log=context.log.info)
    manifest = Manifest.load(cfg.tokenized_dir)
    added, removed = sync_data_shards(context.instance, [Path(s.path).stem for s in manifest.shards])
    context.log.info(f"data_shards partitions: {len(manifest.shards)} ({len(added)} added, {len(removed)} removed)")
    with duckdb.get_connection() as con:
        data_stats = stats.as_metadata(stats.data_stats(cfg.tokenized_dir, con=con))
        checks = stats.run_checks(cfg.tokenized_dir, con=con)
    tok_hash = tokenizer_hash(tok_dir)
    checks["tokenizer_matches_manifest"] = (
        manifest.tokenizer_hash == tok_hash,
        f"manifest tokenizer hash {manifest.tokenizer_hash[:12]} vs tokenizer asset {tok_hash[:12]}",
    )
    totals = summary.get("totals", {})
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(manifest.data_version),
        metadata={
            "path": dg.MetadataValue.path(str(cfg.tokenized_dir)),
            "data_version": manifest.data_version,
            "tokenizer_hash": manifest.tokenizer_hash,
            "max_seq_length": manifest.max_seq_length,
            "shards": len(manifest.shards),
            "dagster/row_count": sum(s.rows for s in manifest.shards),
            "dagster/column_schema": SHARD_COLUMNS,
            "tokens": sum(s.tokens for s in manifest.shards),
            "tokenized_inputs": len(summary.get("tokenized", [])),
            "reused_inputs": len(summary.get("reused", [])),
            "rejects": summary.get("rejects", 0),
            "rejects_file": dg.MetadataValue.path(str(summary.get("rejects_file", cfg.tokenized_dir / "rejects.jsonl"))),
            "splits": table([{"split": k, **v} for k, v in totals.items() if isinstance(v, dict)]),
            "shard_files": table([{"shard": Path(s.path).stem, "split": s.split, "rows": s.rows, "tokens": s.tokens,
                                   "bytes": s.bytes, "sha256": s.sha256[:16]} for s in manifest.shards[:200]]),
            "documents": data_stats["documents"],
            "masked_label_fraction": data_stats["masked_label_fraction"],
            "duplicate_document_rate": data_stats["duplicate_document_rate"],
            "mean_document_length": data_stats["mean_document_length"],
            "tokens_per_source": table(data_stats["tokens_per_source"]),
            "sequence_length_histogram": table(data_stats["sequence_length_histogram"]),
            "document_length_histogram": table(data_stats["document_length_histogram"]),
            **config_metadata(cfg, "tokenize"),
        },
    )
    for name in TOKENIZED_CHECKS:
        passed, description = checks[name]
        yield dg.AssetCheckResult(check_name=name, passed=bool(passed), description=description,
                                  metadata={"detail": description})
