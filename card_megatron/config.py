"""The one typed configuration tree of card_megatron.

Defaults live here; YAML files in ``configs/`` override them; ``section.key=value``
arguments on the command line override both. Unknown keys are errors, and
:func:`validate` collects every problem before raising once.

Each component receives only its own section (``cfg.model``, ``cfg.objective``, ...),
never the whole tree. Names follow Megatron-LM where it has one.
"""

from __future__ import annotations

import dataclasses
import json
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


OBJECTIVES = ("card", "arm", "mdlm", "bd3lm")


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
        _apply(cfg, section, key, yaml.safe_load(value) if value else "", "command line")
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
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- validation


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Checks every value; raises one ConfigError listing all problems.

    With ``world_size`` it also checks that the parallel sizes divide it and that the
    global batch matches micro batch x data parallel x accumulation.
    """
    p: list[str] = []
    m, o, par, t, opt = cfg.model, cfg.objective, cfg.parallel, cfg.train, cfg.optim
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(m, name) <= 0:
            p.append(f"model.{name} ({getattr(m, name)}) must be positive")
    if m.num_attention_heads > 0 and m.hidden_size % m.num_attention_heads:
        p.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({m.num_attention_heads})"
        )
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        p.append(f"parallel sizes must be >= 1 (tensor {tp}, pipeline {pp})")
    else:
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
    if par.zero_stage not in (0, 1, 2, 3):
        p.append(f"parallel.zero_stage ({par.zero_stage}) must be 0, 1, 2 or 3")
    elif pp > 1 and par.zero_stage > 1:
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
    if o.tail_factor < 1.0:
        p.append(f"objective.tail_factor ({o.tail_factor}) must be >= 1 (1 = strict tail)")
    if o.reweighting not in ("context", "none"):
        p.append(f"objective.reweighting ({o.reweighting!r}) must be context or none")
    if not 0.0 <= o.reweight_decay <= 1.0:
        p.append(f"objective.reweight_decay ({o.reweight_decay}) must be in [0, 1]")
    if o.reweight_beta <= 0:
        p.append(f"objective.reweight_beta ({o.reweight_beta}) must be positive")
    if o.normaliser not in ("weights", "tokens"):
        p.append(f"objective.normaliser ({o.normaliser!r}) must be weights or tokens")
    if not 0.0 < o.t_eps < 1.0:
        p.append(f"objective.t_eps ({o.t_eps}) must be in (0, 1)")
    if o.name == "bd3lm" and (o.block_size <= 0 or m.seq_length % o.block_size):
        p.append(f"objective.block_size ({o.block_size}) must divide model.seq_length ({m.seq_length})")
    if o.eval_t_samples < 1:
        p.append(f"objective.eval_t_samples ({o.eval_t_samples}) must be >= 1")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        p.append("train.micro_batch_size and train.global_batch_size must be >= 1")
    elif t.global_batch_size % t.micro_batch_size:
        p.append(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )
    if t.train_iters < 1:
        p.append(f"train.train_iters ({t.train_iters}) must be >= 1")
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        p.append(f"train.precision ({t.precision!r}) must be auto, bf16, fp16 or fp32")
    for name in ("save_interval", "exit_interval", "eval_interval"):
        if getattr(t, name) < 0:
            p.append(f"train.{name} ({getattr(t, name)}) must be >= 0")
    if not 0 <= cfg.logging.probe_window <= m.seq_length:
        p.append(f"logging.probe_window ({cfg.logging.probe_window}) must lie in [0, model.seq_length={m.seq_length}]")
    if t.log_interval < 1:
        p.append(f"train.log_interval ({t.log_interval}) must be >= 1")
    if t.keep_last_checkpoints < 1:
        p.append(f"train.keep_last_checkpoints ({t.keep_last_checkpoints}) must be >= 1")
    if opt.lr_decay_style not in ("cosine", "linear", "constant"):
        p.append(f"optim.lr_decay_style ({opt.lr_decay_style!r}) must be cosine, linear or constant")
    if opt.lr <= 0 or opt.min_lr < 0 or opt.min_lr > opt.lr:
        p.append(f"optim.lr ({opt.lr}) must be positive and >= optim.min_lr ({opt.min_lr})")
    if not 0.0 <= opt.ema_decay < 1.0:
        p.append(f"optim.ema_decay ({opt.ema_decay}) must be in [0, 1) (0 = off, e.g. 0.9999)")
    elif t.eval_ema and opt.ema_decay == 0.0:
        p.append("train.eval_ema needs an EMA: set optim.ema_decay (e.g. 0.9999) or train.eval_ema=false")
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        p.append(f"logging.wandb_mode ({cfg.logging.wandb_mode!r}) must be offline, online or disabled")
    try:
        split = [float(x) for x in cfg.data.split.split(",")]
        if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
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


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)


def dumps(cfg: Config) -> str:
    return json.dumps(config_to_dict(cfg), indent=2)
