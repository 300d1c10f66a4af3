"""Issue 30 acceptance: random values for every numeric and list field of the config schema are either
refused naming the key, or give a config that validates and a run that starts (the student built, the
first train and eval batches read) within 30 s on a tiny config.

The fields are enumerated from the schema itself (``PipelineConfig``), so a field added later is covered
without editing this test; a field holding numbers with no bound fails the census test below.
"""

from __future__ import annotations

import math
import time
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from support import cfg_dict

from distill_dag.config import ConfigError, PipelineConfig, Section, SourceConfig, config_from_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

START_LIMIT_S = 30.0


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            yield from _fields(ann, prefix + name + ".")
        else:
            yield prefix + name, f


def _kind(ann: Any) -> str | None:
    """'int', 'float', 'list' (of numbers or strings), 'tuple' or None (not numeric, not a list)."""
    args = set(typing.get_args(ann)) | {ann}
    origin = typing.get_origin(ann)
    if origin is list and not any(isinstance(a, type) and issubclass(a, BaseModel) for a in typing.get_args(ann)):
        return "list"
    if origin is tuple:
        return "tuple"
    if float in args:
        return "float"
    if int in args:
        return "int"
    return None


def _bounded(f: Any) -> bool:
    return any(getattr(m, a, None) is not None for m in f.metadata for a in ("ge", "gt", "le", "lt", "min_length",
                                                                            "max_length"))


TARGETS = [(k, f, _kind(f.annotation)) for k, f in _fields(PipelineConfig) if _kind(f.annotation)]
TARGETS += [(f"data.sources.0.{k}", f, _kind(f.annotation)) for k, f in _fields(SourceConfig) if _kind(f.annotation)]

_ints = st.one_of(st.integers(-10, 100), st.integers(-(2**70), 2**70), st.integers(0, 1 << 40),
                  st.sampled_from([0, 1, 2**31, 2**32, 2**63, 2**64, -1, 10**9, 1 << 17, 1 << 20]))
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-10, 10), st.floats(0, 1e12),
                    st.sampled_from([0.0, 1.0, 1e300, -0.0, 1e-300]))
_numbers = st.one_of(_ints, _floats)
VALUES = {
    "int": st.one_of(_ints, _floats.filter(lambda x: math.isfinite(x) and x == int(x)).map(float)),
    "float": _numbers,
    "list": st.lists(st.one_of(_numbers, st.text(max_size=8)), max_size=80),
    "tuple": st.lists(_numbers, max_size=4),
}


@pytest.fixture(scope="module")
def base(small_corpus, tmp_path_factory) -> dict[str, Any]:
    d = cfg_dict(tmp_path_factory.mktemp("hyp"), small_corpus, None, pretrain_ce_only=True)
    d["data"]["sources"] = [{"name": "s", "kind": "stdlib"}]
    return d


def _set(d: dict, dotted: str, value: Any) -> dict:
    import copy

    d = copy.deepcopy(d)
    node: Any = d
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    node[parts[-1]] = value
    return d


def _start(cfg: PipelineConfig) -> None:
    """What a run does before its first step: seed, build the student, read the first train batch and the
    first eval batch."""
    import numpy as np
    import torch

    from distill_dag.data.dataset import make_loader
    from distill_dag.data.manifest import Manifest
    from distill_dag.model.variants import build_student

    torch.manual_seed(cfg.train.seed)
    np.random.default_rng(cfg.train.seed)
    vocab = Manifest.load(cfg.tokenized_dir).vocab_size
    model = build_student(cfg.student, vocab)
    assert sum(p.numel() for p in model.parameters()) > 0
    batch = next(iter(make_loader(cfg.tokenized_dir, "train", batch_size=cfg.train.batch_size, seed=cfg.train.seed)))
    assert batch["input_ids"].shape[0] == cfg.train.batch_size
    ev = next(iter(make_loader(cfg.tokenized_dir, "val", batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)))
    assert 1 <= ev["input_ids"].shape[0] <= cfg.eval.batch_size


def test_every_numeric_and_list_field_is_bounded(capsys):
    """The census the issue asks for; every numeric or list field carries a bound."""
    unbounded = [k for k, f, _ in TARGETS if not _bounded(f)]
    with capsys.disabled():
        print(f"\nconfig fields with bounds (numbers with ge/gt/le/lt, lists with length bounds): "
              f"{sum(_bounded(f) for _, f, _ in TARGETS)} of {len(TARGETS)} numeric and list fields")
    # betas is a fixed-length tuple of bounded floats (its length is the type's): bounded in its items
    assert [k for k in unbounded if k != "train.betas"] == [], unbounded


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_random_values_are_refused_naming_the_key_or_start_a_run(base, data):
    key, _, kind = data.draw(st.sampled_from(TARGETS), label="field")
    value = data.draw(VALUES[kind], label="value")
    note(f"{key} = {value!r}")
    try:
        cfg = config_from_dict(_set(base, key, value))
    except ConfigError as err:
        # the full key, or (a section's cross-field check) the section's key with the field's name in the text
        section, leaf = key.split(".")[0], key.rsplit(".", 1)[-1]
        named = f"key '{key}" in str(err) or (f"key '{section}'" in str(err) and leaf in str(err))
        assert named, f"{key} = {value!r} refused without naming the key:\n{err}"
        return
    t0 = time.perf_counter()
    _start(cfg)
    took = time.perf_counter() - t0
    assert took < START_LIMIT_S, f"{key} = {value!r}: the run took {took:.1f} s to start"


def test_the_boundaries_themselves(base):
    """Hypothesis may not hit every field's largest accepted value in 60 examples: the sizes that reach the
    start (batch sizes, chunk, seeds) are started at their upper bound explicitly."""
    for key, value in (("train.batch_size", 1 << 16), ("eval.batch_size", 1 << 16), ("student.chunk_size", 4096),
                       ("train.seed", 2**32 - 1), ("eval.seed", 2**32 - 1)):
        cfg = config_from_dict(_set(base, key, value))
        t0 = time.perf_counter()
        _start(cfg)
        assert time.perf_counter() - t0 < START_LIMIT_S, key
        with pytest.raises(ConfigError, match=rf"key '{key}'"):
            config_from_dict(_set(base, key, value + 1))


_CRON_TOKEN = st.one_of(st.just("*"), st.integers(-1, 70).map(str), st.sampled_from(["jan", "DEC", "mon", "sun", "L",
                                                                                     "1#2", "x", ""]))
_CRON_ITEM = st.tuples(_CRON_TOKEN, st.one_of(st.just(""), _CRON_TOKEN.map(lambda t: "-" + t)),
                       st.one_of(st.just(""), st.integers(-1, 70).map(lambda s: f"/{s}"))).map("".join)
_CRON = st.one_of(st.lists(st.lists(_CRON_ITEM, min_size=1, max_size=3).map(",".join), min_size=4, max_size=6)
                  .map(" ".join), st.sampled_from(["@daily", "@hourly", "@reboot", "every tuesday"]), st.text(max_size=20))


@settings(max_examples=300, deadline=None)
@given(expr=_CRON)
def test_a_cron_string_the_config_accepts_is_one_dagster_accepts(expr):
    """data.retokenize_cron is checked without importing Dagster (the core stays light); the reference is
    Dagster's own validator, which the code location runs when it loads: whatever the config accepts, it
    accepts too (ours is stricter: no L, #, or wrap-around ranges)."""
    from dagster._utils.schedules import is_valid_cron_string

    from distill_dag.config import cron_error

    if cron_error(expr) is None:
        assert is_valid_cron_string(expr), expr
    else:
        with pytest.raises(ConfigError, match=r"key 'data.retokenize_cron'"):
            config_from_dict({"data": {"retokenize_cron": expr}})
