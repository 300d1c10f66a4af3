"""The config schema: one pydantic model tree shared by the CLI and the Dagster assets.

A YAML file holds a whole :class:`PipelineConfig`; every section has defaults, so a file only names
what it changes. Every field carries a description (the Dagster Launchpad shows it, ``distill``'s flags
take it as their help), numeric bounds and, for choices, a ``Literal``; unknown keys, wrong types, values
out of bounds and NaN/inf are errors that name the key and the file (``extra="forbid"`` everywhere).
Fields that hold a path are marked :data:`PATH` / :data:`NAME_OR_PATH` (``distill_dag.config.paths``
resolves them). Loading a file: ``distill_dag.config.load``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from distill_dag.model.variants import override_errors

# Upper bounds shared by many fields; each exists so a typo (an extra zero, 2**64) is refused naming its key
# instead of overflowing a C long or allocating before it fails.
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 32 bits; torch's 64 would overflow at 2**64
MAX_STEPS = 10**9
MAX_EVAL_TOKENS = 1 << 17  # NIAH / prompt lengths: 128k tokens, the longest context a Llama-3 teacher has

# json_schema_extra markers of the fields that hold filesystem paths (see the module docstring)
PATH = {"path": "path"}
NAME_OR_PATH = {"path": "name_or_path"}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment,
    floats must be finite (NaN and inf are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False, use_attribute_docstrings=False)


def _f(default: Any, description: str, **kw: Any) -> Any:
    return Field(default, description=description, **kw)


def _factory(factory: Any, description: str, **kw: Any) -> Any:
    return Field(default_factory=factory, description=description, **kw)


PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


# --------------------------------------------------------------------------------------------
# data: raw_jsonl, tokenizer, tokenized_parquet
# --------------------------------------------------------------------------------------------
class SourceConfig(Section):
    """One raw source. ``kind`` picks how rows are gathered into JSONL under ``data.root/raw``."""

    name: str = Field(description="Name of the source; its JSONL goes to data.root/raw/<name>/", min_length=1)
    kind: Literal["stdlib", "jsonl", "hf", "catalog"] = Field(
        description="stdlib: this Python's standard library as text; jsonl: local files; hf: a Hugging Face "
                    "dataset; catalog: categories of the curated catalog")
    path: str | None = _f(None, "jsonl: a file, a directory or a glob; catalog: another catalog YAML "
                                "(relative to the config file)", json_schema_extra=PATH)
    recursive: bool = _f(True, "jsonl: also read .jsonl files in subdirectories")
    dataset: str | None = _f(None, "hf: dataset id on the hub, or a local dataset directory / data files",
                             json_schema_extra=NAME_OR_PATH)
    subset: str | None = _f(None, "hf: the dataset's configuration (subset) name")
    split: str = _f("train", "hf: the split to read", min_length=1)
    field_map: dict[str, str] = _factory(dict, "maps our field -> the dataset's field, e.g. "
                                               "{prompt: question, response: answer}")
    max_rows: int | None = _f(None, "at most this many rows of the source (null: all)", ge=1, le=10**12)
    max_bytes: int = _f(30_000_000, "stdlib: how many bytes of the standard library to gather", ge=1,
                        le=1 << 40)
    categories: list[str] = _factory(list, "catalog: categories to gather (distill_dag/data/catalog.yaml)",
                                  max_length=256)
    category: str = _f("general", "category recorded on each row of a jsonl/hf source", min_length=1)
    revision: str | None = _f(None, "hf: a hub revision (e.g. refs/convert/parquet for script-based datasets)")
    streaming: bool = _f(False, "hf: stream only the rows needed instead of downloading the whole split")


_CRON_FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
                ("month", 1, 12, "jan feb mar apr may jun jul aug sep oct nov dec"),
                ("day of week", 0, 7, "sun mon tue wed thu fri sat"))
_CRON_MACROS = {"@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually"}


def cron_error(expr: str) -> str | None:
    """Why ``expr`` is not a cron schedule Dagster accepts, or None. A strict 5-field parser (``*``, ``N``,
    ``N-M``, ``/step``, lists, month and weekday names) plus the @daily-style macros: the core cannot
    import Dagster's vendored croniter (that imports all of Dagster), and a string Dagster refuses would
    fail only when the code location loads, with a 26-frame traceback."""
    e = expr.strip()
    if e.lower() in _CRON_MACROS:
        return None
    parts = e.split()
    if len(parts) != 5:
        return (f"{expr!r} is not a cron schedule: it needs 5 fields (minute hour day-of-month month day-of-week), "
                f"e.g. '0 3 * * *' for 03:00 daily, or a macro like @daily")
    for text, (name, lo, hi, names) in zip(parts, _CRON_FIELDS):
        lookup = {n: i + lo for i, n in enumerate(names.split())} if names else {}
        if name == "day of week":
            lookup = {n: i for i, n in enumerate(names.split())}

        def value(tok: str) -> int:
            t = tok.lower()
            if t in lookup:
                return lookup[t]
            if not t.isdigit():
                raise ValueError(tok)
            v = int(t)
            if not lo <= v <= hi:
                raise ValueError(tok)
            return v

        for item in text.split(","):
            rng, _, step = item.partition("/")
            try:
                if step and (not step.isdigit() or int(step) < 1):
                    raise ValueError(step)
                if rng != "*":
                    a, dash, b = rng.partition("-")
                    if value(a) > (value(b) if dash else hi):
                        raise ValueError(rng)
            except ValueError as bad:
                return (f"{expr!r}: the {name} field {text!r} has {str(bad)!r}, which is not a value in "
                        f"[{lo}, {hi}]{' or a name (' + names + ')' if names else ''}, a range N-M or a step /N")
    return None


class DataConfig(Section):
    """Where the data lives and how raw sources are gathered (raw_jsonl)."""

    root: str = _f("data", "Data root: raw/, tokenizer/ and tokenized/ live under it", json_schema_extra=PATH,
                   min_length=1)
    tokenized_dir: str | None = _f(None, "The packed dataset folder (manifest.json + shards) training reads and "
                                         "tokenized_parquet writes (null: <root>/tokenized)", json_schema_extra=PATH)
    sources: list[SourceConfig] = _factory(lambda: [SourceConfig(name="stdlib", kind="stdlib")],
                                           "The raw sources gathered by raw_jsonl / distill download",
                                           max_length=256)
    max_reject_rate: float = _f(0.05, "The run fails when more than this fraction of a source's rows is rejected",
                                ge=0.0, le=1.0)
    retokenize_cron: str = _f("0 3 * * *", "Cron schedule of the re-tokenization job", min_length=1)
    watch_dir: str | None = _f(None, "Folder the new-raw-data sensor watches for JSONL (null: sensor off)",
                               json_schema_extra=PATH)
    max_line_bytes: int = _f(16 * 2**20, "A JSONL line longer than this is rejected without being read into memory",
                             ge=1024, le=1 << 30)
    rows_per_part: int = _f(10_000, "Rows per raw JSONL part file (each part written atomically; a rerun resumes)",
                            ge=1, le=100_000_000)

    @field_validator("retokenize_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        err = cron_error(v)
        if err:
            raise ValueError(err)
        return v


class TokenizerConfig(Section):
    """The tokenizer asset / distill tokenizer: a hub or local tokenizer, or a byte-level BPE trained here."""

    name_or_path: str | None = _f(None, "Hub name or local directory for AutoTokenizer; null trains a byte-level "
                                        "BPE on the raw JSONL", json_schema_extra=NAME_OR_PATH)
    vocab_size: int = _f(4096, "BPE vocabulary size (only when training a BPE)", ge=256, le=1 << 21)
    min_frequency: int = _f(2, "BPE: a merge needs at least this many occurrences", ge=1, le=10**9)
    train_bytes: int = _f(20_000_000, "BPE: train on the first this-many bytes of the raw text", ge=1,
                          le=1 << 40)
    dir: str | None = _f(None, "The local tokenizer folder every stage reads (null: <data.root>/tokenizer); when it "
                               "holds no tokenizer, name_or_path is fetched/copied into it", json_schema_extra=PATH)


class TokenizeConfig(Section):
    """Packing JSONL into fixed-length parquet rows (tokenized_parquet / distill preprocess)."""

    max_seq_length: int = _f(1024, "Tokens per packed row", ge=8, le=1 << 20)
    val_fraction: float = _f(0.02, "Share of documents held out as the val split (0 = no val split)",
                             ge=0.0, lt=1.0)
    rows_per_shard: int = _f(8192, "Rows per parquet shard", ge=1, le=1 << 24)
    skip_existing: bool = _f(True, "Re-tokenize only inputs whose content changed")
    force: bool = _f(False, "Re-tokenize and rewrite everything")
    mask_prompt: bool = _f(True, "prompt/response rows: no loss on the prompt's tokens (labels -100)")
    batch_docs: int = _f(1024, "Documents per encode_batch call", ge=1, le=1 << 20)
    min_rows: int = _f(1, "A build that would publish fewer packed rows (train + val) than this is refused and the "
                          "previous dataset stays published (inputs that are all empty never replace a dataset)",
                       ge=1, le=1 << 40)


class DataSections(Section):
    """The data stages' sections of :class:`PipelineConfig` (raw_jsonl, tokenizer, tokenized_parquet)."""

    data: DataConfig = _factory(DataConfig, "Raw sources and the data root")
    tokenizer: TokenizerConfig = _factory(TokenizerConfig, "The tokenizer")
    tokenize: TokenizeConfig = _factory(TokenizeConfig, "Packing into parquet shards")


# --------------------------------------------------------------------------------------------
# teacher: teacher_adapters, logit_cache, teacher providers
# --------------------------------------------------------------------------------------------
class TeacherConfig(Section):
    """The teacher model and how it is reached (direct, network server, vLLM)."""

    model_name_or_path: str | None = _f("meta-llama/Llama-3.2-1B", "Hub name or local directory of the teacher; "
                                        "null with init_tiny builds a random-init tiny Llama (demo)",
                                        json_schema_extra=NAME_OR_PATH)
    adapter_path: str | None = _f(None, "A peft (LoRA) adapter folder applied to the teacher", json_schema_extra=PATH)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Teacher weights' dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    url: str = _f("http://127.0.0.1:8765", "network mode: the teacher server's base URL (DISTILL_TEACHER_URL wins)",
                  min_length=1)
    api: Literal["topk", "vllm"] = _f("topk", "network mode: our binary /v1/topk, or a stock vLLM server")
    token_env: str = _f("DISTILL_TEACHER_TOKEN", "Environment variable holding the server's bearer token",
                        min_length=1)
    timeout_s: float = _f(60.0, "network mode: seconds per request", gt=0.0, le=86_400.0)
    max_retries: int = _f(5, "network mode: retries of a failed request", ge=0, le=100)
    backoff_s: float = _f(1.0, "network mode: first retry delay in seconds (doubles each retry)", ge=0.0,
                      le=3600.0)
    batch_rows: int = _f(8, "network mode: rows per request", ge=1, le=1 << 16)
    init_tiny: dict[str, Any] | None = _f(None, "demo: LlamaConfig fields of a random-init tiny teacher "
                                                "(with model_name_or_path null)")
    serve_host: str = _f("127.0.0.1", "serve-teacher: bind address", min_length=1)
    serve_port: int = _f(8765, "serve-teacher: port", ge=0, le=65535)
    max_request_elems: int = _f(1 << 25, "serve-teacher: largest request (batch x length x k); 413 above", ge=1,
                               le=1 << 34)
    serve_max_seq_len: int | None = _f(None, "serve-teacher: longest row accepted (413 above); null: the model's "
                                             "max_position_embeddings", ge=1, le=1 << 22)
    serve_max_buffered_bytes: int = _f(1 << 30, "serve-teacher: request and answer bytes held at once across all "
                                                "requests (503 when full)", ge=1, le=1 << 40)
    serve_unit_tokens: int = _f(4096, "serve-teacher: tokens per scheduling unit (requests are served round "
                                      "robin, a unit at a time, so a long one cannot starve short ones)", ge=1,
                                  le=1 << 24)
    serve_body_timeout_s: float = _f(30.0, "serve-teacher: seconds a request body may take to arrive, plus 1 s per "
                                           "serve_body_min_rate bytes received (408 after; a stalled client's bytes "
                                           "are returned to the budget)", gt=0.0, le=3600.0)
    serve_body_min_rate: int = _f(1 << 20, "serve-teacher: bytes per second a request body must keep up, on average, "
                                           "past serve_body_timeout_s", ge=1, le=1 << 40)
    serve_allow_no_token: bool = _f(False, "serve-teacher: allow a non-loopback bind without a bearer token "
                                           "(anyone who reaches the port can use the teacher)")
    vllm_model: str | None = _f(None, "api vllm: the served model name (null: the first of GET /v1/models)")


# --------------------------------------------------------------------------------------------
# the training loop: teacher_ft, align and train share its fields
# --------------------------------------------------------------------------------------------
# Each loop knob's type carries its bounds (and its wording, where every loop means the same), declared once;
# a section that has the knob sets its own default (``warmup_steps: WarmupSteps = 10``), and its own wording
# only where the knob says more there.
LearningRate = Annotated[float, Field(gt=0.0, le=10.0, description="Peak learning rate (AdamW)")]
WeightDecay = Annotated[float, Field(ge=0.0, le=100.0, description="AdamW weight decay")]
WarmupSteps = Annotated[int, Field(ge=0, le=MAX_STEPS, description="Linear warm-up steps")]
BatchSize = Annotated[int, Field(ge=1, le=1 << 16)]
EvalInterval = Annotated[int, Field(ge=0, le=MAX_STEPS)]
EvalBatches = Annotated[int, Field(ge=1, le=MAX_STEPS)]
SaveInterval = Annotated[int, Field(ge=0, le=MAX_STEPS,
                                    description="Checkpoint every this many steps (0 = only the final one)")]
KeepCheckpoints = Annotated[int, Field(ge=1, le=1000, description="Checkpoints kept")]
RunFolder = Annotated[str | None, Field(json_schema_extra=PATH)]
_RATE = TypeAdapter(LearningRate)
# validation-context key of the Muon LR rule (PipelineConfig._muon_follows_learning_rate): the new train.learning_rate
MUON_FOLLOWS_LR = "train.learning_rate scales train.muon_learning_rate"


def _rate(v: Any) -> float | None:
    """``v`` as a valid learning rate, or None (validation then names the key)."""
    try:
        return _RATE.validate_python(v)
    except ValidationError:
        return None


class LoopConfig(Section):
    """The fields of a training loop (a cosine schedule with warm-up, clipping, batches, held-out evals,
    checkpoints, seed, run folder), shared by teacher finetuning (``teacher_ft``), stage-1 alignment
    (``align``) and student training (``train``); each sets its own defaults."""

    learning_rate: LearningRate = 2e-4
    weight_decay: WeightDecay = 0.0
    warmup_steps: WarmupSteps = 50
    min_lr_ratio: float = _f(0.1, "Cosine decays to learning_rate * min_lr_ratio", ge=0.0, le=1.0)
    grad_clip: float = _f(1.0, "Gradient-norm clip (0 = no clipping)", ge=0.0, le=1e6)
    batch_size: BatchSize = _f(8, "Rows per micro-batch")
    log_interval: int = _f(10, "Log every this many steps", ge=1, le=MAX_STEPS)
    eval_interval: EvalInterval = _f(200, "Held-out eval every this many steps")
    eval_batches: EvalBatches = _f(20, "Batches per held-out eval")
    save_interval: SaveInterval = 200
    keep_checkpoints: KeepCheckpoints = 2
    seed: int = _f(0, "Random seed", ge=0, le=MAX_SEED)
    output_dir: RunFolder = _f(None, "Run folder")


_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TeacherFinetuneConfig(LoopConfig):
    """Finetuning the teacher on the tokenized data (teacher_adapters / distill finetune-teacher)."""

    mode: Literal["lora", "full"] = _f("lora", "lora: train a peft adapter; full: train every weight")
    lora_r: int = _f(32, "LoRA rank", ge=1, le=4096)
    lora_alpha: int = _f(64, "LoRA alpha (scale = alpha / r)", ge=1, le=1 << 16)
    lora_dropout: float = _f(0.1, "LoRA dropout", ge=0.0, lt=1.0)
    target_modules: list[str] = _factory(lambda: list(_LORA_TARGETS), "LoRA: the linear layers to adapt",
                                      max_length=64)
    batch_size: BatchSize = _f(4, "Rows per micro-batch")
    grad_accum: int = _f(1, "Micro-batches per optimizer step", ge=1, le=1 << 16)
    max_steps: int = _f(1000, "Optimizer steps", ge=1, le=MAX_STEPS)
    copy_warmup_steps: int = _f(0, "full mode, random-init teacher: the first this many of max_steps train on synthetic "
                                   "copy rows (random spans repeated, distill_dag/data/copy_rows.py), which make the "
                                   "induction circuit retrieval needs form; the corpus steps follow (0 = none)",
                                ge=0, le=1_000_000)
    copy_rows_per_batch: int = _f(0, "full mode, random-init teacher: synthetic copy rows added to every corpus "
                                     "micro-batch after the warm-up, so the corpus does not wash the copying out "
                                     "(0 = none)", ge=0, le=4096)
    pass_key_rows_per_batch: int = _f(0, "full mode, random-init teacher: this many rows of every corpus micro-batch "
                                         "after the copy warm-up become pass-key rows (the row's text with a pass key "
                                         "at a random depth and the question with its answer at the end, "
                                         "distill_dag/data/copy_rows.py): retrieval at every distance up to the "
                                         "training length, which packed retrieval documents cut (0 = none)",
                                      ge=0, le=4096)
    eval_interval: EvalInterval = _f(100, "Held-out eval every this many steps (0 = only before and after)")
    eval_batches: int = _f(20, "Batches per held-out eval (0 = the whole val split)", ge=0, le=MAX_STEPS)
    early_stopping_patience: int = _f(3, "Stop after this many evals without improvement (0 = never)", ge=0,
                                         le=1_000_000)
    merge: bool = _f(False, "lora: also write the adapter merged into the base weights")
    output_dir: str = _f("runs/teacher_ft", "Run folder (checkpoints, final adapter or model)",
                         json_schema_extra=PATH, min_length=1)
    keep_checkpoints: KeepCheckpoints = _f(2, "Checkpoints kept (older ones are deleted)")
    expected_improvement: float = _f(0.10, "The relative held-out perplexity improvement the run is checked "
                                           "against (measured, never assumed)", ge=0.0, lt=1.0)


class LogitCacheConfig(Section):
    """The teacher's top-k log-prob cache (logit_cache / distill cache-logits / teacher_mode cached)."""

    k: int = _f(64, "Entries per position (the teacher's top-k); at most the vocabulary", ge=1, le=1024)
    dir: str = _f("data/logit_cache", "Cache folder", json_schema_extra=PATH, min_length=1)
    batch_rows: int = _f(8, "Rows per teacher forward while caching", ge=1, le=1 << 16)
    dtype: Literal["compact", "q8", "fp16", "fp32"] = _f(
        "q8", "Record codec: q8 = 1 byte/entry + bit-packed ids (fast to encode); compact = sorted id sets "
              "(exp-Golomb gaps / Elias-Fano) + companded log-probs under a per-row bit budget (~2 B/entry at vocab "
              "128k, under DistillKit's bytes, mean |dKL| < 1e-3; ~15x slower to encode than q8, ties may reorder "
              "ranks): for caches whose size matters more than their writing speed; fp16 = 2; fp32 = 4 (exact)")
    verify: bool = _f(True, "Check each cache shard's sha256 when the cached teacher first opens it")


class TeacherSections(Section):
    """The teacher's sections of :class:`PipelineConfig` (teacher_adapters, logit_cache, the providers)."""

    teacher: TeacherConfig = _factory(TeacherConfig, "The teacher and how it is reached")
    teacher_ft: TeacherFinetuneConfig = _factory(TeacherFinetuneConfig, "Teacher finetuning")
    logit_cache: LogitCacheConfig = _factory(LogitCacheConfig, "The teacher's top-k logit cache")


# --------------------------------------------------------------------------------------------
# student and training
# --------------------------------------------------------------------------------------------
class HybridLayers(Section):
    """Which layers of a student stay softmax attention (a hybrid RetNet); none by default (a pure RetNet)."""

    attention_layers: list[Annotated[int, Field(ge=0, le=4095)]] | Literal["auto"] = _f(
        [], "Layer indices that stay softmax attention (GQA + RoPE, the teacher's own weights with "
            "init from_teacher), or auto: after stage-1 alignment keep the num_attention_layers layers whose "
            "restoration lowers the KL to the teacher most (needs init from_teacher). [] = a pure RetNet")
    num_attention_layers: int = _f(0, "With attention_layers auto: how many layers to keep (K)", ge=0, le=4096,
                                   validate_default=True)
    attention_window: int | None = _f(None, "null: full causal attention; N: a sliding window of N tokens "
                                            "(generation keeps a rolling K/V buffer of N)", ge=1, le=1 << 20)
    retention_window: int | None = _f(None, "N: every retention layer also attends with softmax to the last N "
                                            "tokens (LoLCATs / Liger: exact local attention beside retention; "
                                            "a rolling K/V buffer of N in generation); null: none", ge=1, le=1 << 16)

    @field_validator("attention_layers")
    @classmethod
    def _unique_layers(cls, v: Any) -> Any:
        if v != "auto" and len(set(v)) != len(v):
            raise ValueError(f"{v} lists a layer twice")
        return v

    @field_validator("num_attention_layers")
    @classmethod
    def _k_fits_layers(cls, v: int, info: Any) -> int:
        layers = info.data.get("attention_layers")
        if layers == "auto" and v < 1:
            raise ValueError("attention_layers auto needs num_attention_layers >= 1 (how many to keep)")
        if isinstance(layers, list) and v not in (0, len(layers)):
            raise ValueError(f"{v} with an explicit list of {len(layers)} attention_layers: leave it 0 or use "
                             "attention_layers auto")
        return v

    @property
    def is_hybrid(self) -> bool:
        return self.attention_layers == "auto" or bool(self.attention_layers) or self.retention_window is not None


class StudentConfig(HybridLayers):
    """The RetNet student."""

    variant: Literal["tiny", "350M", "500M"] = _f("500M", "RetNet size (distill_dag/model/variants.py)")
    overrides: dict[str, Any] = _factory(dict, "Overrides of the variant's RetNetConfig fields, e.g. "
                                               "{num_hidden_layers: 2}")
    init: Literal["scratch", "from_teacher"] = _f("scratch", "scratch: random init; from_teacher: converted from "
                                                             "the teacher, then aligned (align.*)")
    chunk_size: int = _f(64, "Chunkwise retention chunk; a power of two >= 16 for the Triton kernel", ge=1,
                          le=4096)
    gradient_checkpointing: bool = _f(False, "Recompute each block in the backward pass (less memory)")
    retention_backend: Literal["auto", "torch", "triton", "fla"] = _f(
        "auto", "auto: Triton on CUDA, PyTorch chunkwise elsewhere; fla needs flash-linear-attention and CUDA")


class AlignConfig(LoopConfig):
    """Stage 1 of ``student.init: from_teacher`` (distill_dag/student/align.py): the converted student's
    retention layers trained, teacher frozen, to reproduce each teacher layer's attention output (MSE)."""

    steps: int = _f(200, "Alignment steps (0: convert only; KD starts from the unaligned conversion)", ge=0,
                   le=MAX_STEPS)
    value_factor: Literal[1, 2] = _f(1, "1: V/O copied as they are (value dim = d); 2: the paper's 2d, the extra "
                                        "half zero-initialised")
    learning_rate: LearningRate = 3e-3
    warmup_steps: WarmupSteps = 10
    batch_size: BatchSize = _f(8, "Rows per step")
    eval_interval: EvalInterval = _f(50, "Per-layer held-out MSE every this many steps (0 = only before and after)")
    eval_batches: EvalBatches = _f(4, "Batches per eval")
    save_interval: SaveInterval = 100
    output_dir: RunFolder = _f(None, "Run folder (null: <train run dir>_aligned)")


class TrainConfig(LoopConfig):
    """Training the student: KD from the teacher (direct, cached or network), or CE only."""

    teacher_mode: Literal["direct", "cached", "network"] = _f(
        "direct", "direct: the teacher in this process; cached: read logit_cache; network: ask teacher.url")
    pretrain_ce_only: bool = _f(False, "CE only: no teacher is loaded")
    teacher_topk: int = _f(512, "Teacher top-k entries per position the KD loss uses; at most the vocabulary",
                           ge=1, le=1 << 16)
    temperature: float = _f(2.0, "KD temperature, applied to teacher and student alike (KD term scaled by T^2)",
                            gt=0.0, le=100.0)
    distill_alpha: float = _f(0.5, "Weight of the KL term; (1 - alpha) weights CE", ge=0.0, le=1.0)
    tail: Literal["renormalize", "bucket"] = _f("renormalize", "Probability outside the top-k: renormalize the "
                                                               "top-k, or model it as one tail bucket")
    diversity_weight: float = _f(0.0, "Weight of the diversity term (0 = off)", ge=0.0, le=1000.0)
    loss_chunk_tokens: int = _f(1024, "Tokens per chunk of the chunked LM-head + loss", ge=1,
                                   le=1 << 24)
    optimizer: Literal["muon", "adamw"] = _f("muon", "muon: Muon on 2-D hidden matrices + AdamW on the rest; "
                                                     "adamw: AdamW everywhere")
    learning_rate: LearningRate = _f(1e-3, "Peak AdamW learning rate")
    muon_learning_rate: LearningRate = _f(0.02, "Peak Muon learning rate (hidden matrices)")
    weight_decay: WeightDecay = _f(0.01, "Decoupled weight decay")
    betas: tuple[Beta, Beta] = _f((0.9, 0.95), "AdamW betas, each in [0, 1)")
    adam_eps: float = _f(1e-8, "AdamW epsilon", gt=0.0, le=1.0)
    muon_momentum: float = _f(0.95, "Muon momentum", ge=0.0, lt=1.0)
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = _f(
        "original", "torch.optim.Muon's LR shape adjustment: original (Keller Jordan's, pairs with lr ~0.02) or "
                    "match_rms_adamw (Moonshot's: update RMS like AdamW's, so AdamW's lr can be reused)")
    muon_ns_dtype: Literal["auto", "bfloat16", "float32"] = _f(
        "auto", "dtype of Muon's Newton-Schulz orthogonalisation: auto = bfloat16 (torch.optim.Muon's own) on CUDA and "
                "on CPUs with native bf16 (AMX, AVX512-BF16), else float32 (emulated bf16 is far slower: bench/cpu_paths.py)")
    autocast: Literal["auto", "bfloat16", "off"] = _f(
        "auto", "Mixed precision of the training forward passes (students, alignment, teacher finetuning): bf16 "
                "autocast, with fp32 weights, optimizer states, retention and loss math. auto = on CUDA and on CPUs "
                "with native bf16 (AMX, AVX512-BF16; step times: bench/cpu_paths.py), off elsewhere (emulated bf16 "
                "is slower than fp32); off = float32 throughout. Held-out loss and perplexity run in fp32; "
                "alignment's held-out MSE follows this setting, as its training does")
    warmup_steps: WarmupSteps = 100
    max_steps: int = _f(1000, "Optimizer steps (0 only with student.init from_teacher: stage 1 alone)", ge=0,
                        le=MAX_STEPS)
    batch_size: BatchSize = _f(8, "Rows per micro-batch (per rank under torchrun)")
    grad_accum: int = _f(1, "Micro-batches per optimizer step", ge=1, le=1 << 16)
    max_nan_streak: int = _f(10, "Consecutive non-finite steps (skipped) before the run is declared diverged", ge=1,
                             le=1_000_000)
    enable_saddle_interventions: bool = _f(False, "Boost the LR for a while when the loss plateaus with small "
                                                  "gradients")
    saddle_window: int = _f(50, "Saddle detection: steps compared", ge=1, le=1_000_000)
    saddle_rel_improvement: float = _f(0.01, "Saddle detection: relative loss improvement below which it is a "
                                             "plateau", ge=0.0, le=1.0)
    saddle_grad_norm: float = _f(0.05, "Saddle detection: gradient norm below which it is small", ge=0.0,
                                   le=1e6)
    saddle_lr_boost: float = _f(3.0, "LR multiplier during an intervention", ge=1.0, le=100.0)
    saddle_boost_steps: int = _f(50, "Steps an intervention lasts", ge=1, le=MAX_STEPS)
    saddle_cooldown: int = _f(200, "Steps after an intervention before another one", ge=0, le=MAX_STEPS)
    log_interval: int = _f(10, "Log every this many steps (0 = never)", ge=0, le=MAX_STEPS)
    eval_interval: EvalInterval = _f(200, "Held-out eval every this many steps (0 = never)")
    output_dir: RunFolder = _f(None, "Run folder (null: runs/<teacher_mode>/)")
    resume_from: str | None = _f(None, "A checkpoint folder or a run folder (follows checkpoint_latest)",
                                 json_schema_extra=PATH)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: CUDA when present")
    ce_only_baseline: bool = _f(False, "Also train a CE-only student with the same steps and data, to show what "
                                       "KD adds")
    launcher: Literal["in_process", "torchrun"] = _f("in_process", "student_ckpt: train in the Dagster step, or "
                                                                   "launch torchrun through Dagster Pipes")
    nproc_per_node: int = _f(1, "torchrun: processes (GPUs) per node", ge=1, le=1024)
    parallel: Literal["ddp", "fsdp"] = _f("ddp", "With several ranks: ddp = whole student per rank; fsdp = "
                                                 "parameters, gradients and optimizer state sharded (FSDP2)")
    dist_timeout_s: float = _f(1800.0, "A collective waiting longer fails (a dead or hung rank)", gt=0.0,
                                  le=7 * 86_400.0)

    _muon_scaled: tuple[float, float, float] | None = PrivateAttr(None)

    @property
    def muon_scaled(self) -> tuple[float, float, float] | None:
        """``(the config's learning_rate, its muon_learning_rate, the factor)`` when the Muon LR rule scaled
        muon_learning_rate at load, else None."""
        return self._muon_scaled


class HybridConfig(HybridLayers):
    """A second, hybrid student trained beside the KD student (the ``student_hybrid`` asset,
    ``<train run dir>_hybrid``): converted from the teacher (stage 1 in ``<train run dir>_hybrid_aligned``),
    the listed or KL-chosen layers kept as the teacher's attention, then trained like the KD student (same
    train.* settings, teacher mode, steps and tokens), so the two compare at equal tokens."""

    enabled: bool = _f(False, "Train the hybrid student (student_hybrid); off: the asset is skipped")
    learning_rate: float | None = _f(None, "Peak AdamW learning rate of the hybrid's KD (null: train.learning_rate): a "
                                           "converted student starts near the teacher, and a scratch student's rate "
                                           "undoes what it copied", gt=0.0, le=10.0)
    muon_learning_rate: float | None = _f(None, "Peak Muon learning rate of the hybrid's KD (null: "
                                                "train.muon_learning_rate)", gt=0.0, le=10.0)


class StudentSections(Section):
    """The student's sections of :class:`PipelineConfig` (student_aligned, student_ckpt, student_ce_baseline,
    student_hybrid)."""

    student: StudentConfig = _factory(StudentConfig, "The RetNet student")
    train: TrainConfig = _factory(TrainConfig, "Student training (KD or CE only)")
    align: AlignConfig = _factory(AlignConfig, "Stage 1 of student.init from_teacher")
    hybrid: HybridConfig = _factory(HybridConfig, "A hybrid student beside the KD student (student_hybrid)")


class EvalConfig(Section):
    """Evaluation (eval_report / distill eval): perplexity, needle-in-a-haystack, samples."""

    split: Literal["val", "train"] = _f("val", "Split evaluated")
    max_batches: int = _f(50, "Perplexity batches (0 = the whole split)", ge=0, le=MAX_STEPS)
    niah: bool = _f(True, "Run the needle-in-a-haystack test")
    niah_context_lengths: list[Annotated[int, Field(ge=16, le=MAX_EVAL_TOKENS)]] = _factory(
        lambda: [256, 512, 1024], "NIAH haystack lengths in tokens", min_length=1, max_length=64)
    niah_depths: list[Fraction] = _factory(lambda: [0.1, 0.5, 0.9], "NIAH needle depths, each in [0, 1]",
                                           min_length=1, max_length=64)
    niah_trials: int = _f(3, "NIAH trials per (length, depth)", ge=1, le=1000)
    sample_prompts: int = _f(3, "Sample generations in the report", ge=0, le=1000)
    max_new_tokens: int = _f(32, "Tokens per sample generation", ge=1, le=4096)
    batch_size: int = _f(8, "Rows per eval batch", ge=1, le=1 << 16)
    niah_max_new_tokens: int = _f(8, "Tokens generated per NIAH answer (a 5-digit key needs a few)", ge=1, le=256)
    long_context: bool = _f(True, "Perplexity by position and context length beyond the training length, and "
                                  "generation memory / ms per token at each length")
    long_context_multiples: list[Annotated[int, Field(ge=1, le=64)]] = _factory(
        lambda: [1, 2, 4, 8], "Long-context lengths as multiples of tokenize.max_seq_length", min_length=1,
        max_length=64)
    long_context_contexts: int = _f(4, "Held-out windows scored per long-context length", ge=1, le=1000)
    sample_prompt_tokens: int = _f(32, "Prompt tokens per sample generation", ge=1, le=MAX_EVAL_TOKENS)
    seed: int = _f(0, "Random seed", ge=0, le=MAX_SEED)
    output_dir: str | None = _f(None, "Report folder (null: <run_dir>/eval)", json_schema_extra=PATH)
    lm_eval_tasks: list[Annotated[str, Field(min_length=1, max_length=4096)]] = _factory(
        lambda: ["distill_heldout_continuation", "distill_passkey"],
        "lm-evaluation-harness tasks run on the teacher and every student, reported as a share of the teacher "
        "(distill_dag/eval/harness.py): lm-eval task names (arc_easy, hellaswag, mmlu, ...: their data comes "
        "from the Hugging Face Hub), the offline tasks built from the held-out split (distill_heldout_continuation, "
        "distill_passkey), or paths to task YAMLs (relative to the config file). [] skips lm-eval",
        max_length=256, json_schema_extra=NAME_OR_PATH)
    lm_eval_limit: int | None = _f(None, "Examples per lm-eval task (null: every example)", ge=1, le=10**7)
    lm_eval_min_share: float = _f(0.8, "The lm_eval_share_vs_teacher check warns when the KD student's mean "
                                       "lm-eval share of the teacher is below this", ge=0.0, le=1.0)


class WandbConfig(Section):
    """Weights & Biases logging (online with WANDB_API_KEY, else offline)."""

    project: str = _f("distill-dag", "W&B project (WANDB_PROJECT wins)", min_length=1)
    entity: str | None = _f(None, "W&B entity (WANDB_ENTITY wins)")
    mode: Literal["auto", "online", "offline", "disabled"] = _f(
        "auto", "auto: online when WANDB_API_KEY is set, else offline")


# The data, teacher and student sections are declared beside their section classes (DataSections, ...);
# pydantic puts the fields of the bases first, the last base first: the YAML's sections in pipeline order.
class PipelineConfig(StudentSections, TeacherSections, DataSections):
    """The whole run configuration: one section per stage."""

    eval: EvalConfig = _factory(EvalConfig, "Evaluation")
    wandb: WandbConfig = _factory(WandbConfig, "Weights & Biases")

    @model_validator(mode="wrap")
    @classmethod
    def _muon_follows_learning_rate(cls, data: Any, handler: Any, info: ValidationInfo) -> Any:
        """The Muon LR rule of ``distill train --learning-rate X`` without ``--muon-learning-rate``: X is
        train.learning_rate and, with optimizer muon, train.muon_learning_rate is the config's scaled by the
        same factor (X / the config's train.learning_rate). X comes in the validation context
        (``{MUON_FOLLOWS_LR: X}``: ``load_config(..., context=...)``), so the config is parsed once;
        ``train.muon_scaled`` then says what was scaled."""
        lr = (info.context or {}).get(MUON_FOLLOWS_LR) if isinstance(data, dict) else None
        train = data.get("train", {}) if lr is not None else None
        if not isinstance(train, dict):
            return handler(data)
        fields = TrainConfig.model_fields
        old_lr = _rate(train.get("learning_rate", fields["learning_rate"].default))
        old_muon = _rate(train.get("muon_learning_rate", fields["muon_learning_rate"].default))
        new_lr, scaled = _rate(lr), None
        train = {**train, "learning_rate": lr}
        muon = train.get("optimizer", fields["optimizer"].default) == "muon"
        if muon and None not in (old_lr, old_muon, new_lr):
            scale = new_lr / old_lr
            train["muon_learning_rate"] = old_muon * scale
            scaled = (old_lr, old_muon, scale)
        out = handler({**data, "train": train})
        out.train._muon_scaled = scaled
        return out

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        errs = cross_field_errors(self)
        if errs:
            raise ValueError("; ".join(f"key '{k}': {m}" for k, m in errs))
        return self

    def path(self, p: str | os.PathLike) -> Path:
        """Resolve a config path: absolute stays, ``~`` expands, relative is under the current directory
        (paths from config files were already made absolute against their file's folder at load)."""
        p = Path(p).expanduser()
        return p if p.is_absolute() else Path.cwd() / p

    @property
    def data_root(self) -> Path:
        return self.path(self.data.root)

    # The on-disk layout every stage and asset agrees on.
    @property
    def raw_dir(self) -> Path:
        return self.data_root / "raw"

    @property
    def tokenizer_dir(self) -> Path:
        """The resolved tokenizer (a trained BPE, or a copy of the hub/local one): tokenizer.dir, else
        <data.root>/tokenizer (filled from tokenizer.name_or_path by ``data.tokenizer.ensure_tokenizer``)."""
        return self.path(self.tokenizer.dir) if self.tokenizer.dir else self.data_root / "tokenizer"

    @property
    def tokenized_dir(self) -> Path:
        return self.path(self.data.tokenized_dir) if self.data.tokenized_dir else self.data_root / "tokenized"

    @property
    def teacher_ft_dir(self) -> Path:
        return self.path(self.teacher_ft.output_dir)

    @property
    def cache_dir(self) -> Path:
        return self.path(self.logit_cache.dir)

    @property
    def run_dir(self) -> Path:
        return self.path(self.train.output_dir or f"runs/{self.train.teacher_mode}")


_SOURCE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def source_name_errors(names: list[str]) -> list[tuple[str, str]]:
    """``data.sources[i].name`` is a folder name (``<data.root>/raw/<name>/``, written and cleaned by the
    gather): one safe path component, unique after normalisation (case and trailing slashes), so no two
    sources share a folder and none reaches outside ``raw/``."""
    errs: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        key = f"data.sources[{i}].name"
        if not name or name[0] not in _SOURCE_NAME_CHARS - {".", "_", "-"} or not set(name) <= _SOURCE_NAME_CHARS \
                or len(name) > 100:
            errs.append((key, f"{name!r} is not a safe folder name: a source name becomes data.root/raw/<name>/, so "
                              "it must be one path component of letters, digits, '.', '_' and '-' (no '/', no '..', "
                              "not absolute, not starting with '.', '_' or '-'), at most 100 characters"))
        norm = name.rstrip("/\\").casefold()
        if norm in seen:
            errs.append((key, f"{name!r} names the same folder as data.sources[{seen[norm]}].name "
                              f"{names[seen[norm]]!r} (names are compared without case and trailing slashes): "
                              "each source needs its own name"))
        else:
            seen[norm] = i
    return errs


def cross_field_errors(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """Checks across sections, each naming its key; the vocabulary is checked where it is known here
    (a BPE trained by us has at most ``tokenizer.vocab_size``), else by :func:`check_vocab`."""
    errs: list[tuple[str, str]] = source_name_errors([s.name for s in cfg.data.sources])
    if cfg.train.max_steps == 0 and cfg.student.init != "from_teacher":
        errs.append(("train.max_steps", "0 trains nothing (0 is only for student.init from_teacher: stage 1 "
                                        "alone); set train.max_steps >= 1"))
    if cfg.tokenizer.name_or_path is None:
        errs += vocab_errors(cfg, cfg.tokenizer.vocab_size, "tokenizer.vocab_size (a BPE trained here)")
    # override_errors imports torch only when overrides are set
    errs += override_errors(cfg.student.variant, cfg.student.overrides, cfg.student.chunk_size)
    if cfg.student.attention_layers == "auto" and cfg.student.init != "from_teacher":
        errs.append(("student.attention_layers", "auto chooses layers by restoring the teacher's attention: it "
                                                 "needs student.init from_teacher (or list the layers)"))
    if cfg.hybrid.enabled and not cfg.hybrid.is_hybrid:
        errs.append(("hybrid.attention_layers", "hybrid.enabled needs attention layers: list them or set auto "
                                                "with hybrid.num_attention_layers"))
    return errs


def vocab_errors(cfg: PipelineConfig, vocab_size: int, where: str) -> list[tuple[str, str]]:
    errs = []
    if not cfg.train.pretrain_ce_only and cfg.train.teacher_topk > vocab_size:
        errs.append(("train.teacher_topk", f"{cfg.train.teacher_topk} is above the vocabulary ({vocab_size}, "
                                           f"{where}); set train.teacher_topk <= {vocab_size}"))
    if cfg.logit_cache.k > vocab_size:
        errs.append(("logit_cache.k", f"{cfg.logit_cache.k} is above the vocabulary ({vocab_size}, {where}); "
                                      f"set logit_cache.k <= {vocab_size}"))
    return errs
