"""The seam to DeepSpeed: the ``mpu`` object and the DeepSpeed config, built in one place.

DeepSpeed asks an ``mpu`` for the data- and model-parallel groups (ZeRO partitions
optimizer state over the data-parallel group and reduces gradient norms over the
model-parallel group). :class:`MegatronMPU` answers from the :class:`ParallelInfo` that
``parallel/state.py`` built (the same groups as Megatron-core's parallel_state), so
DeepSpeed and Megatron's tensor-parallel layers agree on who is who.
"""

from __future__ import annotations

from typing import Any

from card_megatron.config import OptimConfig, TrainConfig
from card_megatron.parallel.state import ParallelInfo


def _from_info(attribute: str):
    """An ``mpu`` getter that returns ``self.info.<attribute>``."""
    return lambda self: getattr(self.info, attribute)


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over a :class:`ParallelInfo`. DeepSpeed's "model parallel"
    is our tensor parallelism (pipeline stages are DeepSpeed's own business)."""

    def __init__(self, info: ParallelInfo):
        self.info = info

    get_data_parallel_group = _from_info("dp_group")
    get_data_parallel_world_size = _from_info("dp_size")
    get_data_parallel_rank = _from_info("dp_rank")
    get_tensor_model_parallel_group = _from_info("tp_group")
    get_tensor_model_parallel_world_size = _from_info("tp_size")
    get_tensor_model_parallel_rank = _from_info("tp_rank")
    get_pipeline_model_parallel_group = _from_info("pp_group")
    get_pipeline_model_parallel_world_size = _from_info("pp_size")
    get_pipeline_model_parallel_rank = _from_info("pp_rank")
    # DeepSpeed's older names for the tensor-parallel ("model-parallel") group.
    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank


def resolve_dtype(precision: str, cuda: bool) -> str:
    """'auto' means bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def deepspeed_config(
    train: TrainConfig, optim: OptimConfig, zero_stage: int, data_parallel_size: int, cuda: bool
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (batch sizes, ZeRO, precision, clipping), from the
    ``train`` and ``optim`` sections and ``parallel.zero_stage``."""
    accumulation = train.global_batch_size // (train.micro_batch_size * data_parallel_size)
    precision = resolve_dtype(train.precision, cuda)
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": optim.clip_grad,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer would synchronise the device at every step; we time steps ourselves.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "checkpoint": {"load_universal": False},
    }
    if zero_stage == 3:
        # Gather the sharded parameters when saving so exports need no ZeRO tooling.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds
