"""Validation of the configuration: the range of every numeric key (:data:`RANGES`) and every rule,
those relating two keys included, checked in one place (:func:`validate`), which collects all
problems and raises one ConfigError. The objective's own ranges and rules come from
``objectives/config.py``; ``config_checks.py`` holds the choice and range checks every section shares.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from card_megatron.config.schema import Config, ParallelConfig
from card_megatron.config_checks import ConfigError, choice_problems, range_problems
from card_megatron.objectives.config import RANGES as OBJECTIVE_RANGES
from card_megatron.objectives.config import objective_problems

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


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
