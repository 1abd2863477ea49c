"""Loading the configuration: defaults, a YAML file, ``section.key=value`` overrides and
``train.init_from``'s defaults, each value read by its key's declared type; saving and rebuilding it.

Unknown sections and keys, and values of the wrong type, are errors naming the file (or the command
line) and the key. :func:`load_config` validates the result (``validation.validate``).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Literal, Optional

import yaml

from card_megatron.config.schema import Config
from card_megatron.config.validation import validate
from card_megatron.config_checks import ConfigError, field_types


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Converts a YAML/CLI value to the declared type, or raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str or origin is Literal:  # a choice is read as text; validate() checks it is one of the choices
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r} (known: {', '.join(sorted(sections))})")
    sub = getattr(cfg, section)
    types = field_types(type(sub))
    if key not in types:
        raise ConfigError(f"{source}: unknown key {section}.{key} (known in {section}: {', '.join(sorted(types))})")
    setattr(sub, key, _coerce(value, types[key], f"{source}: {section}.{key}"))


# The model keys a run started with train.init_from takes from that checkpoint (its architecture);
# a YAML or command-line value that differs is refused by the trainer with the list of differences.
INIT_FROM_MODEL_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "rotary_base",
    "norm_epsilon",
    "untie_embeddings_and_output_weights",
)


def init_from_defaults(init_from: str) -> dict[str, dict[str, Any]]:
    """The sections' defaults that ``train.init_from`` supplies: the checkpoint's architecture keys
    (:data:`INIT_FROM_MODEL_KEYS`) and its tokenizer as ``data.tokenizer_model``. ConfigError naming
    the path when it is not a checkpoint or export."""
    from card_megatron.rundir import resolve_export_dir

    try:
        export = resolve_export_dir(init_from)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"train.init_from: {e}") from None
    cfg_path = os.path.join(export, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"train.init_from: {cfg_path} is missing (not a card_megatron export)")
    with open(cfg_path) as f:
        saved = config_from_dict(yaml.safe_load(f) or {})
    return {
        "model": {k: getattr(saved.model, k) for k in INIT_FROM_MODEL_KEYS},
        "data": {"tokenizer_model": os.path.join(export, "tokenizer.model")},
    }


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Builds a Config from defaults, an optional YAML file and ``section.key=value`` overrides.

    With ``train.init_from`` the checkpoint's :func:`init_from_defaults` replace the defaults
    (the YAML file and the overrides still apply over them). Returns the validated Config;
    raises ConfigError naming the file, key or value at fault.
    """
    cfg = _load_layers(path, overrides, {})
    if cfg.train.init_from:
        cfg = _load_layers(path, overrides, init_from_defaults(cfg.train.init_from))
    validate(cfg)
    return cfg


def _load_layers(path: Optional[str], overrides: Optional[list[str]], base: dict[str, dict[str, Any]]) -> Config:
    """Defaults, then ``base`` ({section: {key: value}}), the YAML file and the overrides (unvalidated)."""
    cfg = Config()
    for section, values in base.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(cfg, section, key, value, path)
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        # The text goes to _coerce as given: it parses by the key's declared type, so a string key
        # keeps "on", "0123" or "0x1F" verbatim and a number is read in decimal (never as YAML).
        _apply(cfg, section, key, value, "command line")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> Config:
    """Rebuilds a Config saved with :func:`config_to_dict` (e.g. from a checkpoint)."""
    cfg = Config()
    for section, values in d.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "saved config")
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Writes the resolved config as YAML, atomically."""
    from card_megatron.fileio import atomic_write

    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
