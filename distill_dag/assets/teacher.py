"""Teacher assets: finetuned teacher (LoRA adapters, or a full finetune for tiny demo teachers) and
the teacher's top-k logit cache."""

import dagster as dg

from distill_dag.assets.common import pipeline_config, require_upstream
from distill_dag.assets.data import tokenized_parquet, tokenizer
from distill_dag.assets.run_config import DistillRunConfig
from distill_dag.resources import PipelineConfigResource, TeacherEndpointResource

GROUP = "teacher"


@dg.asset(
    deps=[tokenized_parquet, tokenizer],
    group_name=GROUP,
    kinds={"pytorch", "huggingface"},
    owners=["team:modeling"],
    code_version="teacher-ft-1",
    pool="gpu",
    description="LoRA adapters of the teacher (or a full finetune for tiny teachers), with val perplexity before/after.",
)
def teacher_adapters(context: dg.AssetExecutionContext, config: DistillRunConfig, pipeline: PipelineConfigResource) -> dg.MaterializeResult:
    from distill_dag.distill.teacher_finetune import finetune_teacher

    cfg = pipeline_config(config, pipeline)
    require_upstream(cfg.tokenized_dir / "manifest.json", "tokenized_parquet", "teacher_adapters")
    m = finetune_teacher(cfg, cfg.tokenized_dir, cfg.teacher_ft_dir, tokenizer_dir=cfg.tokenizer_dir, log=context.log.info)
    metadata = {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) and v is not None}
    for k in ("final_adapter", "final_model", "merged_model"):
        if m.get(k):
            metadata[k] = dg.MetadataValue.path(str(m[k]))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[tokenized_parquet, teacher_adapters],
    group_name=GROUP,
    kinds={"pytorch", "duckdb"},
    owners=["team:modeling"],
    code_version="logit-cache-1",
    pool="gpu",
    description="The teacher's top-k log-probs per token, in shards mirroring tokenized_parquet row for row.",
)
def logit_cache(
    context: dg.AssetExecutionContext,
    config: DistillRunConfig,
    pipeline: PipelineConfigResource,
    teacher_endpoint: TeacherEndpointResource,
) -> dg.MaterializeResult:
    from distill_dag.distill.logit_cache import build_logit_cache

    cfg = pipeline_config(config, pipeline, teacher_endpoint.overrides())
    require_upstream(cfg.tokenized_dir / "manifest.json", "tokenized_parquet", "logit_cache")
    teacher_endpoint.export_token(cfg.teacher.token_env)
    summary = build_logit_cache(cfg, log=context.log.info)
    metadata = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
    metadata["path"] = dg.MetadataValue.path(str(cfg.cache_dir))
    for k, v in summary.items():
        if isinstance(v, (dict, list)):
            metadata[k] = dg.MetadataValue.json(v)
    return dg.MaterializeResult(metadata=metadata)
