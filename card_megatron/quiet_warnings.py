"""One line instead of Megatron-core's start-up notes; every other warning is left alone.

Without Transformer Engine and Apex (every CPU machine, and GPU machines without them),
Megatron-core warns from six modules as they are imported that it falls back to torch's
optimizers, norms and multi-tensor kernels, and its ``TransformerConfig`` warns that its own
default ``cuda_graph_scope`` is deprecated: seven warnings (fourteen lines) per rank on every
run. :func:`install` filters exactly those messages from ``megatron.*`` and logs one line on
the ``card_megatron`` logger instead (rank 0 only under ``python -m card_megatron.train``).
The fallback notes are filtered only when neither package can be found, so a broken
installation still shows Megatron's own words. Call it after configuring logging and
before importing Megatron-core: from ``card_megatron/train.py`` and the tools.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

log = logging.getLogger("card_megatron")

# What Megatron-core says when it takes a torch fallback (megatron/core/optimizer/__init__.py,
# optimizer.py, clip_grads.py, models/backends.py, models/gpt/gpt_layer_specs.py and
# distributed/fsdp/.../mixed_precision.py in megatron-core 0.16).
FALLBACK_MESSAGES = (
    r"Transformer Engine and Apex are not installed\.",
    r"Apex is not installed\. Falling back to Torch Norm",
)
# Warnings about Megatron-core's own defaults, raised whatever this code passes.
LIBRARY_DEFAULT_MESSAGES = (
    r"full scope is deprecated\. Use empty cuda_graph_scope",  # TransformerConfig.cuda_graph_scope = "full"
)
FALLBACK_NOTE = (
    "Transformer Engine and Apex are not installed: Megatron-core falls back to torch (norms, multi-tensor "
    "kernels); the optimizer (torch AdamW) and attention (torch SDPA) are the same either way"
)

_noted = False


def fused_packages_missing() -> bool:
    """True when neither Transformer Engine nor Apex can be imported (Megatron-core then falls back)."""
    return all(importlib.util.find_spec(name) is None for name in ("transformer_engine", "apex"))


def install() -> None:
    """Filters Megatron-core's start-up notes (see the module docstring) and logs the one line that
    matters, once per process. Safe to call again (the filters are not duplicated)."""
    global _noted
    messages = LIBRARY_DEFAULT_MESSAGES
    if fused_packages_missing():
        messages = FALLBACK_MESSAGES + messages
        if not _noted:
            log.info(FALLBACK_NOTE)
            _noted = True
    for message in messages:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=r"megatron\.")
