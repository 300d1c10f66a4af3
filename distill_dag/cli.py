"""``distill``: the plain CLI, with the same stages as the Dagster assets.

Each subcommand has one ``_add_<name>`` function that declares its flags and sets ``func``; the
work itself is done by the core modules (imported lazily so ``distill --help`` stays fast).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from distill_dag.config import ConfigError, PipelineConfig, load_config


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML under configs/ or a path (default: configs/demo.yaml)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: CUDA when present")


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    overrides = dict(overrides or {})
    if getattr(args, "device", None):
        overrides.setdefault("train", {})["device"] = args.device
    return load_config(args.config, overrides)


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Put ``value`` at ``dotted`` (e.g. "train.learning_rate") in a nested override dict, if given."""
    if value is None:
        return
    *parents, leaf = dotted.split(".")
    for k in parents:
        d = d.setdefault(k, {})
    d[leaf] = value


# ---- data ----------------------------------------------------------------------------------
def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="gather the configured raw sources (or catalog categories) into JSONL")
    _config_arg(p)
    p.add_argument("--category", action="append", default=None, metavar="C",
                   help="gather these categories of the curated catalog instead of data.sources (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (datasets, counts, expected size); write nothing")

    def run(a: argparse.Namespace) -> int:
        from distill_dag.config import SourceConfig
        from distill_dag.data.jsonl import RejectRateError
        from distill_dag.data.sources import gather_sources

        cfg = _load(a)
        if a.category:
            cfg.data.sources = [SourceConfig(name="catalog", kind="catalog", categories=a.category)]
        mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
        try:
            result = gather_sources(cfg, dry_run=a.dry_run)
        except (RejectRateError, ValueError, FileNotFoundError) as err:
            print(f"distill download: {err}", file=sys.stderr)
            return 1
        for name, r in result.items():
            if a.dry_run:
                print(f"source '{name}' ({r['kind']}), plan:")
                for d in r.get("datasets", []):
                    sub_ = f" [{d['subset']}]" if d["subset"] else ""
                    print(f"  {d['category']:<17} {d['name']:<16} {d['hub_id'] + sub_:<48} split={d['split']:<10} "
                          f"samples={d['samples']:>7,}  ~{mb(d['expected_bytes'])}")
                extra = {k: v for k, v in r.items() if k not in ("kind", "datasets")}
                if "expected_bytes" in extra:
                    extra["expected_bytes"] = mb(extra["expected_bytes"])
                print("  " + ", ".join(f"{k}={v}" for k, v in extra.items()))
            else:
                print(f"source '{name}' ({r['kind']}): {r['rows']:,} rows, {mb(r['bytes'])}, {r['files']} files, "
                      f"{r['rejects']} rejects -> {r['path']}")
        return 0

    p.set_defaults(func=run)


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="tokenize + pack JSONL files into parquet shards")
    _config_arg(p)
    p.add_argument("--input", required=True, help="a directory of .jsonl files (or one file)")
    p.add_argument("--output", required=True, help="output directory for shards + manifest.json")
    p.add_argument("--recursive", action="store_true", help="also read .jsonl files in subdirectories")
    p.add_argument("--skip-existing", action="store_true", help="re-tokenize only inputs whose content changed")
    p.add_argument("--force", action="store_true", help="re-tokenize and rewrite everything")
    p.add_argument("--max-seq-length", type=int, default=None, help="row length (default: tokenize.max_seq_length)")
    p.add_argument("--tokenizer", default=None, metavar="LOCAL_TOKENIZER_DIR",
                   help="a saved tokenizer directory (default: the config's data root/tokenizer)")
    p.add_argument("--val-fraction", type=float, default=None, help="default: tokenize.val_fraction")
    p.add_argument("--rows-per-shard", type=int, default=None, help="default: tokenize.rows_per_shard")
    p.add_argument("--max-reject-rate", type=float, default=None,
                   help="fail above this share of bad rows (default: report bad rows, never fail)")
    p.add_argument("--worker", default=None, metavar="I/N",
                   help="tokenize only worker I's share of the inputs into the token cache (of N workers, "
                        "no coordination needed); then run once without --worker to pack")

    def run(a: argparse.Namespace) -> int:
        from pathlib import Path

        from distill_dag.data.jsonl import RejectRateError
        from distill_dag.data.pack import tokenize_to_parquet

        cfg = _load(a)
        t = cfg.tokenize
        tok_dir = Path(a.tokenizer) if a.tokenizer else cfg.data_root / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists() and not (tok_dir / "tokenizer_config.json").exists():
            print(f"distill preprocess: no tokenizer in {tok_dir} (pass --tokenizer LOCAL_TOKENIZER_DIR)", file=sys.stderr)
            return 2
        worker = None
        if a.worker is not None:
            try:
                i, n = (int(x) for x in a.worker.split("/"))
            except ValueError:
                print(f"distill preprocess: --worker {a.worker!r}: give I/N, e.g. --worker 0/4", file=sys.stderr)
                return 2
            worker = (i, n)
        try:
            r = tokenize_to_parquet(
                a.input, a.output, tok_dir, a.max_seq_length or t.max_seq_length, recursive=a.recursive,
                val_fraction=t.val_fraction if a.val_fraction is None else a.val_fraction,
                rows_per_shard=a.rows_per_shard or t.rows_per_shard, skip_existing=a.skip_existing, force=a.force,
                mask_prompt=t.mask_prompt, batch_docs=t.batch_docs, max_line_bytes=cfg.data.max_line_bytes,
                max_reject_rate=a.max_reject_rate, progress=worker is None, worker=worker,
            )
        except (RejectRateError, FileNotFoundError, ValueError) as err:
            print(f"distill preprocess: {err}", file=sys.stderr)
            return 1
        if worker is not None:
            print(f"worker {worker[0]}/{worker[1]}: tokenized {len(r['tokenized'])} input(s) into the token cache, "
                  f"{len(r['reused'])} already cached; pack with: distill preprocess (same arguments, no --worker)")
            return 0
        if r["up_to_date"]:
            print(f"{a.output} is up to date ({len(r['reused'])} inputs unchanged); nothing re-tokenized")
        else:
            print(f"tokenized {len(r['tokenized'])} input(s), reused {len(r['reused'])} from the cache")
        for split in ("train", "val"):
            s = r["totals"][split]
            print(f"  {split}: {s['shards']} shards, {s['rows']:,} rows, {s['tokens']:,} tokens, {s['docs']:,} documents")
        if r["rejects"]:
            print(f"  {r['rejects']} bad rows skipped; each with file, line and reason in {r['rejects_file']}")
        print(f"  manifest: {Path(a.output) / 'manifest.json'}")
        return 0

    p.set_defaults(func=run)


# ---- model ---------------------------------------------------------------------------------
def _add_model_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-info", help="parameter counts of a RetNet variant")
    p.add_argument("--variant", default=None, help="tiny | 350M | 500M (default: the config's student.variant)")
    p.add_argument("--vocab-size", type=int, default=128256, help="default: Llama-3.2's 128256")
    p.add_argument("--config", default=None, help="YAML whose student.overrides apply (default: none)")

    def run(a: argparse.Namespace) -> int:
        from distill_dag.model.variants import count_parameters, student_config

        overrides: dict[str, Any] = {}
        variant = a.variant
        if a.config is not None:
            student = load_config(a.config).student
            variant, overrides = variant or student.variant, dict(student.overrides)
        variant = variant or "500M"
        try:
            cfg = student_config(variant, a.vocab_size, **overrides)
        except ValueError as err:
            print(f"distill model-info: {err}", file=sys.stderr)
            return 2
        c = count_parameters(cfg)
        print(
            f"RetNet {variant}: d={cfg.hidden_size}, layers={cfg.num_hidden_layers}, heads={cfg.num_attention_heads} "
            f"(key dim {cfg.head_dim}, value dim {cfg.value_dim // cfg.num_attention_heads}), "
            f"ffn {cfg.intermediate_size}, vocab {cfg.vocab_size:,}, "
            f"{'tied' if cfg.tie_word_embeddings else 'untied'} embeddings"
        )
        rows = [
            ("embedding", c["embedding"]),
            ("lm_head" + (" (tied)" if c["lm_head"] == 0 else ""), c["lm_head"]),
            ("retention per layer", c["retention_per_layer"]),
            ("ffn per layer", c["ffn_per_layer"]),
            (f"blocks ({c['layers']})", c["blocks"]),
            ("final norm", c["final_norm"]),
            ("non-embedding", c["non_embedding"]),
            ("total", c["total"]),
        ]
        for name, n in rows:
            print(f"  {name:<20} {n:>14,}")
        print(f"  = {c['total'] / 1e6:.1f}M parameters")
        return 0

    p.set_defaults(func=run)


# ---- teacher -------------------------------------------------------------------------------
def _add_finetune_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune-teacher", help="LoRA (or full) finetuning of the teacher")
    _config_arg(p)
    p.add_argument("--resume-from", help="a checkpoint dir, or the output dir (follows checkpoint_latest)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--mode", choices=["lora", "full"])
    p.add_argument("--output-dir", help="default teacher_ft.output_dir")
    p.add_argument("--eval-interval", type=int, help="0 = only before and after")

    def run(a: argparse.Namespace) -> int:
        o: dict[str, Any] = {}
        for flag in ("max_steps", "learning_rate", "mode", "output_dir", "eval_interval"):
            _set(o, f"teacher_ft.{flag}", getattr(a, flag))
        cfg = _load(a, o)
        import json

        from distill_dag.distill.teacher_finetune import TrainingInterrupted, finetune_teacher

        try:
            m = finetune_teacher(cfg, cfg.tokenized_dir, cfg.teacher_ft_dir, tokenizer_dir=cfg.tokenizer_dir,
                                 resume_from=a.resume_from, device=cfg.train.device)
        except TrainingInterrupted as err:
            print(str(err), file=sys.stderr)
            return 130
        print(json.dumps({k: v for k, v in m.items() if k != "history"}, indent=2))
        return 0

    p.set_defaults(func=run)


def _add_cache_logits(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-logits", help="write the teacher's top-k logit cache")
    _config_arg(p)
    p.add_argument("--model", default=None, help="teacher model dir or hub name (default: teacher.model_name_or_path)")
    p.add_argument("--adapter", default=None, help="peft adapter dir (default: teacher.adapter_path)")
    p.add_argument("--via", default="direct", choices=["direct", "network"],
                   help="run the teacher here (direct) or ask the server at teacher.url (network)")
    p.add_argument("--k", type=int, default=None, help="entries per position (default: logit_cache.k)")
    p.add_argument("--dtype", default=None, choices=["q8", "fp16", "fp32"], help="log-prob encoding")
    p.add_argument("--output", default=None, help="cache dir (default: logit_cache.dir)")
    p.add_argument("--shards", default=None, help="only these data shard indices, e.g. 0,2,5 (split work over workers)")
    p.add_argument("--force", action="store_true", help="rebuild a cache written for another teacher/k/encoding")
    p.add_argument("--stats", action="store_true", help="print the DuckDB stats (entropy, top-k mass) at the end")

    def run(a: argparse.Namespace) -> int:
        import json

        from distill_dag.distill.logit_cache import build_logit_cache
        from distill_dag.distill.teachers.base import TeacherError

        over: dict[str, Any] = {}
        _set(over, "logit_cache.k", a.k)
        _set(over, "logit_cache.dtype", a.dtype)
        _set(over, "logit_cache.dir", a.output)
        cfg = _load(a, over)
        try:
            summary = build_logit_cache(
                cfg, model_path=a.model, adapter_path=a.adapter, via=a.via, force=a.force, progress=True,
                shards=[int(x) for x in a.shards.split(",")] if a.shards else None,
            )
        except TeacherError as err:
            print(f"distill cache-logits: {err}", file=sys.stderr)
            return 2
        print(f"logit cache {cfg.cache_dir}: {summary['shards_done']} shard(s) done, complete={summary['complete']}, "
              f"{summary['bytes_per_entry']} bytes/entry")
        if a.stats and "stats" in summary:
            print(json.dumps(summary["stats"], indent=2))
        return 0

    p.set_defaults(func=run)


def _add_serve_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-teacher", help="serve the teacher's top-k over HTTP (POST /v1/topk)")
    _config_arg(p)
    p.add_argument("--model", default=None, help="teacher model dir or hub name (default: teacher.model_name_or_path)")
    p.add_argument("--host", default=None, help="bind address (default: teacher.serve_host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: teacher.serve_port (8765)")
    p.add_argument("--k", type=int, default=None,
                   help="largest top-k served (default: max of train.teacher_topk and logit_cache.k)")

    def run(a: argparse.Namespace) -> int:
        from distill_dag.distill.teachers.server import serve_teacher

        serve_teacher(_load(a), model_path=a.model, host=a.host, port=a.port, k=a.k, device=a.device)
        return 0

    p.set_defaults(func=run)


# ---- student -------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the RetNet student (KD or CE-only)")
    _config_arg(p)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--enable-saddle-interventions", action="store_true", default=None)
    p.add_argument("--pretrain-ce-only", action="store_true", default=None, help="CE only: no teacher is loaded")
    p.add_argument("--resume-from", help="a checkpoint dir or a run dir (follows checkpoint_latest)")
    p.add_argument("--output-dir", help="run folder (default runs/<teacher_mode>/)")
    p.add_argument("--log-interval", type=int)
    p.add_argument("--eval-interval", type=int, help="0 = never")
    p.add_argument("--teacher-mode", choices=["direct", "cached", "network"])
    p.add_argument("--parallel", choices=["ddp", "fsdp"], help="under torchrun: whole student per rank, or sharded")

    def run(a: argparse.Namespace) -> int:
        o: dict[str, Any] = {}
        for flag in ("learning_rate", "weight_decay", "max_steps", "enable_saddle_interventions",
                     "pretrain_ce_only", "resume_from", "output_dir", "log_interval", "eval_interval",
                     "teacher_mode", "parallel"):
            _set(o, f"train.{flag}", getattr(a, flag))
        cfg = _load(a, o)
        from distill_dag.distill.student_run import run_student

        out = run_student(cfg)
        if os.environ.get("RANK", "0") != "0":  # one summary under torchrun
            return 0
        if out["alignment"] is not None:
            a = out["alignment"]
            print(f"alignment: {a.steps} steps, {a.tokens} tokens, per-layer val MSE "
                  f"{_floats(a.mse_before)} -> {_floats(a.mse_after)}, student={a.final_dir}")
        for name in ("student", "baseline"):
            if (r := out[name]) is not None:
                print(f"{name}: {r.steps} steps, {r.tokens} tokens, val_loss={r.val.get('val_loss')}, "
                      f"checkpoint={r.final_dir}")
        return 0

    p.set_defaults(func=run)


def _floats(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"


# ---- eval ----------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and needle-in-a-haystack on a checkpoint")
    _config_arg(p)
    p.add_argument("--checkpoint", help="checkpoint dir or run dir (default <run_dir>/final)")
    p.add_argument("--split", choices=["val", "train"], help="default eval.split")
    p.add_argument("--niah", action=argparse.BooleanOptionalAction, default=None, help="default eval.niah")
    p.add_argument("--teacher", help="teacher_ft output / model / adapter dir (default: teacher_ft.output_dir if done)")
    p.add_argument("--baseline", help="CE-only student checkpoint (default <run_dir>_ce_only/final if present)")
    p.add_argument("--out", help="report folder (default eval.output_dir or <run_dir>/eval)")
    p.add_argument("--max-batches", type=int, help="perplexity batches (0 = the whole split)")

    def run(a: argparse.Namespace) -> int:
        o: dict[str, Any] = {}
        _set(o, "eval.max_batches", a.max_batches)
        cfg = _load(a, o)
        from distill_dag.eval.report import evaluate_run

        r = evaluate_run(cfg, checkpoint=a.checkpoint, split=a.split, niah=a.niah, out_dir=a.out,
                         teacher=a.teacher or "auto", baseline=a.baseline or "auto", device=cfg.train.device)
        from distill_dag.eval.perplexity import table_markdown

        print(table_markdown(r["perplexity_rows"]))
        if r.get("niah_table"):
            print(f"\nneedle-in-a-haystack accuracy {r['niah_accuracy']:.2f}\n{r['niah_table']}")
        print(f"\nreport: {r['report_path']}")
        return 0

    p.set_defaults(func=run)


def _todo(name: str) -> int:
    print(f"distill {name}: not available yet", file=sys.stderr)
    return 2


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_download,
    _add_preprocess,
    _add_model_info,
    _add_finetune_teacher,
    _add_cache_logits,
    _add_serve_teacher,
    _add_train,
    _add_eval,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
