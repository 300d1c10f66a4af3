"""Run configuration: one pydantic model tree shared by the CLI and the Dagster assets.

A YAML file under ``configs/`` holds a whole :class:`PipelineConfig`; every section has defaults,
so a file only names what it changes. Unknown keys and wrong types are errors that name the key
(``extra="forbid"`` everywhere). Paths are relative to the project root unless absolute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(os.environ.get("DISTILL_DAG_CONFIG_DIR", PROJECT_ROOT / "configs"))
DEFAULT_CONFIG = "demo.yaml"


class ConfigError(ValueError):
    """A config file or dict that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# data: raw_jsonl, tokenizer, tokenized_parquet
# --------------------------------------------------------------------------------------------
class SourceConfig(Section):
    """One raw source. ``kind`` picks how rows are gathered into JSONL under ``data.root/raw``."""

    name: str
    kind: Literal["stdlib", "jsonl", "hf", "catalog"]
    # jsonl: a file, a directory or a glob (relative to the project root)
    path: str | None = None
    recursive: bool = True
    # hf: dataset id on the hub or a local dataset directory / data files
    dataset: str | None = None
    subset: str | None = None
    split: str = "train"
    # maps our field -> their field, e.g. {"prompt": "question", "response": "answer"}
    field_map: dict[str, str] = Field(default_factory=dict)
    max_rows: int | None = None
    # stdlib: how many bytes of the running Python's standard library to gather
    max_bytes: int = 30_000_000
    # catalog: categories of the curated catalog (distill_dag/data/catalog.yaml)
    categories: list[str] = Field(default_factory=list)
    category: str = "general"
    # hf: a hub revision (e.g. "refs/convert/parquet" for script-based datasets); streaming reads
    # only the rows needed instead of downloading the whole split
    revision: str | None = None
    streaming: bool = False


class DataConfig(Section):
    root: str = "data"
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(name="stdlib", kind="stdlib")]
    )
    # the run fails when more than this fraction of rows of a source is rejected
    max_reject_rate: float = Field(0.05, ge=0.0, le=1.0)
    # the re-tokenization schedule and the new-raw-data sensor
    retokenize_cron: str = "0 3 * * *"
    watch_dir: str | None = None
    # a JSONL line longer than this is rejected without being read into memory
    max_line_bytes: int = Field(16 * 2**20, ge=1024)
    # rows per raw JSONL part file (each part is written atomically; a rerun resumes after the last)
    rows_per_part: int = Field(10_000, ge=1)


class TokenizerConfig(Section):
    # hub name or local directory for AutoTokenizer; None trains a byte-level BPE on raw_jsonl
    name_or_path: str | None = None
    vocab_size: int = Field(4096, ge=256)
    min_frequency: int = 2
    train_bytes: int = 20_000_000


class TokenizeConfig(Section):
    max_seq_length: int = Field(1024, ge=8)
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    rows_per_shard: int = Field(8192, ge=1)
    skip_existing: bool = True
    force: bool = False
    num_proc: int = Field(2, ge=1)
    mask_prompt: bool = True
    # documents per encode_batch call
    batch_docs: int = Field(1024, ge=1)


# --------------------------------------------------------------------------------------------
# teacher: teacher_adapters, logit_cache, teacher providers
# --------------------------------------------------------------------------------------------
class TeacherConfig(Section):
    # hub name or local directory; None with ``init_tiny`` builds a random-init tiny Llama (demo)
    model_name_or_path: str | None = "meta-llama/Llama-3.2-1B"
    adapter_path: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # network mode
    url: str = "http://127.0.0.1:8765"
    api: Literal["topk", "vllm"] = "topk"
    token_env: str = "DISTILL_TEACHER_TOKEN"
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0
    batch_rows: int = 8
    # demo: a tiny Llama initialised at random then fully finetuned on the demo corpus
    init_tiny: dict[str, Any] | None = None
    # serve-teacher: where it listens and the largest request (batch x length x k) it accepts (413 above)
    serve_host: str = "127.0.0.1"
    serve_port: int = 8765
    max_request_elems: int = Field(1 << 25, ge=1)
    # api vllm: the served model name (None: the first of GET /v1/models)
    vllm_model: str | None = None


class TeacherFinetuneConfig(Section):
    mode: Literal["lora", "full"] = "lora"
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 1000
    warmup_steps: int = 50
    eval_interval: int = 100
    eval_batches: int = 20
    early_stopping_patience: int = 3
    save_interval: int = 200
    merge: bool = False
    output_dir: str = "runs/teacher_ft"
    seed: int = 0
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine decays to learning_rate * min_lr_ratio
    grad_clip: float = Field(1.0, ge=0.0)  # 0 = no clipping
    log_interval: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # the seed's "expect 10%+": checked against the measured relative val-ppl improvement, never assumed
    expected_improvement: float = 0.10


class LogitCacheConfig(Section):
    k: int = Field(64, ge=1, le=1024)
    dir: str = "data/logit_cache"
    batch_rows: int = 8
    # log-prob encoding (distill_dag/distill/logit_cache.py): q8 = 1 byte/entry, fp16 = 2, fp32 = 4 (exact)
    dtype: Literal["q8", "fp16", "fp32"] = "q8"
    # check each cache shard's sha256 when the cached teacher first opens it
    verify: bool = True


# --------------------------------------------------------------------------------------------
# student and training
# --------------------------------------------------------------------------------------------
class StudentConfig(Section):
    variant: str = "500M"  # tiny | 350M | 500M (distill_dag/model/variants.py)
    # overrides of the variant's RetNetConfig fields, e.g. {"num_hidden_layers": 2}
    overrides: dict[str, Any] = Field(default_factory=dict)
    init: Literal["scratch", "from_teacher"] = "scratch"
    chunk_size: int = Field(64, ge=1)  # chunkwise retention; a power of two >= 16 for the Triton kernel
    gradient_checkpointing: bool = False
    # auto: Triton on CUDA, PyTorch chunkwise elsewhere; fla needs flash-linear-attention and CUDA
    retention_backend: Literal["auto", "torch", "triton", "fla"] = "auto"


class AlignConfig(Section):
    """Stage 1 of ``student.init: from_teacher`` (distill_dag/distill/align.py): the converted student's
    retention layers trained, teacher frozen, to reproduce each teacher layer's attention output (MSE)."""

    steps: int = Field(200, ge=0)  # 0: convert only, KD starts from the unaligned conversion
    # 1: V/O copied as they are (value dim = d); 2: the paper's 2d, the extra half zero-initialised
    value_factor: Literal[1, 2] = 1
    learning_rate: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 = no clipping
    batch_size: int = Field(8, ge=1)
    log_interval: int = Field(10, ge=1)
    eval_interval: int = Field(50, ge=0)  # per-layer held-out MSE; 0 = only before and after
    eval_batches: int = Field(4, ge=1)
    save_interval: int = Field(100, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    output_dir: str | None = None  # default <train run dir>_aligned


class TrainConfig(Section):
    teacher_mode: Literal["direct", "cached", "network"] = "direct"
    pretrain_ce_only: bool = False
    # loss
    teacher_topk: int = Field(512, ge=1)
    temperature: float = Field(2.0, gt=0.0)
    distill_alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of KL; (1 - alpha) weights CE
    tail: Literal["renormalize", "bucket"] = "renormalize"
    diversity_weight: float = Field(0.0, ge=0.0)
    loss_chunk_tokens: int = Field(1024, ge=1)
    # optimisation
    optimizer: Literal["muon", "adamw"] = "muon"
    learning_rate: float = 1e-3
    muon_learning_rate: float = 0.02
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = Field(1e-8, gt=0.0)
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    # torch.optim.Muon's LR shape adjustment: "original" (Keller Jordan's, pairs with lr ~0.02) or
    # "match_rms_adamw" (Moonshot's: update RMS like AdamW's, so AdamW's lr can be reused)
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    # stability
    max_nan_streak: int = 10
    enable_saddle_interventions: bool = False
    saddle_window: int = 50
    saddle_rel_improvement: float = 0.01
    saddle_grad_norm: float = 0.05
    saddle_lr_boost: float = 3.0
    saddle_boost_steps: int = 50
    saddle_cooldown: int = 200
    # bookkeeping
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 200
    eval_batches: int = 20
    save_interval: int = 200
    keep_checkpoints: int = 2
    output_dir: str | None = None  # default runs/<teacher_mode>/
    resume_from: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_logits: bool = False  # direct mode also writes the logit cache (logit_cache.dir)
    # also train a CE-only student with the same steps and data, to show what KD adds
    ce_only_baseline: bool = False
    launcher: Literal["in_process", "torchrun"] = "in_process"
    nproc_per_node: int = 1
    # with several ranks (torchrun): ddp = whole student per rank; fsdp = parameters, gradients and
    # optimizer state sharded (FSDP2), for students that do not fit one device
    parallel: Literal["ddp", "fsdp"] = "ddp"
    dist_timeout_s: float = Field(1800.0, gt=0)  # a collective waiting longer fails (a dead or hung rank)


class EvalConfig(Section):
    split: Literal["val", "train"] = "val"
    max_batches: int = 50
    niah: bool = True
    niah_context_lengths: list[int] = Field(default_factory=lambda: [256, 512, 1024])
    niah_depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    niah_trials: int = 3
    sample_prompts: int = 3
    max_new_tokens: int = 32
    batch_size: int = Field(8, ge=1)
    niah_max_new_tokens: int = Field(8, ge=1)  # a 5-digit key needs at most a few tokens
    sample_prompt_tokens: int = Field(32, ge=1)
    seed: int = 0
    output_dir: str | None = None  # default <run_dir>/eval


class WandbConfig(Section):
    project: str = "distill-dag"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


class PipelineConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teacher_ft: TeacherFinetuneConfig = Field(default_factory=TeacherFinetuneConfig)
    logit_cache: LogitCacheConfig = Field(default_factory=LogitCacheConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    def path(self, p: str | os.PathLike) -> Path:
        """Resolve a config path: absolute stays, relative is under the project root."""
        p = Path(p)
        return p if p.is_absolute() else PROJECT_ROOT / p

    @property
    def data_root(self) -> Path:
        return self.path(self.data.root)

    # The on-disk layout every stage and asset agrees on.
    @property
    def raw_dir(self) -> Path:
        return self.data_root / "raw"

    @property
    def tokenizer_dir(self) -> Path:
        """The resolved tokenizer (a trained BPE, or a copy of the hub/local one)."""
        return self.data_root / "tokenizer"

    @property
    def tokenized_dir(self) -> Path:
        return self.data_root / "tokenized"

    @property
    def teacher_ft_dir(self) -> Path:
        return self.path(self.teacher_ft.output_dir)

    @property
    def cache_dir(self) -> Path:
        return self.path(self.logit_cache.dir)

    @property
    def run_dir(self) -> Path:
        return self.path(self.train.output_dir or f"runs/{self.train.teacher_mode}")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}' (remove it or check its spelling)")
        else:
            lines.append(f"  key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name: str | os.PathLike | None) -> Path:
    """``None`` -> configs/demo.yaml; a bare name -> configs/<name>; else the given path."""
    if name is None:
        return CONFIG_DIR / DEFAULT_CONFIG
    p = Path(name)
    if p.exists():
        return p
    if not p.is_absolute() and (CONFIG_DIR / p).exists():
        return CONFIG_DIR / p
    raise ConfigError(f"config file not found: {name} (looked in . and {CONFIG_DIR})")


def load_config(name: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML config; ``overrides`` is a nested dict merged on top (CLI flags, Dagster run config).

    A YAML file may start with ``base: other.yaml`` to inherit from another file of the same folder.
    """
    path = resolve_config_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        parent = load_config(path.parent / base).model_dump(mode="json")
        raw = deep_merge(parent, raw)
    if overrides:
        raw = deep_merge(raw, overrides)
    return config_from_dict(raw, str(path))
