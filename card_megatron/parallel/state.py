"""Process groups: created once here (Megatron-core's parallel_state) and passed down.

:func:`init_distributed` returns a :class:`ParallelInfo` that carries the tensor-, pipeline-
and data-parallel groups with the ranks and sizes; components take the groups from it (as
Megatron's ``ProcessGroupCollection`` and torchtitan's ``ParallelDims`` do) instead of reading
Megatron's globals. Megatron-core's own layers still read its parallel_state, which this module
initialises.

Rank layout (Megatron's default order, and DeepSpeed's PipeModelDataParallelTopology):
tensor-parallel rank varies fastest, then data-parallel, then pipeline stage, so
``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``. Megatron's groups and the
groups DeepSpeed's pipeline grid builds therefore coincide.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from card_megatron.config import ConfigError, ParallelConfig, world_size_problems
from card_megatron.parallel.connect import explain_connect_failure
from card_megatron.parallel.cpu_adapter import clear_stale_build_locks, cuda_available, reset_rng_tracker
from card_megatron.parallel.ports import free_port


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the layout, and its process groups; everything a component needs."""

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    backend: str
    tp_group: dist.ProcessGroup  # tensor parallel: the vocabulary and the heads are sharded over it
    pp_group: dist.ProcessGroup  # pipeline parallel: one rank per stage
    dp_group: dist.ProcessGroup  # data parallel: gradients and metrics are reduced over it


def init_distributed(cfg: ParallelConfig) -> ParallelInfo:
    """Starts torch.distributed (env:// from torchrun/deepspeed) and Megatron's parallel state.

    Works without a launcher too (a single process, world size 1).
    """
    clear_stale_build_locks()  # before DeepSpeed builds its ops: a killed build's lock would hang it
    # Without a launcher: one process on a free local port. The address and port are removed
    # again afterwards so that programs this process starts do not inherit a port it holds
    # (DeepSpeed reads RANK, WORLD_SIZE and LOCAL_RANK later, so those stay).
    launcher_free = {
        "MASTER_PORT": str(free_port()),
        "MASTER_ADDR": "127.0.0.1",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    added = [k for k in launcher_free if k not in os.environ]
    for k in added:
        os.environ[k] = launcher_free[k]
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = cfg.distributed_backend or ("nccl" if cuda_available() else "gloo")
    if cuda_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        with explain_connect_failure(backend, cfg.distributed_timeout_minutes):  # names the node and address
            deepspeed.init_distributed(
                dist_backend=backend, timeout=datetime.timedelta(minutes=cfg.distributed_timeout_minutes)
            )
    for k in added:
        if k in ("MASTER_ADDR", "MASTER_PORT"):
            del os.environ[k]
    world = dist.get_world_size()
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    problems = world_size_problems(cfg, world)
    if problems:
        raise ConfigError(problems[0])
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    reset_rng_tracker()
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        tp_size=tp,
        pp_size=pp,
        dp_size=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        backend=backend,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )


def init_single_process() -> None:
    """Megatron's parallel state for one process (TP = PP = 1), unless one is already set up.

    Uses an in-memory store (no TCP port, no DeepSpeed: its JIT-built communication op can
    stall start-up for tens of seconds behind another process's build lock). Inside a
    job that already initialised torch.distributed, the existing state is reused.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    reset_rng_tracker()


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(device: torch.device, *flags: torch.Tensor | bool) -> list[bool]:
    """Each flag (a bool tensor or bool) OR-ed over all ranks, with one all-reduce and one host read."""
    t = torch.stack([torch.as_tensor(f, device=device).reshape(()) for f in flags]).to(torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]
