"""Run configuration: one pydantic model tree shared by the CLI and the Dagster assets.

- :mod:`~distill_dag.config.schema`: the sections, :class:`PipelineConfig` and the rules across sections;
- :mod:`~distill_dag.config.errors`: :class:`ConfigError` and the messages that name the file and the key;
- :mod:`~distill_dag.config.paths`: the bundled ``configs/`` folder and how relative paths resolve;
- :mod:`~distill_dag.config.load`: the hardened YAML reader, ``base:`` chains, :func:`load_config`.
- :mod:`~distill_dag.config.flags`: a field as a command-line flag (``distill``'s config flags).

``from distill_dag.config import X`` is the way in for everything public.
"""

from distill_dag.config.errors import ConfigError, check_vocab
from distill_dag.config.load import (MAX_BASE_DEPTH, MAX_CONFIG_BYTES, MAX_YAML_NODES, config_from_dict, deep_merge,
                                     load_config, read_yaml)
from distill_dag.config.paths import (CONFIG_DIR, DEFAULT_CONFIG, PROJECT_ROOT, bundled_configs, is_bundled,
                                      resolve_config_path, resolve_paths)
from distill_dag.config.schema import (MAX_EVAL_TOKENS, MAX_SEED, MAX_STEPS, MUON_FOLLOWS_LR, NAME_OR_PATH, PATH,
                                       AlignConfig, DataConfig, EvalConfig, HybridConfig, HybridLayers,
                                       LogitCacheConfig, LoopConfig, PipelineConfig, Section, SourceConfig,
                                       StudentConfig, TeacherConfig, TeacherFinetuneConfig, TokenizeConfig,
                                       TokenizerConfig, TrainConfig, WandbConfig, cron_error, cross_field_errors,
                                       source_name_errors, vocab_errors)

__all__ = [
    "CONFIG_DIR", "DEFAULT_CONFIG", "MAX_BASE_DEPTH", "MAX_CONFIG_BYTES", "MAX_EVAL_TOKENS", "MAX_SEED",
    "MAX_STEPS", "MAX_YAML_NODES", "MUON_FOLLOWS_LR", "NAME_OR_PATH", "PATH", "PROJECT_ROOT", "AlignConfig",
    "ConfigError", "DataConfig", "EvalConfig", "HybridConfig", "HybridLayers", "LogitCacheConfig", "LoopConfig",
    "PipelineConfig", "Section", "SourceConfig", "StudentConfig", "TeacherConfig", "TeacherFinetuneConfig",
    "TokenizeConfig", "TokenizerConfig", "TrainConfig", "WandbConfig", "bundled_configs", "check_vocab",
    "config_from_dict", "cron_error", "cross_field_errors", "deep_merge", "is_bundled", "load_config", "read_yaml",
    "resolve_config_path", "resolve_paths", "source_name_errors", "vocab_errors",
]
