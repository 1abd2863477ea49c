"""card_megatron: pretraining CARD and its baselines on Megatron-core and DeepSpeed."""

__version__ = "0.1.0"
