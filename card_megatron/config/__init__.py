"""The one typed configuration tree of card_megatron.

Defaults live in :mod:`~card_megatron.config.schema`; YAML files in ``configs/`` override them;
``section.key=value`` arguments on the command line override both (:mod:`~card_megatron.config.loading`).
Unknown keys are errors, and :func:`validate` (:mod:`~card_megatron.config.validation`) collects every
problem before raising once. :mod:`~card_megatron.config.resume` says what a resumed run may change;
:mod:`~card_megatron.config.help` lists every key (``--help-config``, ``docs/config.md``).

Each component receives only its own section (``cfg.model``, ``cfg.objective``, ...), never the whole
tree. The objective's section, its ranges and its rules belong to the objectives package
(``objectives/config.py``: the objective plug-ins decide which names and rules exist); this tree
composes it, and ``config_checks.py`` holds what every section shares (ConfigError, choices, ranges).

Every public name is re-exported here: ``from card_megatron.config import X``.
"""

from card_megatron.config.help import config_help, config_markdown, describe_config, field_docs
from card_megatron.config.loading import (
    INIT_FROM_MODEL_KEYS,
    config_from_dict,
    config_to_dict,
    init_from_defaults,
    load_config,
    save_config,
)
from card_megatron.config.resume import RESUMABLE, resume_changes
from card_megatron.config.schema import (
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from card_megatron.config.validation import RANGES, data_parallel_size, parse_split, validate, world_size_problems
from card_megatron.config_checks import ConfigError, choice_problems, field_choices, field_types, range_problems
from card_megatron.objectives.config import ObjectiveConfig, objective_problems

__all__ = [
    "INIT_FROM_MODEL_KEYS",
    "RANGES",
    "RESUMABLE",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "choice_problems",
    "config_from_dict",
    "config_help",
    "config_markdown",
    "config_to_dict",
    "data_parallel_size",
    "describe_config",
    "field_choices",
    "field_docs",
    "field_types",
    "init_from_defaults",
    "load_config",
    "objective_problems",
    "parse_split",
    "range_problems",
    "resume_changes",
    "save_config",
    "validate",
    "world_size_problems",
]
