"""Pipeline parallelism with DeepSpeed's pipeline engine.

Why DeepSpeed's engine and not Megatron-core's schedules: Megatron's schedules
(``get_forward_backward_func``) hard-code CUDA tensors in their point-to-point code,
so they cannot run (or be tested) on the CPU machines this project is developed and
tested on, and DeepSpeed's engine composes with ZeRO-1 and its checkpoints directly.
The stages are the same modules :class:`CardGPT` uses, so PP=2 and PP=1 compute the
same function from the same initial weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from card_megatron.config import ModelConfig
from card_megatron.model.gpt import DecoderLayerStage, build_stages


def build_pipeline_model(
    cfg: ModelConfig,
    mask_kind: str,
    vocab_size: int,
    tp_size: int,
    pp_size: int,
    dp_size: int,
    seed: int,
    loss_fn: Callable,
    params_dtype=torch.float32,
    tp_group=None,
) -> PipelineModule:
    """A PipelineModule whose stages hold balanced numbers of transformer layers.

    ``loss_fn(logits [S, B, V/TP], labels tuple) -> scalar`` runs on the last stage. The embedding
    and output weights must be untied (``config.validate`` checks it: stages cannot share a weight).
    """
    _, stages = build_stages(cfg, mask_kind, vocab_size, tp_size, seed, params_dtype, tp_group)
    topology = PipeModelDataParallelTopology(num_pp=pp_size, num_mp=tp_size, num_dp=dp_size)
    return PipelineModule(
        layers=[LayerSpec(cls, **kwargs) for cls, kwargs in stages],
        loss_fn=loss_fn,
        topology=topology,
        partition_method=f"type:{DecoderLayerStage.__name__}",
        activation_checkpoint_interval=0,  # layers checkpoint themselves (model.recompute_activations)
    )
