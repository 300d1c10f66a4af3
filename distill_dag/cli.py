"""``distill``: the plain CLI, with the same stages as the Dagster assets.

Each subcommand has one ``_add_<name>`` function that declares its flags and sets ``func``; the
work itself is done by the core modules (imported lazily so ``distill --help`` stays fast: no torch,
no transformers; ``bench/cli_startup.py`` measures it).

Paths: relative paths on the command line are relative to the current directory; inside a config
file, relative to that file's folder; bundled configs are found by name (``--config demo.yaml``).
Flags that set a config value are generated from the schema (:class:`Flag` rows: type, choices and help
come from the field, as the Dagster run config's do) and go through the same pydantic model as the file
(bounds, key names); they are added to a verb's parser when it is used, so ``distill --help`` does not
import the schema.
A failure prints one error (what, which file or key, how to fix it) and exits non-zero; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from distill_dag.model.variants import count_parameters, generation_cache_bytes, student_model_config
from distill_dag.safe_read import read_text_bounded

if TYPE_CHECKING:  # distill_dag.config (pydantic) is imported when a command runs, not for --help
    from distill_dag.config import PipelineConfig
    from distill_dag.data.manifest import Manifest


def _config_error(msg: str) -> Exception:
    from distill_dag.config import ConfigError  # lazy: `--help` without pydantic

    return ConfigError(msg)


class Flag(NamedTuple):
    """A flag that sets a config key. Its type, choices (a ``Literal``), ``--x/--no-x`` form (a bool) and help
    (the field's description, bounds and key) come from the schema (:func:`distill_dag.config.flags.flag_kwargs`).
    ``flag``: its name when it is not ``--<leaf with dashes>``; ``help``: the flag's own wording; ``value``:
    turns what was given into the config value; ``apply=False``: the value is checked as that key but goes to
    the stage as an argument (the config keeps the file's value)."""

    key: str
    flag: str | None = None
    help: str | None = None
    metavar: str | None = None
    value: Callable[[Any], Any] | None = None
    apply: bool = True

    @property
    def name(self) -> str:
        return self.flag or "--" + self.key.split(".")[1].replace("_", "-")

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")


class _Verb(argparse.ArgumentParser):
    """A verb's parser. Its config :class:`Flag` rows become arguments when the verb is parsed or its help
    shown, so ``distill --help`` does not import the schema."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flags: list[Flag] = []
        self._pending: list[Flag] = []

    def config_flags(self, *flags: Flag) -> None:
        self._flags += flags
        self._pending += flags
        self.set_defaults(config_flags=tuple(self._flags))

    def _complete(self) -> None:
        if not self._pending:
            return
        from distill_dag.config.flags import flag_kwargs  # lazy: `--help` without pydantic

        group = next((g for g in self._action_groups if g.title == CONFIG_FLAGS), None) or self.add_argument_group(
            CONFIG_FLAGS, "each sets the config key it names, over the --config file, checked like a value in it")
        for f in self._pending:
            extra = {"metavar": f.metavar} if f.metavar else {}
            group.add_argument(f.name, **flag_kwargs(f.key, f.help, **extra))
        self._pending = []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


CONFIG_FLAGS = "config values"
CONFIG_HELP = ("a config file (relative to the current directory), or a bundled config by name: demo.yaml, "
               "train_direct.yaml, train_cached.yaml, train_network.yaml, teacher_ft.yaml (default: demo.yaml); "
               "paths inside a config are relative to its folder")


def _config_arg(p: _Verb, *flags: Flag) -> None:
    """``--config``, ``--device`` and the verb's config ``flags``."""
    p.add_argument("--config", default=None, help=CONFIG_HELP)
    p.config_flags(Flag("train.device"), *flags)


def _flag_overrides(a: argparse.Namespace, applied: bool = True, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The nested override dict of the config flags given (those with ``apply`` = ``applied``; not the keys
    ``skip``)."""
    out: dict[str, Any] = {}
    for f in getattr(a, "config_flags", ()):
        v = getattr(a, f.dest, None)
        if v is not None and f.apply == applied and f.key not in skip:
            section, name = f.key.split(".")
            out.setdefault(section, {})[name] = f.value(v) if f.value else v
    return out


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None,
          context: dict[str, Any] | None = None, skip: tuple[str, ...] = ()) -> PipelineConfig:
    """The config file of ``--config`` with the config flags given (but the keys ``skip``, which a rule in
    ``context`` sets) and ``overrides`` (relative paths against the current directory) on top, validated by the
    config model (``context``: its derived rules): a bad flag value is an error naming its key and the flag."""
    from distill_dag.config import ConfigError, deep_merge, load_config  # lazy: `--help` without pydantic

    over = deep_merge(deep_merge(getattr(args, "extra_overrides", None) or {}, _flag_overrides(args, skip=skip)),
                      dict(overrides or {}))
    try:
        checks = _flag_overrides(args, applied=False)
        if checks:  # checked as their keys, the stage takes them as arguments
            load_config(args.config, deep_merge(over, checks), context)
        return load_config(args.config, over, context)
    except ConfigError as err:
        given = [f"{f.name} {getattr(args, f.dest)!r} sets {f.key}" for f in getattr(args, "config_flags", ())
                 if getattr(args, f.dest, None) is not None]
        raise _config_error(str(err) + ("\n  (from the command line: " + "; ".join(given) + ")" if given else "")
                            ) from None


# ---- data ----------------------------------------------------------------------------------
def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="gather the configured raw sources (or catalog categories) into JSONL")
    _config_arg(p)
    p.add_argument("--category", action="append", default=None, metavar="C",
                   help="gather these categories of the curated catalog instead of data.sources (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (datasets, counts, expected size); write nothing")

    def run(a: argparse.Namespace) -> int:
        from distill_dag.config import SourceConfig  # lazy: `--help` without pydantic
        from distill_dag.data.jsonl import RejectRateError  # lazy: `--help` start-up time
        from distill_dag.data.sources import gather_sources  # lazy: `--help` without pydantic

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
                for skipped in r.get("skipped_inputs", []):
                    print(f"  not read: {skipped['path']}: {skipped['reason']}")
        return 0

    p.set_defaults(func=run)


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="tokenize + pack JSONL files into parquet shards")
    # defaults: the config's, as the tokenized_parquet asset uses them (one entry point: tokenize_stage)
    _config_arg(p, Flag("tokenize.max_seq_length"), Flag("tokenize.val_fraction"), Flag("tokenize.rows_per_shard"),
                Flag("data.max_reject_rate"), Flag("tokenize.skip_existing"), Flag("tokenize.force"))
    p.add_argument("--input", required=True, help="a directory of .jsonl files (or one file)")
    p.add_argument("--output", required=True, help="output directory for shards + manifest.json")
    p.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                   help="also read .jsonl files in subdirectories (default: yes, as the asset does)")
    p.add_argument("--tokenizer", default=None, metavar="LOCAL_TOKENIZER_DIR",
                   help="a saved tokenizer directory (default: the config's tokenizer directory)")
    p.add_argument("--worker", default=None, metavar="I/N",
                   help="tokenize only worker I's share of the inputs into the token cache (of N workers, "
                        "no coordination needed); then run once without --worker to pack")

    def run(a: argparse.Namespace) -> int:
        if a.skip_existing and a.force:
            raise _config_error("--skip-existing and --force contradict each other (reuse unchanged inputs vs "
                                "re-tokenize everything): give one of them")
        cfg = _load(a)  # the flags are checked before any work starts, naming their keys
        from distill_dag.data.pack import tokenize_stage  # lazy: `--help` without torch
        from distill_dag.data.tokenizer import ensure_tokenizer  # lazy: `--help` without torch

        tok_dir = ensure_tokenizer(cfg, a.tokenizer, stage="preprocess")
        worker = None
        if a.worker is not None:
            try:
                i, n = (int(x) for x in a.worker.split("/"))
            except ValueError:
                print(f"distill preprocess: --worker {a.worker!r}: give I/N, e.g. --worker 0/4", file=sys.stderr)
                return 2
            worker = (i, n)
        # errors (bad rows over the rate, disk full, a locked output, an input changing) reach main's one handler
        tokenize_stage(cfg, inputs=a.input, output_dir=a.output, tokenizer_dir=tok_dir, recursive=a.recursive,
                       worker=worker, progress=worker is None, log=print)
        if worker is None:
            print(f"  next: distill train --config CONFIG --tokenizer {tok_dir} (with data.tokenized_dir: {a.output})")
        return 0

    p.set_defaults(func=run)


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="build the tokenizer: train a byte-level BPE on raw JSONL, or fetch and "
                                         "save a hub/local one (the same function as the Dagster tokenizer asset)")
    p.add_argument("--input", default=None, metavar="RAW_DIR",
                   help="raw JSONL folder (or file) to train a BPE on (default: <data.root>/raw)")
    p.add_argument("--output", default=None, metavar="TOKENIZER_DIR",
                   help="where the tokenizer is saved (default: <data.root>/tokenizer, where preprocess and train "
                        "look for it)")
    _config_arg(p, Flag("tokenizer.vocab_size"), Flag("tokenizer.min_frequency"), Flag("tokenizer.train_bytes"),
                Flag("tokenizer.name_or_path", "--name", metavar="HUB_ID_OR_DIR",
                     help="fetch a hub tokenizer (e.g. meta-llama/Llama-3.2-1B) or copy a local one instead of "
                          "training"))

    def run(a: argparse.Namespace) -> int:
        from pathlib import Path

        over: dict[str, Any] = {}
        if a.name is not None and a.input is not None:
            raise _config_error("--name fetches a tokenizer and --input trains one: give one of them")
        if a.name is not None and a.vocab_size is not None:
            raise _config_error("--vocab-size applies to a BPE trained here, not to --name (a hub tokenizer has its own)")
        if a.name is None and (a.input is not None or a.vocab_size is not None):
            over["tokenizer"] = {"name_or_path": None}  # train a BPE, whatever the config names
        cfg = _load(a, over)
        raw = Path(a.input).resolve() if a.input else cfg.raw_dir
        out = Path(a.output).resolve() if a.output else cfg.tokenizer_dir
        from distill_dag.data.tokenizer import load_tokenizer, resolve_tokenizer  # lazy: `--help` without torch

        path, digest = resolve_tokenizer(cfg.tokenizer, None if cfg.tokenizer.name_or_path else raw, out)
        tok = load_tokenizer(path)
        what = cfg.tokenizer.name_or_path or f"a byte-level BPE trained on {raw}"
        print(f"tokenizer {path}: {what}, vocabulary {len(tok):,}, eos={tok.eos_token!r}, pad={tok.pad_token!r}, "
              f"hash {digest[:12]}")
        print(f"  next: distill preprocess --input RAW --output DATA --tokenizer {path}")
        return 0

    p.set_defaults(func=run)


# ---- model ---------------------------------------------------------------------------------
def _add_model_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-info", help="parameter counts of a RetNet variant")
    p.add_argument("--variant", default=None, help="tiny | 350M | 500M (default: the config's student.variant)")
    p.add_argument("--vocab-size", type=_positive_int, default=128256, help="default: Llama-3.2's 128256")
    p.add_argument("--config", default=None, help="YAML whose student.overrides apply (default: none)")
    p.add_argument("--attention-layers", default=None,
                   help="a hybrid: comma-separated layer indices kept as softmax attention (student.attention_layers)")
    p.add_argument("--attention-window", type=_positive_int, default=None,
                   help="sliding window of the attention layers (student.attention_window; default: full)")
    p.add_argument("--retention-window", type=_positive_int, default=None,
                   help="softmax window beside every retention layer (student.retention_window; default: none)")

    def run(a: argparse.Namespace) -> int:
        from distill_dag.config import StudentConfig  # lazy: `--help` without pydantic

        student = StudentConfig()
        if a.config is not None:
            from distill_dag.config import load_config  # lazy: `--help` without pydantic

            student = load_config(a.config).student
        update: dict[str, Any] = {"variant": a.variant or (student.variant if a.config is not None else "500M")}
        if student.attention_layers == "auto":  # chosen from a teacher at stage 1: count it as pure here
            update["attention_layers"] = []
        try:
            if a.attention_layers is not None:
                update["attention_layers"] = [int(x) for x in a.attention_layers.split(",") if x.strip()]
            if a.attention_window is not None:
                update["attention_window"] = a.attention_window
            if a.retention_window is not None:
                update["retention_window"] = a.retention_window
            student = StudentConfig.model_validate({**student.model_dump(), **update})
            cfg = student_model_config(student, a.vocab_size)
        except ValueError as err:
            print(f"distill model-info: --attention-layers / student.*: {err}", file=sys.stderr)
            return 2
        variant = student.variant
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
            *([(f"attention per layer ({c['attention_layers']})", c["attention_per_layer"])]
              if c["attention_layers"] else []),
            ("ffn per layer", c["ffn_per_layer"]),
            (f"blocks ({c['layers']})", c["blocks"]),
            ("final norm", c["final_norm"]),
            ("non-embedding", c["non_embedding"]),
            ("total", c["total"]),
        ]
        for name, n in rows:
            print(f"  {name:<20} {n:>14,}")
        print(f"  = {c['total'] / 1e6:.1f}M parameters")
        print(f"  layer_types: {', '.join(f'{i}:{t}' for i, t in enumerate(cfg.layer_types) if t != 'linear_attention') or 'all linear_attention (pure RetNet)'}")
        for ctx in (4096, 32768):  # generation memory of one sequence: retention state + attention K/V (bf16)
            g = generation_cache_bytes(cfg, ctx)
            print(f"  cache at {ctx // 1024}k tokens: state {g['state'] / 2**20:,.2f} MiB + KV {g['kv'] / 2**20:,.2f} MiB "
                  f"= {g['total'] / 2**20:,.2f} MiB ({g['total'] / ctx:,.0f} B/token; +{g['per_token']:,} B per new token)")
        return 0

    p.set_defaults(func=run)


# ---- teacher -------------------------------------------------------------------------------
def _add_finetune_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune-teacher", help="LoRA (or full) finetuning of the teacher")
    _config_arg(p, *(Flag(f"teacher_ft.{k}") for k in ("max_steps", "learning_rate", "mode", "output_dir",
                                                         "eval_interval")))
    p.add_argument("--resume-from", help="a checkpoint dir, or the output dir (follows checkpoint_latest)")

    def run(a: argparse.Namespace) -> int:
        cfg = _load(a)
        import json

        from distill_dag.teacher.finetune import TrainingInterrupted, finetune_teacher  # lazy: `--help` without torch

        try:
            from distill_dag.data.tokenizer import ensure_tokenizer  # lazy: `--help` without torch

            m = finetune_teacher(cfg, tokenizer_dir=ensure_tokenizer(cfg, stage="finetune-teacher"),
                                 resume_from=a.resume_from, device=cfg.train.device)
        except TrainingInterrupted as err:
            print(str(err), file=sys.stderr)
            return 130
        print(json.dumps({k: v for k, v in m.items() if k != "history"}, indent=2))
        return 0

    p.set_defaults(func=run)


def _add_cache_logits(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-logits", aliases=["cache_teacher_logits", "cache-teacher-logits"],
                       help="write the teacher's top-k logit cache (the seed's cache_teacher_logits: an alias)")
    _config_arg(p, Flag("logit_cache.k"), Flag("logit_cache.dtype"), Flag("logit_cache.dir", "--output"))
    p.add_argument("--model", default=None, help="teacher model dir or hub name (default: teacher.model_name_or_path)")
    p.add_argument("--adapter", default=None, help="peft adapter dir (default: teacher.adapter_path)")
    p.add_argument("--via", default="direct", choices=["direct", "network"],
                   help="run the teacher here (direct) or ask the server at teacher.url (network)")
    p.add_argument("--shards", default=None,
                   help="only these data shards, by name (train-00000,val-00000) or index (0,2): the same per-shard "
                        "unit as a logit_cache partition")
    p.add_argument("--force", action="store_true", help="recompute shards even when a cache shard of the same teacher exists")
    p.add_argument("--stats", action="store_true", help="print the DuckDB stats (entropy, top-k mass) at the end")

    def run(a: argparse.Namespace) -> int:
        import json

        from distill_dag.teacher.cache.layout import read_data_manifest  # lazy: `--help` without numpy
        from distill_dag.teacher.cache_stage import build_logit_cache  # lazy: `--help` without torch
        from distill_dag.loss.topk import TeacherError  # lazy: `--help` without torch

        cfg = _load(a)
        if a.via == "direct":
            _warn_teacher_length(cfg, a.model)
        try:
            keys = None
            if a.shards:
                dm = read_data_manifest(cfg.tokenized_dir)
                keys = [dm.shards[int(x)].key if x.strip().isdigit() and int(x) < len(dm.shards) else x.strip()
                        for x in a.shards.split(",")]
            summary = build_logit_cache(cfg, shards=keys, model_path=a.model, adapter_path=a.adapter, via=a.via,
                                        force=a.force, stats=a.stats)
        except TeacherError as err:
            print(f"distill cache-logits: {err}", file=sys.stderr)
            return 2
        print(f"logit cache {cfg.cache_dir}: wrote {len(summary['written'])}, reused {len(summary['reused'])}; "
              f"{summary['shards_present']}/{summary['shards_total']} data shards cached")
        if a.stats and "stats" in summary:
            print(json.dumps(summary["stats"], indent=2))
        return 0

    p.add_argument("--data-path", default=None, metavar="DATA_DIR",
                   help="the seed's flag: the packed data folder (manifest.json + shards) = data.tokenized_dir")
    p.add_argument("--output-dir", default=None, metavar="CACHE_DIR", help="the seed's flag: the same as --output")
    p.set_defaults(func=_seed_cache_flags(run))


def _seed_cache_flags(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The seed's ``cache_teacher_logits --data-path D --output-dir C`` as ``cache-logits`` flags."""

    def seeded(a: argparse.Namespace) -> int:
        flags_checked = _load(a)  # before anything else: a bad --k is refused naming logit_cache.k
        if a.config is None and a.model is None:
            # every verb defaults to demo.yaml, whose teacher is built by the demo: a seed user gets a way forward
            if not flags_checked.teacher.model_name_or_path:
                raise _config_error(
                    f"distill {a.command}: no --config given, so the bundled demo.yaml is used, and it names no "
                    "teacher. Give --config NEW.yaml (your seed config converted: `distill migrate-config OLD.yaml "
                    "> NEW.yaml`) or --model TEACHER (hub id or folder)")
        if a.output_dir is not None:
            if a.output is not None and a.output != a.output_dir:
                raise _config_error("--output and --output-dir (the seed's name) disagree: give one")
            a.output = a.output_dir
        if a.data_path is not None:
            a.extra_overrides = {"data": {"tokenized_dir": a.data_path}}
        return run(a)

    return seeded


def _add_serve_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-teacher", help="serve the teacher's top-k over HTTP (POST /v1/topk)")
    # --host, --port and --k are checked as their keys and go to the server as arguments
    _config_arg(p, Flag("teacher.serve_host", "--host", apply=False),
                Flag("teacher.serve_port", "--port", apply=False),
                Flag("train.teacher_topk", "--k", apply=False,
                     help="largest top-k served (default: max of train.teacher_topk and logit_cache.k)"),
                Flag("teacher.serve_allow_no_token", "--allow-no-token"),
                Flag("teacher.serve_max_seq_len", "--max-seq-len"),
                Flag("teacher.serve_max_buffered_bytes", "--max-buffered-bytes"))
    p.add_argument("--model", default=None, help="teacher model dir or hub name (default: teacher.model_name_or_path)")

    def run(a: argparse.Namespace) -> int:
        cfg = _load(a)
        from distill_dag.teacher.server import serve_teacher  # lazy: `--help` without torch

        serve_teacher(cfg, model_path=a.model, host=a.host, port=a.port, k=a.k, device=a.device)
        return 0

    p.set_defaults(func=run)


# ---- student -------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the RetNet student (KD or CE-only)")
    _config_arg(p, Flag("train.learning_rate", help="Peak AdamW learning rate; with optimizer muon, Muon's "
                        "train.muon_learning_rate is scaled by the same factor (logged), unless --muon-learning-rate "
                        "is given"),
                *(Flag(f"train.{k}") for k in ("muon_learning_rate", "weight_decay", "max_steps",
                                               "enable_saddle_interventions", "pretrain_ce_only")),
                Flag("train.resume_from", value=_seed_resume,
                     help="A checkpoint folder or a run folder (follows checkpoint_latest); the seed's "
                          "RUN/checkpoint_latest.pt means RUN"),
                Flag("train.output_dir"),
                Flag("tokenizer.dir", "--tokenizer", metavar="LOCAL_TOKENIZER_DIR",
                     help="the tokenizer the shards were built with (default: <data.root>/tokenizer, fetched from "
                          "tokenizer.name_or_path when missing)"),
                *(Flag(f"train.{k}") for k in ("log_interval", "eval_interval", "teacher_mode", "parallel")))

    def run(a: argparse.Namespace) -> int:
        from distill_dag.config import MUON_FOLLOWS_LR  # lazy: `--help` without pydantic

        # --learning-rate alone: the config's Muon LR rule sets it and scales Muon's rate too (one parse)
        rule = a.learning_rate is not None and a.muon_learning_rate is None
        cfg = _load(a, context={MUON_FOLLOWS_LR: a.learning_rate} if rule else None,
                    skip=("train.learning_rate",) if rule else ())  # every flag checked, naming its key
        if cfg.train.muon_scaled is not None:
            old_lr, old_muon, scale = cfg.train.muon_scaled
            print(f"--learning-rate {a.learning_rate:g}: AdamW lr {old_lr:g} -> {a.learning_rate:g}; "
                  f"Muon lr scaled by the same factor {scale:g}: {old_muon:g} -> "
                  f"{cfg.train.muon_learning_rate:g} (--muon-learning-rate sets it apart)", flush=True)
        if a.tokenizer is not None:  # a folder given by hand must hold one (never filled from name_or_path)
            from distill_dag.data.tokenizer import ensure_tokenizer  # lazy: `--help` without torch

            ensure_tokenizer(cfg, a.tokenizer)
        manifest = _check_data(cfg)
        if not cfg.train.pretrain_ce_only and cfg.train.teacher_mode != "cached":
            _warn_teacher_length(cfg, manifest=manifest)
        from distill_dag.student.run import run_student  # lazy: `--help` without torch

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


def _warn_teacher_length(cfg: PipelineConfig, model: str | None = None, manifest: Manifest | None = None) -> None:
    """Warn when the packed rows are longer than the teacher's positions (``manifest``: the packed data's,
    when the caller has read it already)."""
    from distill_dag.data.manifest import Manifest  # lazy: `--help` start-up time
    from distill_dag.teacher.providers.factory import length_warning  # lazy: `--help` without torch

    try:
        seq_len = (manifest or Manifest.load(cfg.tokenized_dir)).max_seq_length
    except (FileNotFoundError, ValueError):
        return  # the stage itself says what is missing
    msg = length_warning(model or cfg.teacher.model_name_or_path, seq_len)
    if msg:
        print(msg, file=sys.stderr, flush=True)


def _seed_resume(path: str | None) -> str | None:
    """The seed resumed from ``runs/<mode>/checkpoint_latest.pt``; ours from the run folder (which follows
    its checkpoint_latest): the seed's file name maps to the folder beside it."""
    from pathlib import Path

    if path is None or not path.endswith(".pt"):
        return path
    p = Path(path)
    if p.name == "checkpoint_latest.pt" and p.parent.is_dir():
        print(f"--resume-from {path}: the seed's checkpoint file; resuming from its run folder {p.parent} "
              "(follows checkpoint_latest)", file=sys.stderr)
        return str(p.parent)
    raise _config_error(f"--resume-from {path}: a .pt file is the seed's checkpoint format, which this project does "
                        f"not read; give a checkpoint folder of ours or the run folder ({p.parent}), which resumes "
                        "from its checkpoint_latest")


def _check_data(cfg: PipelineConfig) -> Manifest:
    """Before any compute: the packed data exists and the top-k fits its vocabulary (naming the key); its
    manifest, read once."""
    from distill_dag.config import check_vocab  # lazy: `--help` without pydantic
    from distill_dag.data.manifest import Manifest  # lazy: `--help` start-up time

    try:
        m = Manifest.load(cfg.tokenized_dir)
    except FileNotFoundError as err:
        raise _config_error(f"{err}; or point data.tokenized_dir (or data.root) at the packed data") from None
    check_vocab(cfg, m.vocab_size, f"the vocabulary of {cfg.tokenized_dir}")
    from distill_dag.data.tokenizer import ensure_tokenizer  # lazy: `--help` without torch

    ensure_tokenizer(cfg)  # --tokenizer is tokenizer.dir by now: the folder, or name_or_path fetched into it
    return m


def _floats(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"


# ---- eval ----------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and needle-in-a-haystack on a checkpoint")
    _config_arg(p, Flag("eval.max_batches"),
                Flag("eval.lm_eval_tasks", metavar="T1,T2",
                     help="lm-evaluation-harness tasks, comma-separated: lm-eval names (arc_easy, mmlu, ...), "
                          "distill_heldout_continuation, distill_passkey, or task YAML paths; '' skips lm-eval"),
                Flag("eval.lm_eval_limit"))
    p.add_argument("--checkpoint", help="checkpoint dir or run dir (default <run_dir>/final)")
    p.add_argument("--split", choices=["val", "train"], help="default eval.split")
    p.add_argument("--niah", action=argparse.BooleanOptionalAction, default=None, help="default eval.niah")
    p.add_argument("--teacher", help="teacher_ft output / model / adapter dir (default: teacher_ft.output_dir if done)")
    p.add_argument("--baseline", help="CE-only student checkpoint (default <run_dir>_ce_only/final if present)")
    p.add_argument("--out", help="report folder (default eval.output_dir, else beside the checkpoint: <run>/eval for "
                   "<run>/final, <run>/eval-<name> for another checkpoint)")

    def run(a: argparse.Namespace) -> int:
        cfg = _load(a)
        from distill_dag.eval.report import evaluate_run  # lazy: `--help` without torch

        r = evaluate_run(cfg, checkpoint=a.checkpoint, split=a.split, niah=a.niah, out_dir=a.out,
                         teacher=a.teacher or "auto", baseline=a.baseline or "auto", device=cfg.train.device)
        from distill_dag.loss.perplexity import table_markdown  # lazy: `--help` without torch

        print(table_markdown(r["perplexity_rows"]))
        if r.get("niah_table"):
            print(f"\nneedle-in-a-haystack accuracy {r['niah_accuracy']:.2f}\n{r['niah_table']}")
        if r.get("lm_eval_table"):
            print(f"\nlm-evaluation-harness, share of the teacher\n{r['lm_eval_table']}")
        print(f"\nreport: {r['report_path']}")
        return 0

    p.set_defaults(func=run)


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


# ---- seed users ----------------------------------------------------------------------------
def _add_migrate_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate-config", help="turn a seed-style flat config into this project's: "
                                              "distill migrate-config OLD.yaml > NEW.yaml (the mapping on stderr)")
    p.add_argument("old", metavar="OLD.yaml", help="the seed config (model_variant, max_seq_length, ...)")
    p.add_argument("-o", "--output", default=None, metavar="NEW.yaml",
                   help="write NEW.yaml there, with paths relative to its folder (default: stdout, paths absolute); "
                        "either way they point where the seed's pointed: relative to its project root, the "
                        "current directory")

    def run(a: argparse.Namespace) -> int:
        from pathlib import Path

        import yaml

        from distill_dag.config import ConfigError, config_from_dict  # lazy: `--help` without pydantic
        from distill_dag.migrate import load_seed_yaml, looks_like_ours, migrate  # lazy: `--help` without pydantic

        old = Path(a.old).resolve()
        seed = load_seed_yaml(old)
        if looks_like_ours(seed):
            print(f"{a.old} is already a distill-dag config (sections {', '.join(seed)}): printed unchanged",
                  file=sys.stderr)
            from distill_dag.config import MAX_CONFIG_BYTES  # lazy: `--help` without pydantic

            sys.stdout.write(read_text_bounded(old, MAX_CONFIG_BYTES, "YAML config file"))
            return 0
        target = Path(a.output).resolve() if a.output else None
        new, report = migrate(seed, root=Path.cwd(), new_dir=target.parent if target else None)
        print(f"distill migrate-config {a.old}:", file=sys.stderr)
        for line in report:
            print(line, file=sys.stderr)
        text = (f"# migrated from {old.name} by `distill migrate-config` (the mapping: README, Seed users)\n"
                + yaml.safe_dump(new, sort_keys=False))
        if target is not None:
            from distill_dag.io import write_bytes_atomic  # lazy: `--help` start-up time

            write_bytes_atomic(target, text.encode())
            print(f"wrote {target}; next: distill train --config {a.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        try:  # the result must load where it is written (stdout: its paths are absolute)
            config_from_dict(new, f"migrated from {a.old}", base_dir=target.parent if target else Path.cwd())
        except ConfigError as err:
            print(f"the migrated config does not load yet; fix these keys:\n{err}", file=sys.stderr)
            return 1
        return 0

    p.set_defaults(func=run)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_download,
    _add_tokenizer,
    _add_preprocess,
    _add_model_info,
    _add_finetune_teacher,
    _add_cache_logits,
    _add_serve_teacher,
    _add_train,
    _add_eval,
    _add_migrate_config,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", description=__doc__.splitlines()[0],
        epilog="Relative paths on the command line are relative to the current directory; inside a config file, "
               "relative to its folder. A failure prints one error and exits non-zero; --debug (anywhere) shows "
               "the traceback.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure (also DISTILL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Verb)
    for add in COMMANDS:
        add(sub)
    return parser


# ---- errors ----------------------------------------------------------------------------------
_NETWORK_NAMES = ("ConnectError", "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled",
                  "LocalEntryNotFoundError", "HfHubHTTPError", "NameResolutionError", "MaxRetryError")
_PROJECT_ERRORS = ("TeacherError", "LogitCacheError", "TrainingDivergedError", "RejectRateError", "CorruptShardError",
                   "ManifestMismatchError", "CheckpointError", "DirectoryLockedError", "InputChangedError",
                   "ConversionError", "ShippedCodeError", "DiskFullError", "TrainingInterrupted",
                   "ForeignOutputError", "TooFewRowsError")


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in out and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def describe_error(err: BaseException) -> tuple[int, str]:
    """``(exit code, one clear message)`` for a failure: what, where (file or key), how to fix it."""
    import errno

    from distill_dag.config import ConfigError  # lazy: `--help` without pydantic

    chain = _chain(err)
    msg = str(err).strip() or type(err).__name__
    if isinstance(err, ConfigError):
        return 2, msg
    if any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "DiskFullError" in _names(e) for e in chain):
        return 1, f"{msg}\n  fix: the disk is full: free space or write to another folder (what was published " \
                  "before is untouched)"
    names = set().union(*(_names(e) for e in chain))
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "HfHubHTTPError"} or "the Hub" in msg:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        return 1, (f"{msg}\n  fix: " + ("HF_HUB_OFFLINE is set: unset it to download, " if offline else
                                         "the Hugging Face Hub is unreachable: connect, or run once online so the "
                                         "files are cached (then HF_HUB_OFFLINE=1 works), ")
                   + "or use local data (a data.sources entry of kind jsonl) / a local model folder")
    if "TeacherError" in names and names & set(_NETWORK_NAMES) or "TeacherError" in _names(err) and "connect" in msg.lower():
        return 2, (f"{msg}\n  fix: the teacher server is not answering: start it (`distill serve-teacher --config "
                   "...`), or point teacher.url / DISTILL_TEACHER_URL at it")
    if names & set(_NETWORK_NAMES):
        return 1, f"{msg}\n  fix: the network or the server is unreachable: check the URL and the connection"
    if _names(err) & set(_PROJECT_ERRORS):
        return (2 if "TeacherError" in _names(err) else 1), msg
    # an output folder that is a file (mkdir says only "File exists"), a read that failed in the disk:
    # say which path and what to do, since str(err) may name no file at all (EIO from read())
    exists = next((e for e in chain if isinstance(e, (FileExistsError, NotADirectoryError))
                   and getattr(e, "filename", None) and os.path.isfile(e.filename)), None)
    if exists is not None:
        return 1, (f"{exists.filename}: is a file, where a folder is needed (an --output or a config folder key "
                   "names it?): give a folder path, or move the file away")
    eio = next((e for e in chain if getattr(e, "errno", None) == errno.EIO), None)
    if eio is not None:
        where = getattr(eio, "filename", None) or next((getattr(e, "filename", None) for e in chain
                                                        if getattr(e, "filename", None)), None)
        return 1, (f"{where or 'an input or output file'}: input/output error (EIO) while reading or writing it: "
                   f"the disk or filesystem failed ({msg}); check the device (dmesg), copy the file to a healthy "
                   "disk or leave it out")
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return 1, msg
    if isinstance(err, (ValueError, RuntimeError, OSError, KeyError, TypeError)):
        return 1, f"{type(err).__name__}: {msg}\n  (run again with --debug for the traceback)"
    return 1, f"{type(err).__name__}: {msg}\n  (run again with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DISTILL_DEBUG", "") not in ("", "0")
    argv = [x for x in argv if x != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        if debug:
            raise
        print(f"distill {args.command}: interrupted" + (f" ({err})" if str(err) else ""), file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear message
        if debug:
            raise
        code, msg = describe_error(err)
        lines = msg.splitlines()
        if len(lines) > 40:
            lines = lines[:40] + [f"  ... ({len(lines) - 40} more lines; --debug shows everything)"]
        print(f"distill {args.command}: " + "\n".join(lines), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
