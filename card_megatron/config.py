"""The one typed configuration tree of card_megatron.

Defaults live here; YAML files in ``configs/`` override them; ``section.key=value``
arguments on the command line override both. Unknown keys are errors, and
:func:`validate` collects every problem before raising once.

Each component receives only its own section (``cfg.model``, ``cfg.objective``, ...),
never the whole tree. Names follow Megatron-LM where it has one. The objective's section,
its ranges and its rules belong to the objectives package (``objectives/config.py``: the
objective plug-ins decide which names and rules exist); this tree composes it, and
``config_checks.py`` holds what every section shares (ConfigError, choices, ranges).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import os
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from card_megatron.config_checks import ConfigError, choice_problems, field_choices, field_types, range_problems
from card_megatron.objectives.config import RANGES as OBJECTIVE_RANGES
from card_megatron.objectives.config import ObjectiveConfig, objective_problems

# Every field below (and of objectives/config.ObjectiveConfig, the objective's section, which the
# objectives package owns) has a one-line docstring under it: `python -m card_megatron.train
# --help-config` and docs/config.md show them (field_docs). Enumerated values are Literal types, or
# come from a registry (objective.name: the registered objectives): validate() checks them.


@dataclass
class ModelConfig:
    """The transformer (a Megatron-core GPT-style decoder)."""

    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Attention heads (must divide hidden_size and be divisible by the tensor-parallel size)."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; none = one per head (multi-head attention)."""
    ffn_hidden_size: Optional[int] = None
    """Width of the gated SiLU MLP; none = 4 x hidden_size."""
    seq_length: int = 128
    """L: tokens the model reads per sample (samples hold L+1 tokens)."""
    vocab_size: Optional[int] = None
    """Vocabulary size; none = the tokenizer's (with <mask>), padded for tensor parallelism."""
    make_vocab_size_divisible_by: int = 128
    """Each tensor-parallel shard of the vocabulary is padded to a multiple of this."""
    rotary_base: int = 10000
    """RoPE base."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output layer (must be true with pipeline parallelism)."""
    recompute_activations: bool = False
    """Activation checkpointing of each layer (recompute in backward)."""
    fused_kernels: Optional[bool] = None
    """Megatron-core's fused SwiGLU and bias-dropout-add (torch.compile'd); none = on with CUDA."""
    compile_layers: Optional[bool] = None
    """Training: torch.compile each transformer layer (model/compile.py); none = on with CUDA, off on CPU."""


@dataclass
class DataConfig:
    """Token shards and the sample index built over them."""

    data_path: str = ""
    """Token shard prefix, or "w1 prefix1 w2 prefix2 ..." for a weighted blend (Megatron style)."""
    tokenizer_model: str = ""
    """SentencePiece model the shards were written with (tools/preprocess_data.py)."""
    split: str = "969,30,1"
    """Train, valid and test weights, by document (three non-negative numbers)."""
    cache_dir: Optional[str] = None
    """Sample-index cache directory; none = "{first data prefix}_index_cache"."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = read in the training process)."""
    valid_seed: Optional[int] = None
    """Seed of the valid/test samples (which sequences, noise seeds); none = train.seed; shared = same validation."""
    allow_missing_sidecar: bool = False
    """Train on a shard without its tokenizer sidecar ({output prefix}.tokenizer.json); nothing then checks
    that data.tokenizer_model made it."""


@dataclass
class ParallelConfig:
    """How the processes are laid out (world = tensor x pipeline x data parallel)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (Megatron-core layers; divides the heads and query groups)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (DeepSpeed's pipeline engine; divides num_layers)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (0 or 1 with pipeline parallelism)."""
    distributed_backend: Optional[Literal["nccl", "gloo"]] = None
    """torch.distributed backend; none = nccl with CUDA, gloo without."""
    distributed_timeout_minutes: int = 10
    """Timeout of collective operations."""


@dataclass
class OptimConfig:
    """AdamW, the learning-rate schedule, gradient clipping and the weight EMA."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay (<= lr)."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms and biases get none)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm; 0 = no clipping."""
    lr_warmup_iters: int = 100
    """Linear warmup steps."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay from lr to min_lr after warmup."""
    lr_decay_iters: Optional[int] = None
    """Steps of warmup + decay; none = train.train_iters."""
    freeze_layers: int = 0
    """The first N transformer layers keep their weights (no gradient, no optimizer state); the
    embedding (with the mask row), the later layers and the output train; 0 = everything trains."""
    ema_decay: float = 0.0
    """Weight EMA after every applied step: ema = decay * ema + (1 - decay) * weights; 0 = off (MDLM, BD3LM: 0.9999)."""
    ema_warmup: bool = True
    """EMA warm-up (MDLM's): the n-th update uses min(ema_decay, (1 + n) / (10 + n)) instead of ema_decay."""


@dataclass
class TrainConfig:
    """Steps, batches, precision, intervals and the run directory."""

    train_iters: int = 1000
    """Optimizer steps of the whole run."""
    micro_batch_size: int = 8
    """Samples per rank per forward pass."""
    global_batch_size: int = 32
    """Samples per optimizer step = micro_batch_size x data parallel x gradient accumulation."""
    seed: int = 1234
    """Seed of the initial weights, the data order and every noise seed."""
    run_dir: str = "runs/default"
    """Run directory: config, metrics, checkpoints; a restart with the same one resumes."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision; auto = bf16 on GPU, fp32 on CPU."""
    save_interval: int = 0
    """Save a checkpoint every this many steps; 0 = only at the end or on a signal."""
    export_interval: int = 1
    """Write the export (export/: safetensors shards per TP/PP rank and their index) at every this many
    saves: 1 = every save, N = the saves at multiples of N x save_interval, 0 = only the final save;
    always at the end of the run (large models: 0 or N)."""
    keep_last_checkpoints: int = 3
    """Checkpoints kept in the run directory (older ones are deleted)."""
    exit_interval: int = 0
    """Save and exit after this many steps of this run; 0 = off."""
    log_interval: int = 10
    """Write a metrics line every this many steps."""
    eval_interval: int = 0
    """Validate every this many steps; 0 = only at the start and at the end."""
    eval_iters: int = 10
    """Validation batches (of global_batch_size samples) per evaluation."""
    eval_ema: bool = False
    """Also validate the EMA weights (needs optim.ema_decay > 0): ema_val_nll, ema_val_ppl."""
    max_nonfinite_steps: int = 10
    """Consecutive steps with a non-finite loss (each skipped) that stop the run; 0 = no check (no sync)."""
    trust_checkpoint: bool = False
    """Resume with torch.load(weights_only=False): only for run directories you trust."""
    drop_ema: bool = False
    """Resume a checkpoint that holds an EMA with optim.ema_decay=0, dropping the EMA (refused without it)."""
    init_from: Optional[str] = None
    """Start a new run from these weights (tools/import_hf.py output, an export, checkpoint or run
    directory) at step 0 with a fresh optimizer and schedule; the model architecture keys and
    data.tokenizer_model default to the checkpoint's; ignored once train.run_dir has a checkpoint."""


@dataclass
class LoggingConfig:
    """wandb and CARD's diagnostics."""

    wandb: bool = False
    """Log to Weights & Biases (into the run directory)."""
    wandb_project: str = "card_megatron"
    """wandb project."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode: offline unless you ask for online."""
    wandb_name: Optional[str] = None
    """wandb run name; none = wandb's."""
    corruption_metrics: bool = True
    """CARD, pipeline size 1: NLL and top-1 accuracy by the number of masks before the target."""
    probe_window: int = 8
    """CARD, pipeline size 1: K of the validation mask probe (clean prefix + k masks, k < K); 0 = off."""
    probe_min_prefix: int = 1
    """CARD: the probe's shortest clean prefix (cuts in [this, seq_length - probe_window + 1]), e.g. a prompt."""
    probe_cuts: int = 1
    """CARD: probe cuts per validation sample (a pass each); predictions per k = validation samples x this."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------- loading


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


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a config dataclass: {field name: text}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_text(tp: Any, choices: Optional[tuple[str, ...]]) -> str:
    optional = typing.get_origin(tp) is typing.Union
    if choices:
        text = " | ".join(choices)
    else:
        base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
        text = getattr(base, "__name__", str(base))
    return f"{text} | none" if optional else text


def describe_config() -> list[tuple[str, str, str, str]]:
    """(section.key, type, default, description) of every config key, in declaration order."""
    rows = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        sub = getattr(defaults, section.name)
        docs, types = field_docs(type(sub)), field_types(type(sub))
        for f in dataclasses.fields(sub):
            default = getattr(sub, f.name)
            rows.append(
                (
                    f"{section.name}.{f.name}",
                    _type_text(types[f.name], field_choices(type(sub), f.name)),
                    "none"
                    if default is None
                    else str(default).lower()
                    if isinstance(default, bool)
                    else repr(default)
                    if isinstance(default, str)
                    else str(default),
                    docs.get(f.name, ""),
                )
            )
    return rows


def config_help() -> str:
    """Every key with its type, default and description (``python -m card_megatron.train --help-config``)."""
    rows = describe_config()
    lines, section = [], None
    for key, tp, default, doc in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            cls = type(getattr(Config(), section))
            lines.append(f"{section}: {' '.join((cls.__doc__ or '').split())}")
        lines.append(f"  {key} = {default}  ({tp})\n      {doc}")
    return "\n".join(lines)


def config_markdown() -> str:
    """docs/config.md: the same listing as a Markdown table per section (a test keeps the file current)."""
    out = [
        "# Configuration keys",
        "",
        "Generated from the field docstrings of `card_megatron/config.py` and, for the objective section, "
        "`card_megatron/objectives/config.py` (`python -m card_megatron.train "
        "--help-config` prints the same). Override any key as `section.key=value`; numeric ranges are in "
        "`config.RANGES`.",
        "",
    ]
    section = None
    for key, tp, default, doc in describe_config():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            cls = type(getattr(Config(), section))
            out += [
                "",
                f"## {section}",
                "",
                " ".join((cls.__doc__ or "").split()),
                "",
                "| key | type | default | description |",
                "| --- | --- | --- | --- |",
            ]
        cells = [c.replace("|", "\\|").replace("<", "\\<") for c in (tp, doc)]
        out.append(f"| `{key}` | {cells[0]} | `{default}` | {cells[1]} |")
    return "\n".join(out[:4] + out[5:]) + "\n"


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


# --------------------------------------------------------------------------- validation

_INF = math.inf
# The range of every numeric key: (low, high, low included, high included, note). Rules that
# relate two keys (divisibility, min_lr <= lr, probe_window <= seq_length) are in validate().
RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "model.num_layers": (1, _INF, True, False, ""),
    "model.hidden_size": (1, _INF, True, False, ""),
    "model.num_attention_heads": (1, _INF, True, False, ""),
    "model.num_query_groups": (1, _INF, True, False, " (or none: one per head)"),
    "model.ffn_hidden_size": (1, _INF, True, False, " (or none: 4 x hidden_size)"),
    "model.seq_length": (1, _INF, True, False, ""),
    "model.vocab_size": (1, _INF, True, False, " (or none: the tokenizer's)"),
    "model.make_vocab_size_divisible_by": (1, _INF, True, False, ""),
    "model.rotary_base": (0, _INF, False, False, ""),
    "model.norm_epsilon": (0, _INF, False, False, ""),
    "model.init_method_std": (0, _INF, False, False, " (e.g. 0.02)"),
    "model.hidden_dropout": (0, 1, True, False, ""),
    "model.attention_dropout": (0, 1, True, False, ""),
    **OBJECTIVE_RANGES,  # objectives/config.py
    "data.num_workers": (0, _INF, True, False, ""),
    "parallel.tensor_model_parallel_size": (1, _INF, True, False, ""),
    "parallel.pipeline_model_parallel_size": (1, _INF, True, False, ""),
    "parallel.zero_stage": (0, 3, True, True, ""),
    "parallel.distributed_timeout_minutes": (1, _INF, True, False, ""),
    "optim.lr": (0, _INF, False, False, ""),
    "optim.min_lr": (0, _INF, True, False, ""),
    "optim.weight_decay": (0, _INF, True, False, ""),
    "optim.adam_beta1": (0, 1, True, False, ""),
    "optim.adam_beta2": (0, 1, True, False, ""),
    "optim.adam_eps": (0, _INF, False, False, ""),
    "optim.clip_grad": (0, _INF, True, False, " (0 = no clipping)"),
    "optim.lr_warmup_iters": (0, _INF, True, False, ""),
    "optim.lr_decay_iters": (1, _INF, True, False, " (or none: train.train_iters)"),
    "optim.ema_decay": (0, 1, True, False, " (0 = off, e.g. 0.9999)"),
    "optim.freeze_layers": (0, _INF, True, False, " (0 = everything trains)"),
    "train.train_iters": (1, _INF, True, False, ""),
    "train.micro_batch_size": (1, _INF, True, False, ""),
    "train.global_batch_size": (1, _INF, True, False, ""),
    "train.seed": (0, 2**64 - 1, True, True, ""),
    "train.save_interval": (0, _INF, True, False, " (0 = only at the end)"),
    "train.export_interval": (0, _INF, True, False, " (0 = only the final save)"),
    "train.keep_last_checkpoints": (1, _INF, True, False, ""),
    "train.exit_interval": (0, _INF, True, False, " (0 = off)"),
    "train.log_interval": (1, _INF, True, False, ""),
    "train.eval_interval": (0, _INF, True, False, " (0 = only at the start and the end)"),
    "train.eval_iters": (1, _INF, True, False, ""),
    "train.max_nonfinite_steps": (0, _INF, True, False, " (0 = no check)"),
    "logging.probe_window": (0, _INF, True, False, " (0 = off)"),
    "logging.probe_min_prefix": (1, _INF, True, False, ""),
    "logging.probe_cuts": (1, _INF, True, False, ""),
    "data.valid_seed": (0, 2**64 - 1, True, True, " (or none: train.seed)"),
}


def parse_split(split: str) -> tuple[float, float, float]:
    """The train/valid/test weights of ``data.split`` ("969,30,1"); ValueError naming the setting if malformed."""
    try:
        weights = tuple(float(x) for x in split.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.split ({split!r}) must be three non-negative weights, e.g. 969,30,1")
    return weights  # type: ignore[return-value]


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Checks every value; raises one ConfigError listing all problems.

    With ``world_size`` it also checks that the parallel sizes divide it and that the
    global batch matches micro batch x data parallel x accumulation.
    """
    p: list[str] = []
    for section in dataclasses.fields(Config):
        if section.name != "objective":  # objective_problems, below, checks that section
            p += choice_problems(section.name, getattr(cfg, section.name))
            p += range_problems(section.name, getattr(cfg, section.name), RANGES)
    m, o, par, t, opt = cfg.model, cfg.objective, cfg.parallel, cfg.train, cfg.optim
    if m.num_attention_heads > 0 and m.hidden_size % m.num_attention_heads:
        p.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({m.num_attention_heads})"
        )
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp >= 1 and pp >= 1:
        if m.num_attention_heads % tp:
            p.append(
                f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
                f"parallel.tensor_model_parallel_size ({tp})"
            )
        groups = m.num_query_groups or m.num_attention_heads
        if m.num_query_groups and m.num_attention_heads % m.num_query_groups:
            p.append(
                f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({m.num_query_groups})"
            )
        if groups % tp:
            p.append(
                f"model.num_query_groups ({groups}) must be divisible by parallel.tensor_model_parallel_size ({tp})"
            )
        if m.num_layers % pp:
            p.append(
                f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline_model_parallel_size ({pp})"
            )
        if pp > 1 and not m.untie_embeddings_and_output_weights:
            p.append(
                f"model.untie_embeddings_and_output_weights must be true with "
                f"parallel.pipeline_model_parallel_size ({pp}) > 1"
            )
    if pp > 1 and par.zero_stage > 1:
        p.append(
            f"parallel.zero_stage ({par.zero_stage}) with pipeline_model_parallel_size ({pp}) is not "
            "supported: DeepSpeed's pipeline engine allows ZeRO 0 or 1 only"
        )
    p += objective_problems(o, m.seq_length)
    if t.micro_batch_size >= 1 and t.global_batch_size % t.micro_batch_size:
        p.append(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )
    if cfg.logging.probe_window > m.seq_length:
        p.append(f"logging.probe_window ({cfg.logging.probe_window}) must lie in [0, model.seq_length={m.seq_length}]")
    elif cfg.logging.probe_window and cfg.logging.probe_min_prefix > m.seq_length - cfg.logging.probe_window + 1:
        p.append(
            f"logging.probe_min_prefix ({cfg.logging.probe_min_prefix}) must be <= model.seq_length - "
            f"logging.probe_window + 1 = {m.seq_length - cfg.logging.probe_window + 1}"
        )
    if opt.freeze_layers > m.num_layers:
        p.append(f"optim.freeze_layers ({opt.freeze_layers}) must be <= model.num_layers ({m.num_layers})")
    if opt.min_lr > opt.lr:
        p.append(f"optim.min_lr ({opt.min_lr}) must be <= optim.lr ({opt.lr})")
    if t.eval_ema and opt.ema_decay == 0.0:
        p.append("train.eval_ema needs an EMA: set optim.ema_decay (e.g. 0.9999) or train.eval_ema=false")
    try:
        parse_split(cfg.data.split)
    except ValueError as e:
        p.append(str(e))
    if world_size is not None and tp >= 1 and pp >= 1:
        if world_size % (tp * pp):
            p.extend(world_size_problems(par, world_size))
        else:
            dp = world_size // (tp * pp)
            if t.global_batch_size % (t.micro_batch_size * dp):
                p.append(
                    f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                    f"micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
                )
    if p:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(p))


def world_size_problems(par: ParallelConfig, world_size: int) -> list[str]:
    """The problem (as a list) when ``world_size`` is not divisible by the tensor x pipeline size;
    :func:`validate` and ``parallel.state.init_distributed`` (before it builds any group) check it."""
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if world_size % (tp * pp):
        return [
            f"world size ({world_size}) must be divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp})"
        ]
    return []


# --------------------------------------------------------------------------- resuming

# The keys a resumed run may change (docs/design.md "Resuming"); every other key must equal the
# checkpoint's. The optimizer's betas, eps and weight decay are not here: loading the optimizer
# state brings back the saved ones, so a new value would be ignored without a word.
RESUMABLE = frozenset(
    {
        "train.train_iters",
        "train.micro_batch_size",
        "train.run_dir",
        "train.save_interval",
        "train.export_interval",
        "train.keep_last_checkpoints",
        "train.exit_interval",
        "train.log_interval",
        "train.eval_interval",
        "train.eval_iters",
        "train.eval_ema",
        "train.max_nonfinite_steps",
        "train.trust_checkpoint",
        "train.drop_ema",
        "model.recompute_activations",
        "model.fused_kernels",
        "objective.eval_t_samples",
        "data.allow_missing_sidecar",
        "optim.lr",
        "optim.min_lr",
        "optim.lr_warmup_iters",
        "optim.lr_decay_style",
        "optim.lr_decay_iters",
        "optim.clip_grad",
        "optim.ema_decay",
        "optim.ema_warmup",
        "data.num_workers",
        "data.cache_dir",
        "data.valid_seed",  # which sequences validate, like train.eval_iters: not the training maths
        "parallel.distributed_backend",
        "parallel.distributed_timeout_minutes",
        "model.compile_layers",  # the same function, compiled or not
    }
) | {f"logging.{f.name}" for f in dataclasses.fields(LoggingConfig)}


def resume_changes(
    saved: Config,
    cfg: Config,
    saved_dp: Optional[int] = None,
    dp: Optional[int] = None,
    saved_resolved: Optional[dict[str, str]] = None,
    resolved: Optional[dict[str, str]] = None,
) -> list[str]:
    """Every change from the checkpoint's config ``saved`` to ``cfg`` that a resume may not make,
    as "section.key: saved -> new"; also a data-parallel size change (``saved_dp`` -> ``dp``)
    under ZeRO, whose optimizer state is partitioned by data-parallel rank. [] when none.

    ``saved_resolved`` and ``resolved`` ({"train.precision": "fp32", ...}: what a value such as
    ``auto`` or none became on the saving and on this machine) make those keys compare by what they
    resolve to: ``auto`` saved on a GPU (bf16) and resumed on a CPU (fp32) is a change, ``auto`` and
    ``fp32`` on a CPU are not. A checkpoint without the record compares the values as written."""
    old, new = config_to_dict(saved), config_to_dict(cfg)
    saved_resolved, resolved = saved_resolved or {}, resolved or {}
    changes = []
    for section, values in new.items():
        for key, value in values.items():
            name, before = f"{section}.{key}", old[section][key]
            if name in RESUMABLE:
                continue
            if name in saved_resolved and name in resolved:
                if saved_resolved[name] != resolved[name]:
                    changes.append(f"{name}: {before!r} ({saved_resolved[name]}) -> {value!r} ({resolved[name]})")
            elif value != before:
                changes.append(f"{name}: {before!r} -> {value!r}")
    if saved_dp is not None and dp is not None and saved_dp != dp and cfg.parallel.zero_stage > 0:
        changes.append(
            f"data-parallel size: {saved_dp} -> {dp} under parallel.zero_stage {cfg.parallel.zero_stage} "
            "(the ZeRO optimizer state is not re-partitioned; only ZeRO 0 resumes on another size)"
        )
    return changes


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
