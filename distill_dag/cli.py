"""``distill``: the plain CLI, with the same stages as the Dagster assets.

Each subcommand has one ``_add_<name>`` function that declares its flags and sets ``func``; the
work itself is done by the core modules (imported lazily so ``distill --help`` stays fast).
"""

from __future__ import annotations

import argparse
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
    p.set_defaults(func=lambda a: _todo("download"))


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="tokenize + pack JSONL files into parquet shards")
    _config_arg(p)
    p.set_defaults(func=lambda a: _todo("preprocess"))


# ---- model ---------------------------------------------------------------------------------
def _add_model_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-info", help="parameter counts of a RetNet variant")
    p.set_defaults(func=lambda a: _todo("model-info"))


# ---- teacher -------------------------------------------------------------------------------
def _add_finetune_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune-teacher", help="LoRA (or full) finetuning of the teacher")
    _config_arg(p)
    p.set_defaults(func=lambda a: _todo("finetune-teacher"))


def _add_cache_logits(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-logits", help="write the teacher's top-k logit cache")
    _config_arg(p)
    p.set_defaults(func=lambda a: _todo("cache-logits"))


def _add_serve_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-teacher", help="serve the teacher's top-k over HTTP (POST /v1/topk)")
    _config_arg(p)
    p.set_defaults(func=lambda a: _todo("serve-teacher"))


# ---- student -------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the RetNet student (KD or CE-only)")
    _config_arg(p)
    p.set_defaults(func=lambda a: _todo("train"))


# ---- eval ----------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and needle-in-a-haystack on a checkpoint")
    _config_arg(p)
    p.set_defaults(func=lambda a: _todo("eval"))


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
