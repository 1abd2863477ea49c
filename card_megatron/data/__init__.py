"""Token shards, the sample index over them, datasets and the data-parallel sampler.

``build_datasets``, ``collate``, ``PackedDataset`` (from ``dataset``) and
``MicroBatchSampler`` (from ``sampler``) are re-exported lazily, so that importing a
light submodule (the tokenizer, the shard reader) does not import torch.
"""

from typing import Any

_EXPORTS = {
    "PackedDataset": "card_megatron.data.dataset",
    "build_datasets": "card_megatron.data.dataset",
    "collate": "card_megatron.data.dataset",
    "MicroBatchSampler": "card_megatron.data.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'card_megatron.data' has no attribute {name!r}")
