"""The transformer (``gpt``), its core attention, pipeline stages and the layout-free export."""

import card_megatron.parallel  # noqa: F401  (applies the CPU adapter before DeepSpeed is imported)
