"""``torch.compile`` of each transformer layer (``model.compile_layers``), and what it needs.

Each :class:`~card_megatron.model.gpt.DecoderLayerStage` compiles its Megatron-core layer on
its own (one graph per layer, reused by every layer of the same shape), so the elementwise
work between the matmuls (RMSNorm, RoPE, SwiGLU, residual adds) is fused without compiling
the embedding, the head, the loss or DeepSpeed's hooks.

Megatron-core 0.16.1's ``RowParallelLinear.forward`` calls its matmul with ``tp_group=None``;
the matmul then looks the group up in Megatron's globals (``get_tensor_model_parallel_group_if_none``,
which warns and reads ``torch.distributed`` state), and Dynamo breaks the graph there, twice per
layer (attention output and MLP output). :class:`RowParallelLinear` passes the layer's own group
instead: no lookup, no graph break, and the process group comes from our code as everywhere else.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_layer import TransformerLayer


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """Megatron-core's row-parallel linear layer, whose matmul receives the layer's tensor-parallel
    group (Megatron passes None and looks it up, a graph break under ``torch.compile``)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def use_compiled_layers(setting: bool | None, cuda: bool) -> bool:
    """``model.compile_layers`` resolved: None means on with CUDA, off on the CPU (where compiling
    costs tens of seconds at start for little gain at the demo's sizes)."""
    return cuda if setting is None else setting


def compile_layers(model: torch.nn.Module) -> int:
    """Compiles, in place, every Megatron-core ``TransformerLayer`` in ``model`` (a
    :class:`~card_megatron.model.gpt.CardGPT` or a pipeline stage: one per ``DecoderLayerStage``);
    returns how many. Parameter names, state dicts and checkpoints are unchanged (``nn.Module.compile``)."""
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)
