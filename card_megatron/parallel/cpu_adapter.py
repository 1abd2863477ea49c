"""Makes Megatron-core and DeepSpeed run on CPU (gloo). Does nothing when CUDA is present.

Megatron-core assumes CUDA in a few places our code path reaches (measured with
megatron-core 0.16.1, see shared/PLATFORM.md):

* ``torch.cuda.current_device()`` is used as a device argument; on CPU it is made to
  return ``"cpu"``.
* The tensor-parallel RNG tracker forks the CUDA RNG state; on CPU it is replaced by
  Megatron's non-forking (inference) tracker. Dropout is then drawn from the CPU RNG.
* Megatron's activation checkpointing saves the CUDA RNG state; on CPU torch's own
  checkpoint is used instead (:func:`activation_checkpoint`).
* DeepSpeed picks its accelerator from ``DS_ACCELERATOR``; it is set to ``cpu`` before
  DeepSpeed is imported.

The GPU path is untouched: NCCL, CUDA RNG tracker, bf16.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_adapter() -> bool:
    """Applies the CPU adaptations once if CUDA is absent; returns True if it did anything."""
    global _applied
    if cuda_available():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if _applied:
        return True
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    _applied = True
    log.debug("CPU adapter applied (no CUDA): gloo backend, non-forking RNG tracker")
    return True


def reset_rng_tracker() -> None:
    """Installs an RNG tracker that works on this device (called after parallel state is set up)."""
    from megatron.core import tensor_parallel

    if cuda_available():
        return
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def activation_checkpoint(function, *args):
    """Recomputes ``function(*args)`` in backward: Megatron's checkpoint on GPU (it restores the
    CUDA RNG tracker states), torch's non-reentrant checkpoint on CPU (Megatron's needs CUDA)."""
    if cuda_available():
        from megatron.core import tensor_parallel

        return tensor_parallel.checkpoint(function, False, *args)
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
