"""The seam to DeepSpeed: the ``mpu`` object and the DeepSpeed config, built in one place.

DeepSpeed asks an ``mpu`` for the data- and model-parallel groups (ZeRO partitions
optimizer state over the data-parallel group and reduces gradient norms over the
model-parallel group). :class:`MegatronMPU` answers from Megatron-core's parallel_state,
so DeepSpeed and Megatron's tensor-parallel layers agree on who is who.
"""

from __future__ import annotations

from typing import Any

from megatron.core import parallel_state

from card_megatron.config import Config


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface backed by Megatron-core's parallel_state."""

    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    # DeepSpeed's older names for the tensor-parallel ("model-parallel") group.
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)


def resolve_dtype(precision: str, cuda: bool) -> str:
    """'auto' means bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def deepspeed_config(cfg: Config, data_parallel_size: int, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (batch sizes, ZeRO, precision, clipping)."""
    t, par = cfg.train, cfg.parallel
    accumulation = t.global_batch_size // (t.micro_batch_size * data_parallel_size)
    precision = resolve_dtype(t.precision, cuda)
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": par.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    if par.zero_stage == 3:
        # Gather the sharded parameters when saving so exports need no ZeRO tooling.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds
