"""Learning-rate schedule: linear warmup, then cosine (or linear, or constant) decay to min_lr."""

from __future__ import annotations

import math

from card_megatron.config import OptimConfig


def learning_rate(step: int, cfg: OptimConfig, train_iters: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based)."""
    warmup = cfg.lr_warmup_iters
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_iters = cfg.lr_decay_iters or train_iters
    if cfg.lr_decay_style == "constant" or decay_iters <= warmup:
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    if cfg.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor
