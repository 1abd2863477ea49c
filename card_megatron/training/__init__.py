"""The training loop, checkpoints, EMA, metrics and CARD diagnostics."""

import card_megatron.parallel  # noqa: F401  (applies the CPU adapter before DeepSpeed is imported)
