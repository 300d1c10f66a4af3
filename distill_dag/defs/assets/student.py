"""The students, one asset per model: the stage-1 aligned student (``student_aligned``), the KD student
(``student_ckpt``) and the CE-only baseline (``student_ce_baseline``), which needs no teacher.

``train.launcher: in_process`` trains inside the Dagster step (CPU demo, one GPU); ``torchrun`` launches
``torchrun --standalone --local-addr 127.0.0.1 --nproc-per-node N -m distill_dag.defs.pipes_worker``
through Dagster Pipes, which streams the logs and reports the same metadata back. Same core entry
points either way (``distill_dag.student.run``).

Which edges ``student_ckpt`` has follows the code location's config (``DISTILL_DAG_CONFIG``): the
``logit_cache`` partitions when ``train.teacher_mode`` is ``cached``, ``student_aligned`` when
``student.init`` is ``from_teacher``. A run whose config needs an edge the graph lacks is refused.
"""


import json
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from distill_dag.data.manifest import Manifest
from distill_dag.defs.assets.common import (
    config_metadata, location_config, md_image, resolve_config, rounded, table, upstream_path, stage_asset,
)
from distill_dag.defs.assets.data import tokenized_parquet, tokenizer
from distill_dag.defs.assets.partitions import DATA_SHARDS
from distill_dag.defs.assets.run_config import run_config
from distill_dag.defs.assets.teacher import logit_cache, require_teacher, teacher_adapters
from distill_dag.defs.resources import PipelineConfigResource, TeacherEndpointResource, WandbSettingsResource
from distill_dag.eval.plots import panels_png, training_panels
from distill_dag.io import sha256_file

GROUP = "student"
LOCATION = location_config()


def _loads_spec(asset: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        "loads_and_generates", asset=asset, blocking=True,
        description="The final folder loads with AutoModelForCausalLM, gives finite logits on a held-out row and "
                    "generates tokens. Blocking: a checkpoint that does not load is of no use downstream.")


def _final_version(final: Path) -> dg.DataVersion:

    return dg.DataVersion(sha256_file(final / "model.safetensors"))


def _prompt(cfg, n: int = 32) -> list[int]:
    """The first ``n`` attended tokens of the first val row (the generation check's prompt)."""
    import pyarrow.parquet as pq


    m = Manifest.load(cfg.tokenized_dir)
    shards = m.split_shards("val") or m.split_shards("train")
    row = pq.ParquetFile(m.shard_path(shards[0][1])).read_row_group(0, columns=["input_ids", "attention_mask"]).to_pylist()[0]
    return [t for t, a in zip(row["input_ids"], row["attention_mask"]) if a][:n]


def _check_loads(cfg, final: Path) -> dg.AssetCheckResult:
    from distill_dag.eval.smoke import loads_and_generates  # lazy: pulls torch; the code location is re-imported by every step

    ok, detail = loads_and_generates(final, _prompt(cfg))
    return dg.AssetCheckResult(check_name="loads_and_generates", passed=ok, description=detail)


_KINDS = {"path": dg.MetadataValue.path, "url": dg.MetadataValue.url, "json": dg.MetadataValue.json,
          "md": dg.MetadataValue.md, "int": dg.MetadataValue.int, "float": dg.MetadataValue.float,
          "bool": dg.MetadataValue.bool, "text": dg.MetadataValue.text}


def _train(context: dg.AssetExecutionContext, cfg, stage: str,
           pipes: dg.PipesSubprocessClient) -> tuple[dict[str, dg.MetadataValue], Path]:
    """Run one training stage (``kd`` or ``ce_only``) here, or under torchrun through the Pipes client resource."""
    if cfg.train.launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
                   "--nproc-per-node", str(cfg.train.nproc_per_node), "-m", "distill_dag.defs.pipes_worker"]
        invocation = pipes.run(
            context=context, command=command, extras={"config": cfg.model_dump(mode="json"), "stage": stage})
        mat = invocation.get_materialize_result()
        return dict(mat.metadata or {}), Path(str(mat.metadata["path"].value))
    from distill_dag.student.run import run_ce_baseline, run_kd_student, run_metadata  # lazy: pulls torch; the code location is re-imported by every step

    run = (run_kd_student if stage == "kd" else run_ce_baseline)(cfg, echo=context.log.info)
    return {k: _KINDS[kind](v) for k, (kind, v) in run_metadata(run).items()}, Path(run.final_dir)


@stage_asset("student_aligned", group=GROUP, owner="team:modeling", kinds={"pytorch"}, gpu=True,
    deps=[tokenized_parquet, teacher_adapters],
    description="Stage 1 of student.init: from_teacher: a RetNet built from the teacher's weights, its retention "
                "aligned to the teacher's attention outputs (held-out MSE before/after).",
    check_specs=[dg.AssetCheckSpec(
        "alignment_reduced_mse", asset="student_aligned",
        description="The aligned layers match the teacher's attention outputs better than the unaligned copy "
                    "(held-out relative MSE after < before, averaged over layers).")],
)
def student_aligned(context: dg.AssetExecutionContext, pipeline: PipelineConfigResource):
    from distill_dag.student.run import run_alignment  # lazy: pulls torch; the code location is re-imported by every step

    cfg = resolve_config(context, run_config(context), pipeline)
    upstream_path(context, "tokenized_parquet", cfg.tokenized_dir, "student_aligned")
    require_teacher(context, cfg, "student_aligned")
    al = run_alignment(cfg, echo=context.log.info)
    before, after = sum(al.rel_mse_before) / len(al.rel_mse_before), sum(al.rel_mse_after) / len(al.rel_mse_after)
    yield dg.MaterializeResult(
        data_version=_final_version(Path(al.final_dir)),
        metadata={
            "path": dg.MetadataValue.path(str(al.final_dir)),
            "steps": al.steps, "tokens": al.tokens, "reused": al.reused, "seconds": round(al.seconds, 1),
            "tensors_copied": len(al.conversion["mapping"]), "tensors_new": len(al.conversion["new_params"]),
            "per_layer": table([{"layer": i, "mse_before": b, "mse_after": a, "rel_mse_before": rb, "rel_mse_after": ra}
                                for i, (b, a, rb, ra) in enumerate(zip(al.mse_before, al.mse_after,
                                                                       al.rel_mse_before, al.rel_mse_after))]),
            **config_metadata(cfg, "student", "align"),
        },
    )
    yield dg.AssetCheckResult(check_name="alignment_reduced_mse", passed=bool(after < before),
                              description=f"mean held-out relative MSE {before:.4f} -> {after:.4f}")


if LOCATION.student.init != "from_teacher":
    # like student_hybrid: in the graph only when the code location's config uses it (student.init:
    # from_teacher), so "Materialize all" trains what the demo trains. Kept in a dict, which the module
    # loader does not scan, for tests that build it explicitly.
    UNUSED_ASSETS = {"student_aligned": student_aligned}
    del student_aligned


@stage_asset("student_ce_baseline", group=GROUP, owner="team:modeling", kinds={"pytorch", "wandb"}, gpu=True,
    deps=[tokenized_parquet, tokenizer],
    description="The CE-only student: the KD student's architecture, steps, tokens and data, without a teacher "
                "(the baseline that shows what distillation adds).",
    check_specs=[_loads_spec("student_ce_baseline")],
)
def student_ce_baseline(context: dg.AssetExecutionContext, pipeline: PipelineConfigResource,
                        wandb: WandbSettingsResource, pipes_subprocess_client: dg.PipesSubprocessClient):
    cfg = resolve_config(context, run_config(context), pipeline, wandb.overrides())
    upstream_path(context, "tokenized_parquet", cfg.tokenized_dir, "student_ce_baseline")
    metadata, final = _train(context, cfg, "ce_only", pipes_subprocess_client)
    metadata["loss_curves"] = _curves_md(context, metadata, "CE only", None)
    yield dg.MaterializeResult(data_version=_final_version(final),
                               metadata=rounded(metadata | config_metadata(cfg, "student", "train")))
    yield _check_loads(cfg, final)


_KD_DEPS: list[Any] = [tokenized_parquet, tokenizer, teacher_adapters]
if LOCATION.train.teacher_mode == "cached":
    _KD_DEPS.append(logit_cache)
if LOCATION.student.init == "from_teacher":
    _KD_DEPS.append(student_aligned)


def _require_edges(cfg) -> None:
    """Refuse a run that would read an asset the graph does not show as its upstream."""
    missing = []
    if cfg.train.teacher_mode == "cached" and not cfg.train.pretrain_ce_only and logit_cache not in _KD_DEPS:
        missing.append(("logit_cache", "train.teacher_mode: cached"))
    if cfg.student.init == "from_teacher" and LOCATION.student.init != "from_teacher":
        missing.append(("student_aligned", "student.init: from_teacher"))
    if missing:
        raise dg.Failure(description=(
            "student_ckpt: this run's config reads " + ", ".join(f"{a} ({why})" for a, why in missing) + ", but the "
            "code location's config (DISTILL_DAG_CONFIG) builds the graph without that edge, so the lineage would "
            "not show it. Set the same value in the code location's config file and reload the code location"
        ))


def _kd_inputs(context: dg.AssetExecutionContext, cfg, teacher_endpoint: TeacherEndpointResource, this: str,
               teacher_lineage: bool) -> None:
    """What a KD run reads, checked and recorded before it trains: the data, the finetuned teacher (when the
    run loads it), the cache partitions (cached mode); the endpoint's token exported for the network teacher."""
    upstream_path(context, "tokenized_parquet", cfg.tokenized_dir, this)
    if teacher_lineage:
        require_teacher(context, cfg, this)
    if cfg.train.teacher_mode == "cached":
        _require_cache_partitions(context, cfg)
    teacher_endpoint.export_token(cfg.teacher.token_env)

def _require_cache_partitions(context: dg.AssetExecutionContext, cfg) -> None:
    """Every data shard's logit_cache partition materialized, each where this run reads it."""
    from distill_dag.teacher.cache.layout import read_data_manifest, shard_dir  # lazy: pulls numpy; the code location is re-imported by every step

    keys = [s.key for s in read_data_manifest(cfg.tokenized_dir).shards]
    done = context.instance.get_materialized_partitions(dg.AssetKey("logit_cache"))
    registered = set(context.instance.get_dynamic_partitions(DATA_SHARDS))
    if not done and not registered:  # a cache written outside Dagster: the reader checks it shard by shard
        context.log.warning(f"logit_cache has no materialized partition in this instance; reading {cfg.cache_dir} as is")
        return
    missing = [k for k in keys if k not in done]
    if missing:
        raise dg.Failure(description=(
            f"student_ckpt (train.teacher_mode: cached) needs every logit_cache partition; {len(missing)} of {len(keys)} "
            f"are not materialized: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. Backfill them "
            f"(UI: logit_cache > Materialize > missing partitions) or `dagster asset materialize --select logit_cache "
            f"--partition {missing[0]} -m distill_dag.definitions`"
        ))
    for k in keys[:1] + keys[-1:]:  # where the partitions were written is where this run reads them
        upstream_path(context, "logit_cache", shard_dir(cfg.cache_dir, k), "student_ckpt", partition=k)


@stage_asset("student_ckpt", group=GROUP, owner="team:modeling", kinds={"pytorch", "wandb"}, gpu=True,
    deps=_KD_DEPS,
    description="The RetNet student trained by sparse top-k KL (+ CE) from the teacher: direct (teacher in the "
                "trainer), cached (the logit_cache partitions) or network (a served teacher).",
    check_specs=[_loads_spec("student_ckpt")],
)
def student_ckpt(context: dg.AssetExecutionContext, pipeline: PipelineConfigResource,
                 teacher_endpoint: TeacherEndpointResource, wandb: WandbSettingsResource,
                 pipes_subprocess_client: dg.PipesSubprocessClient):
    cfg = resolve_config(context, run_config(context), pipeline, teacher_endpoint.overrides(), wandb.overrides())
    _require_edges(cfg)
    _kd_inputs(context, cfg, teacher_endpoint, "student_ckpt", teacher_lineage=cfg.train.teacher_mode == "direct")
    metadata, final = _train(context, cfg, "kd", pipes_subprocess_client)
    url = wandb.log_checkpoint(_wandb_id(metadata), final, "student_ckpt")
    if url:
        metadata["wandb"] = dg.MetadataValue.url(url)
    # its own curves in its own metadata (not under a check's "Show Markdown"), beside the CE-only student's
    metadata["loss_curves"] = _curves_md(context, metadata, "KD", "student_ce_baseline")
    yield dg.MaterializeResult(data_version=_final_version(final),
                               metadata=rounded(metadata | config_metadata(cfg, "student", "train", "teacher")))
    yield _check_loads(cfg, final)


_HYBRID_DEPS: list[Any] = [tokenized_parquet, tokenizer, teacher_adapters]
if LOCATION.train.teacher_mode == "cached":
    _HYBRID_DEPS.append(logit_cache)


def student_hybrid_asset() -> dg.AssetsDefinition:
    """``student_hybrid``: in the graph only when the code location's config sets ``hybrid.enabled`` (the demo
    does), so "Materialize all" never trains a student the configuration does not ask for."""

    @stage_asset("student_hybrid", group=GROUP, owner="team:modeling", kinds={"pytorch", "wandb"}, gpu=True,
        deps=_HYBRID_DEPS,
        description="The hybrid student: converted from the teacher, the hybrid.* layers (listed, or chosen by KL "
                    "gain after alignment) kept as the teacher's softmax attention, the rest retention, then "
                    "trained like student_ckpt (same teacher mode, steps and tokens).",
        check_specs=[_loads_spec("student_hybrid")],
    )
    def student_hybrid(context: dg.AssetExecutionContext, pipeline: PipelineConfigResource,
                       teacher_endpoint: TeacherEndpointResource, wandb: WandbSettingsResource,
                       pipes_subprocess_client: dg.PipesSubprocessClient):
        from distill_dag.student.run import card_hybrid_facts, hybrid_config, run_alignment  # lazy: pulls torch; the code location is re-imported by every step

        cfg = resolve_config(context, run_config(context), pipeline, teacher_endpoint.overrides(), wandb.overrides())
        if not cfg.hybrid.enabled:
            raise dg.Failure(description="student_hybrid: this run's config has hybrid.enabled false; set it (and "
                                         "hybrid.attention_layers) to train the hybrid student")
        _kd_inputs(context, cfg, teacher_endpoint, "student_hybrid", teacher_lineage=True)  # converted from it
        hcfg = hybrid_config(cfg)
        al = run_alignment(hcfg, echo=context.log.info)  # stage 1 (+ the KL-guided choice), then KD
        metadata, final = _train(context, hcfg, "kd", pipes_subprocess_client)
        card_hybrid_facts(final, hcfg, al)
        gains = {"attention_layers": dg.MetadataValue.json(al.attention_layers)}
        if al.layer_gains:
            gains["layer_choice"] = table([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                           for r in al.layer_gains])
        metadata["loss_curves"] = _curves_md(context, metadata, "hybrid", "student_ckpt")
        yield dg.MaterializeResult(data_version=_final_version(final),
                                   metadata=rounded(metadata | gains | config_metadata(cfg, "hybrid", "train", "align")))
        yield _check_loads(cfg, final)

    return student_hybrid


if LOCATION.hybrid.enabled:
    student_hybrid = student_hybrid_asset()


def _wandb_id(metadata: dict[str, dg.MetadataValue]) -> str | None:
    v = metadata.get("wandb_id")
    return None if v is None else str(v.value)


# ---- KD vs CE-only, like beside like ------------------------------------------------------------
def _history(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _curves_md(context: Any, metadata: dict[str, dg.MetadataValue], name: str, beside: str | None) -> dg.MetadataValue:
    """This run's curves as a metadata image, like beside like (train CE, held-out CE, KL on its own axis),
    with ``beside``'s latest run (the CE-only student) on the same axes when it has one."""

    runs = {name: _history(Path(str(metadata["run_dir"].value)))}
    other = _latest_meta(context, beside) if beside else None
    if other and other.get("run_dir"):
        runs[{"student_ce_baseline": "CE only", "student_ckpt": "KD"}.get(beside, beside)] = _history(
            Path(str(other["run_dir"])))
    return md_image(panels_png(training_panels(runs), width=3.3, height=3.0), f"{name} loss curves")


def _latest_meta(context: Any, asset: str) -> dict[str, Any] | None:
    ev = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if ev is None or ev.asset_materialization is None:
        return None
    return {k: v.value for k, v in ev.asset_materialization.metadata.items()}


@dg.asset_check(
    asset=student_ckpt,
    additional_deps=[student_ce_baseline],
    description="At equal steps and tokens, the KD student's held-out cross-entropy is below the CE-only student's "
                "(a warning: KD that does not help is worth a look, not a stop). The plot sets train CE beside "
                "train CE, val CE beside val CE, and the KD term on its own axis.",
)
def kd_beats_ce_only(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:

    kd, ce = _latest_meta(context, "student_ckpt"), _latest_meta(context, "student_ce_baseline")
    if kd is None or ce is None:
        missing = "student_ckpt" if kd is None else "student_ce_baseline"
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   description=f"{missing} has not been materialized: nothing to compare")
    same = kd.get("tokens") == ce.get("tokens") and kd.get("steps") == ce.get("steps")
    hk, hc = _history(Path(str(kd["run_dir"]))), _history(Path(str(ce["run_dir"])))
    png = panels_png(training_panels({"KD": hk, "CE only": hc}), width=3.3, height=3.0)
    kd_val, ce_val = kd.get("val_loss"), ce.get("val_loss")
    passed = same and kd_val is not None and ce_val is not None and kd_val < ce_val
    detail = (f"held-out CE: KD {kd_val:.4f} vs CE-only {ce_val:.4f}" if same and None not in (kd_val, ce_val) else
              "held-out CE missing from a run's metadata" if same else
              f"not comparable: KD ran {kd.get('steps')} steps / {kd.get('tokens')} tokens, CE-only "
              f"{ce.get('steps')} / {ce.get('tokens')}")
    return dg.AssetCheckResult(
        passed=bool(passed), severity=dg.AssetCheckSeverity.WARN, description=detail,
        metadata=rounded({k: v for k, v in {"kd_val_loss": kd_val, "ce_only_val_loss": ce_val, "tokens": kd.get("tokens"),
                                            "comparison": md_image(png, "KD vs CE-only")}.items() if v is not None}),
    )
