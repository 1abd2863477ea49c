"""The one typed configuration tree of card_megatron.

Defaults live here; YAML files in ``configs/`` override them; ``section.key=value``
arguments on the command line override both. Unknown keys are errors, and
:func:`validate` collects every problem before raising once.

Each component receives only its own section (``cfg.model``, ``cfg.objective``, ...),
never the whole tree. Names follow Megatron-LM where it has one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


@dataclass
class ModelConfig:
    """The transformer (a Megatron-core GPT-style decoder)."""

    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # grouped-query attention; None = MHA
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size (gated SiLU)
    seq_length: int = 128  # L: tokens the model reads per sample (samples hold L+1)
    vocab_size: Optional[int] = None  # None = taken from the tokenizer (incl. <mask>)
    make_vocab_size_divisible_by: int = 128
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    untie_embeddings_and_output_weights: bool = True
    recompute_activations: bool = False  # activation checkpointing of each layer
    # Megatron-core's fused SwiGLU and bias-dropout-add (torch.compile'd); None = on with CUDA.
    fused_kernels: Optional[bool] = None


@dataclass
class ObjectiveConfig:
    """The training objective; see ``card_megatron/objectives`` and CARD.md."""

    name: str = "card"  # card | arm | mdlm | bd3lm
    # CARD (CARD.md sections 2 and 3)
    masking: str = "tail"  # tail | uniform
    tail_factor: float = 1.5  # lambda; 1.0 = strict (solid) tail
    reweighting: str = "context"  # context | none
    reweight_decay: float = 0.5  # p
    reweight_beta: float = 1.0  # beta
    normaliser: str = "weights"  # weights (sum of w) | tokens (token count)
    # MDLM / BD3LM
    t_eps: float = 1e-3  # t is drawn from [t_eps, 1] so that 1/t stays bounded
    low_discrepancy: bool = True  # t from a Weyl sequence over the global sample id
    block_size: int = 4  # BD3LM block size (4, 8, 16, or seq_length)
    eval_t_samples: int = 4  # Monte-Carlo t samples for the MDLM/BD3LM ELBO


@dataclass
class DataConfig:
    """Token shards and the sample index built over them."""

    # Megatron style: one prefix, or "w1 prefix1 w2 prefix2 ..." for a blend.
    data_path: str = ""
    tokenizer_model: str = ""
    split: str = "969,30,1"  # train,valid,test weights, by document
    cache_dir: Optional[str] = None  # None = "{first data prefix}_index_cache"
    num_workers: int = 0  # DataLoader workers per rank


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0-3); 0-1 with pipeline parallelism
    distributed_backend: Optional[str] = None  # None = nccl with CUDA, gloo without
    distributed_timeout_minutes: int = 10


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_iters: int = 100
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_decay_iters: Optional[int] = None  # None = train.train_iters
    # Exponential moving average of the weights, updated after every applied optimizer step:
    # ema = decay * ema + (1 - decay) * weights. 0 = off; MDLM and BD3LM use 0.9999.
    ema_decay: float = 0.0


@dataclass
class TrainConfig:
    train_iters: int = 1000
    micro_batch_size: int = 8
    global_batch_size: int = 32  # = micro_batch_size * data_parallel * grad accumulation
    seed: int = 1234
    run_dir: str = "runs/default"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    save_interval: int = 0  # 0 = only at the end / on a signal
    keep_last_checkpoints: int = 3
    exit_interval: int = 0  # save and exit after this many steps of this run; 0 = off
    log_interval: int = 10
    eval_interval: int = 0  # 0 = only at the start and at the end
    eval_iters: int = 10  # validation micro-batches per evaluation
    # Also validate the EMA weights (needs optim.ema_decay > 0): eval records gain ema_val_nll, ema_val_ppl.
    eval_ema: bool = False
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before stopping
    # Resume with torch.load(weights_only=False): only for run directories you trust (checkpoints saved
    # elsewhere holding objects this code never saves). By default nothing in a checkpoint can run code.
    trust_checkpoint: bool = False


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "card_megatron"
    wandb_mode: str = "offline"  # offline unless the user asks for online
    wandb_name: Optional[str] = None
    # CARD diagnostics (card_megatron/training/diagnostics.py), pipeline size 1 only:
    corruption_metrics: bool = True  # NLL and top-1 accuracy by the number of masks before the target
    probe_window: int = 8  # K of the validation mask probe (clean prefix + k masks, k < K); 0 = off


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message lists every problem."""


OBJECTIVES = ("card", "arm", "mdlm", "bd3lm")  # objective.name: the objectives package registers one class each
MASK_KINDS = ("causal", "full", "block")  # the attention rules an objective may ask the model for


# --------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


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
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r} (known: {', '.join(sorted(sections))})")
    sub = getattr(cfg, section)
    types = _field_types(type(sub))
    if key not in types:
        raise ConfigError(
            f"{source}: unknown key {section}.{key} (known in {section}: {', '.join(sorted(types))})"
        )
    setattr(sub, key, _coerce(value, types[key], f"{source}: {section}.{key}"))


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Builds a Config from defaults, an optional YAML file and ``section.key=value`` overrides.

    Returns the validated Config; raises ConfigError naming the file, key or value at fault.
    """
    cfg = Config()
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
    validate(cfg)
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
    "objective.tail_factor": (1, _INF, True, False, " (1 = strict tail)"),
    "objective.reweight_decay": (0, 1, True, True, ""),
    "objective.reweight_beta": (0, _INF, False, False, ""),
    "objective.t_eps": (0, 1, False, False, ""),
    "objective.block_size": (1, _INF, True, False, ""),
    "objective.eval_t_samples": (1, _INF, True, False, ""),
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
    "train.train_iters": (1, _INF, True, False, ""),
    "train.micro_batch_size": (1, _INF, True, False, ""),
    "train.global_batch_size": (1, _INF, True, False, ""),
    "train.seed": (0, 2**64 - 1, True, True, ""),
    "train.save_interval": (0, _INF, True, False, " (0 = only at the end)"),
    "train.keep_last_checkpoints": (1, _INF, True, False, ""),
    "train.exit_interval": (0, _INF, True, False, " (0 = off)"),
    "train.log_interval": (1, _INF, True, False, ""),
    "train.eval_interval": (0, _INF, True, False, " (0 = only at the start and the end)"),
    "train.eval_iters": (1, _INF, True, False, ""),
    "train.max_nonfinite_steps": (1, _INF, True, False, ""),
    "logging.probe_window": (0, _INF, True, False, " (0 = off)"),
}


def _range_text(low: float, high: float, low_in: bool, high_in: bool) -> str:
    if high == _INF:
        return f">= {low}" if low_in else ("positive" if low == 0 else f"> {low}")
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _range_problems(cfg: Config) -> list[str]:
    """A problem for every numeric key outside its RANGES entry (NaN and infinity included)."""
    p = []
    for name, (low, high, low_in, high_in, note) in RANGES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            p.append(f"{name} ({value}) must be a finite number")
        elif not ((low <= value if low_in else low < value) and (value <= high if high_in else value < high)):
            p.append(f"{name} ({value}) must be {_range_text(low, high, low_in, high_in)}{note}")
    return p


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Checks every value; raises one ConfigError listing all problems.

    With ``world_size`` it also checks that the parallel sizes divide it and that the
    global batch matches micro batch x data parallel x accumulation.
    """
    p: list[str] = _range_problems(cfg)
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
            p.append(f"model.num_query_groups ({groups}) must be divisible by tensor_model_parallel_size ({tp})")
        if m.num_layers % pp:
            p.append(
                f"model.num_layers ({m.num_layers}) must be divisible by "
                f"parallel.pipeline_model_parallel_size ({pp})"
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
    if par.distributed_backend not in (None, "nccl", "gloo"):
        p.append(f"parallel.distributed_backend ({par.distributed_backend!r}) must be nccl, gloo or none")
    if o.name not in OBJECTIVES:
        p.append(f"objective.name ({o.name!r}) must be one of {', '.join(OBJECTIVES)}")
    if o.masking not in ("tail", "uniform"):
        p.append(f"objective.masking ({o.masking!r}) must be tail or uniform")
    if o.reweighting not in ("context", "none"):
        p.append(f"objective.reweighting ({o.reweighting!r}) must be context or none")
    if o.normaliser not in ("weights", "tokens"):
        p.append(f"objective.normaliser ({o.normaliser!r}) must be weights or tokens")
    if o.name == "bd3lm" and o.block_size >= 1 and m.seq_length % o.block_size:
        p.append(f"objective.block_size ({o.block_size}) must divide model.seq_length ({m.seq_length})")
    if t.micro_batch_size >= 1 and t.global_batch_size % t.micro_batch_size:
        p.append(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        p.append(f"train.precision ({t.precision!r}) must be auto, bf16, fp16 or fp32")
    if cfg.logging.probe_window > m.seq_length:
        p.append(f"logging.probe_window ({cfg.logging.probe_window}) must lie in [0, model.seq_length={m.seq_length}]")
    if opt.lr_decay_style not in ("cosine", "linear", "constant"):
        p.append(f"optim.lr_decay_style ({opt.lr_decay_style!r}) must be cosine, linear or constant")
    if opt.min_lr > opt.lr:
        p.append(f"optim.min_lr ({opt.min_lr}) must be <= optim.lr ({opt.lr})")
    if t.eval_ema and opt.ema_decay == 0.0:
        p.append("train.eval_ema needs an EMA: set optim.ema_decay (e.g. 0.9999) or train.eval_ema=false")
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        p.append(f"logging.wandb_mode ({cfg.logging.wandb_mode!r}) must be offline, online or disabled")
    try:
        split = [float(x) for x in cfg.data.split.split(",")]
        if len(split) != 3 or not all(math.isfinite(x) and x >= 0 for x in split) or sum(split) <= 0:
            raise ValueError
    except ValueError:
        p.append(f"data.split ({cfg.data.split!r}) must be three non-negative weights, e.g. 969,30,1")
    if world_size is not None and tp >= 1 and pp >= 1:
        if world_size % (tp * pp):
            p.append(
                f"world size ({world_size}) must be divisible by tensor_model_parallel_size ({tp}) x "
                f"pipeline_model_parallel_size ({pp})"
            )
        else:
            dp = world_size // (tp * pp)
            if t.global_batch_size % (t.micro_batch_size * dp):
                p.append(
                    f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                    f"micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
                )
    if p:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(p))


# --------------------------------------------------------------------------- resuming

# The keys a resumed run may change (docs/design.md "Resuming"); every other key must equal the
# checkpoint's. The optimizer's betas, eps and weight decay are not here: loading the optimizer
# state brings back the saved ones, so a new value would be ignored without a word.
RESUMABLE = frozenset({
    "train.train_iters", "train.micro_batch_size", "train.run_dir", "train.save_interval",
    "train.keep_last_checkpoints", "train.exit_interval", "train.log_interval", "train.eval_interval",
    "train.eval_iters", "train.eval_ema", "train.max_nonfinite_steps", "train.trust_checkpoint",
    "optim.lr", "optim.min_lr", "optim.lr_warmup_iters", "optim.lr_decay_style", "optim.lr_decay_iters",
    "optim.clip_grad", "optim.ema_decay",
    "data.num_workers", "data.cache_dir",
    "parallel.distributed_backend", "parallel.distributed_timeout_minutes",
}) | {f"logging.{f.name}" for f in dataclasses.fields(LoggingConfig)}


def resume_changes(saved: Config, cfg: Config, saved_dp: Optional[int] = None, dp: Optional[int] = None) -> list[str]:
    """Every change from the checkpoint's config ``saved`` to ``cfg`` that a resume may not make,
    as "section.key: saved -> new"; also a data-parallel size change (``saved_dp`` -> ``dp``)
    under ZeRO, whose optimizer state is partitioned by data-parallel rank. [] when none."""
    old, new = config_to_dict(saved), config_to_dict(cfg)
    changes = [f"{section}.{key}: {old[section][key]!r} -> {value!r}"
               for section, values in new.items() for key, value in values.items()
               if value != old[section][key] and f"{section}.{key}" not in RESUMABLE]
    if saved_dp is not None and dp is not None and saved_dp != dp and cfg.parallel.zero_stage > 0:
        changes.append(f"data-parallel size: {saved_dp} -> {dp} under parallel.zero_stage {cfg.parallel.zero_stage} "
                       "(the ZeRO optimizer state is not re-partitioned; only ZeRO 0 resumes on another size)")
    return changes


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)

