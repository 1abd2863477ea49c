"""Layout-independent weights: gather a model trained under any TP/PP/ZeRO layout into one
canonical state dict (the names and full shapes of a single-process :class:`CardGPT`),
and load such a dict into a model of any tensor-parallel size.

Megatron's tensor-parallel parameters carry ``tensor_model_parallel`` and
``partition_dim`` attributes; the shards are concatenated along that dimension. The
gated MLP's ``linear_fc1`` is the one exception: each shard holds [gate_r; up_r], so the
canonical weight is [gate_0..gate_n; up_0..up_n].
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_PIPE_PREFIX = re.compile(r"^(\d+)\.(.*)$")


def canonical_name(name: str, num_layers: int) -> str:
    """Maps a PipelineModule parameter name ('3.layer.x') to CardGPT's ('layers.2.layer.x')."""
    m = _PIPE_PREFIX.match(name)
    if not m:
        return name
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0:
        return f"embedding.{rest}"
    if idx <= num_layers:
        return f"layers.{idx - 1}.{rest}"
    return f"output.{rest}"


def is_glu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def _gather_tp(name: str, param: torch.Tensor, tp_group, tp_size: int, grads: bool = False) -> torch.Tensor:
    tensor = (param.grad if grads else param).detach()
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.clone()
    dim = param.partition_dim
    parts = [torch.empty_like(tensor) for _ in range(tp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    if is_glu_fc1(name):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def gather_canonical_state(
    module: torch.nn.Module, num_layers: int, tp_group=None, tp_size: int = 1, zero3: bool = False, grads: bool = False
) -> dict[str, torch.Tensor]:
    """This process's parameters, un-sharded over tensor parallelism, under canonical names (CPU tensors).

    Every rank of the tensor-parallel group must call it (collective). Under ZeRO-3 the
    parameters are gathered over data parallelism first. With ``grads`` it gathers the
    parameters' gradients instead (for parity tests).
    """
    params = list(module.named_parameters())
    ctx = None
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
        ctx.__enter__()
    try:
        out = {}
        for name, p in params:
            out[canonical_name(name, num_layers)] = _gather_tp(name, p, tp_group, tp_size, grads).cpu()
        return out
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


def shard_for_rank(
    name: str, full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """The slice of a canonical tensor that ``param`` holds on tensor-parallel rank ``tp_rank``."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if is_glu_fc1(name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_canonical_state(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    num_layers: int,
    tp_rank: int = 0,
    tp_size: int = 1,
    strict: bool = True,
) -> None:
    """Copies a canonical state dict into ``module`` (a CardGPT or a pipeline stage set) of any TP size."""
    missing = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            key = canonical_name(name, num_layers)
            if key not in state:
                missing.append(key)
                continue
            piece = shard_for_rank(key, state[key], p, tp_rank, tp_size)
            if piece.shape != p.shape:
                raise ValueError(
                    f"weight {key}: checkpoint shape {tuple(piece.shape)} does not fit model shape {tuple(p.shape)}"
                )
            p.copy_(piece.to(p.dtype))
    if strict and missing:
        raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")


def extend_vocab_rows(
    state: dict[str, torch.Tensor], num_rows: int, mean_of: int, new_ids: list[int]
) -> dict[str, torch.Tensor]:
    """Grows the embedding (and untied output) of canonical weights to ``num_rows`` rows; the added rows
    and the rows of ``new_ids`` become the mean of rows ``[0, mean_of)`` (why a mean row:
    ``interop/hf_import.py``). Returns a new dict; ``train.init_from`` and the import use it."""
    out = dict(state)
    for key in ("embedding.embedding.word_embeddings.weight", "output.output_layer.weight"):
        if key not in state:
            continue
        old = state[key]
        mean = old[:mean_of].mean(dim=0)
        grown = mean.expand(num_rows, old.shape[1]).clone()
        grown[: old.shape[0]] = old
        for i in new_ids:
            grown[i] = mean
        out[key] = grown
    return out
