"""What a checkpoint file may hold: the checks every loaded file passes before DeepSpeed uses it
(``checkpoint.safe_load`` calls them; issue 21).

:func:`check_structure` bounds the loaded object (depth, self-reference, sharing that unfolds
exponentially, types, dense contiguous tensors); :func:`check_layout` compares every tensor with the
shape and dtype that the live model and optimizer need (:func:`expected_layout`). Both raise
:class:`CheckpointContentError` naming the file and the key path.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# Bounds of a loaded structure (:func:`check_structure`). A checkpoint this code writes nests 5 deep
# and shares almost nothing (the ``betas`` tuple of the optimizer's parameter groups); a pickle can
# share one container at every level, so that a 2 KB file unfolds into millions of nodes when
# DeepSpeed copies it (issue 21: resume hung, 7.5 GB at depth 22).
MAX_DEPTH = 32
MAX_SHARING_NODES = 10_000  # unfolded nodes allowed beyond twice the distinct ones (containers and slots)
_SCALARS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)
_TENSOR_DTYPES = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
     torch.uint8, torch.bool}
)  # fmt: skip


class CheckpointContentError(ValueError):
    """A checkpoint file whose content is not what this code writes (crafted or damaged); names the file."""


def _refuse(path: str, where: str, what: str) -> CheckpointContentError:
    at = f" at {where}" if where else ""
    return CheckpointContentError(
        f"refusing {path}: {what}{at}. This code never writes that: the file is damaged or crafted. Move "
        f"{os.path.dirname(path)} out of the way to resume from the previous checkpoint"
    )


def _where(keys: list) -> str:
    return "".join(f"[{k!r}]" for k in keys) or "the top level"


def check_tensor(t: torch.Tensor, path: str, where: str) -> None:
    """Raises :class:`CheckpointContentError` unless ``t`` is a dense, contiguous tensor of a plain dtype.

    A stride-0 or otherwise overlapping tensor claims more elements than its file holds (a tiny file
    that expands to 64 GiB when copied); this code saves only contiguous tensors."""
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        raise _refuse(path, where, f"a tensor of layout {t.layout}")
    if t.dtype not in _TENSOR_DTYPES:
        raise _refuse(path, where, f"a tensor of dtype {t.dtype}")
    if t.numel() and not t.is_contiguous():
        raise _refuse(
            path, where, f"a non-contiguous tensor (shape {tuple(t.shape)}, strides {t.stride()}: it overlaps itself)"
        )


def check_structure(obj: Any, path: str, allowed_classes: tuple = ()) -> None:
    """Raises :class:`CheckpointContentError` naming ``path`` when the object loaded from it nests deeper
    than MAX_DEPTH, refers to itself, shares containers so that it unfolds into far more nodes than
    it holds, holds a type other than containers, scalars, tensors and ``allowed_classes`` (their
    attributes are checked alike), or a tensor :func:`check_tensor` refuses. Linear in the file's size."""
    unfolded: dict[int, int] = {}  # id -> nodes under it when unfolded (-1: being visited)
    distinct = 0  # containers and their slots, each counted once

    def visit(o: Any, keys: list) -> int:
        nonlocal distinct
        if isinstance(o, torch.Tensor):
            check_tensor(o, path, _where(keys))
            return 1
        if isinstance(o, _SCALARS):
            return 1
        if isinstance(o, dict):
            children = list(o.items())
        elif isinstance(o, (list, tuple, set, frozenset)):
            children = list(enumerate(o))
        elif isinstance(o, allowed_classes):
            if isinstance(o, int):  # an IntEnum (ZeroStageEnum)
                return 1
            children = list(vars(o).items()) if hasattr(o, "__dict__") else []
            children += [(f, getattr(o, f)) for f in getattr(type(o), "__dataclass_fields__", {}) if f not in vars(o)]
        else:
            raise _refuse(path, _where(keys), f"an object of type {type(o).__module__}.{type(o).__qualname__}")
        key = id(o)
        if key in unfolded:
            if unfolded[key] < 0:
                raise _refuse(path, _where(keys), "a container that contains itself")
            return unfolded[key]
        if len(keys) >= MAX_DEPTH:
            raise _refuse(path, _where(keys), f"containers nested deeper than {MAX_DEPTH} levels")
        unfolded[key] = -1
        distinct += 1 + len(children)  # every slot of a container is counted once, on its first visit
        total = 1 + sum(visit(v, keys + [k]) for k, v in children)
        unfolded[key] = total
        if total > 2 * distinct + MAX_SHARING_NODES:
            raise _refuse(
                path,
                _where(keys),
                f"containers shared so often that {distinct} entries unfold into {total} or more (copying the "
                "state would take exponential time and memory)",
            )
        return total

    visit(obj, [])


def expected_layout(engine) -> dict[tuple, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a checkpoint file of this rank must hold, from the live ``engine``:
    {(key, key, ...) path inside the file: (shape, dtype)}. Paths start with "module" (the model's
    state dict), "optimizer" (ZeRO 0: torch's AdamW state, one entry per parameter in group order) or
    "optimizer_state_dict" (ZeRO 1-2: ``single_partition_of_fp32_groups`` and the base optimizer's
    state per flat group; ZeRO 3: ``fp32_flat_groups`` and the optimizer state). Parts of a layout this
    function does not know (a pipeline's per-layer files, mixed-precision wrappers) are absent: their
    tensors get :func:`check_tensor`'s checks only."""
    layout: dict[tuple, tuple[tuple[int, ...], torch.dtype]] = {}
    if not hasattr(engine, "num_stages"):  # the pipeline engine keeps its weights in per-layer files
        for name, t in engine.module.state_dict().items():
            if isinstance(t, torch.Tensor):  # Megatron's `_extra_state` entries are None or bytes
                layout[("module", name)] = (tuple(t.shape), t.dtype)
    opt = engine.optimizer

    def adam_state(prefix: tuple, tensors: list[torch.Tensor]) -> None:
        for i, t in enumerate(tensors):
            layout[prefix + (i, "step")] = ((), torch.float32)
            for moment in ("exp_avg", "exp_avg_sq"):
                layout[prefix + (i, moment)] = (tuple(t.shape), torch.float32)

    if isinstance(opt, torch.optim.AdamW):
        adam_state(("optimizer", "state"), [p for g in opt.param_groups for p in g["params"]])
    elif hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO 1-2
        groups = list(opt.single_partition_of_fp32_groups)
        for i, t in enumerate(groups):
            layout[("optimizer_state_dict", "single_partition_of_fp32_groups", i)] = (tuple(t.shape), t.dtype)
        adam_state(("optimizer_state_dict", "base_optimizer_state", "state"), groups)
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO 3
        groups = list(opt.fp32_partitioned_groups_flat)
        for i, t in enumerate(groups):
            layout[("optimizer_state_dict", "fp32_flat_groups", i)] = (tuple(t.shape), t.dtype)
        adam_state(("optimizer_state_dict", "optimizer_state_dict", "state"), groups)
    return layout


# The subtrees whose every tensor must be one of expected_layout's (a tensor there at another path is refused).
_STRICT_PREFIXES = (
    ("module",),
    ("optimizer", "state"),
    ("optimizer_state_dict", "single_partition_of_fp32_groups"),
    ("optimizer_state_dict", "base_optimizer_state", "state"),
    ("optimizer_state_dict", "fp32_flat_groups"),
    ("optimizer_state_dict", "optimizer_state_dict", "state"),
)


def check_layout(path: str, obj: Any, layout: dict[tuple, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Raises :class:`CheckpointContentError` naming ``path`` and the key when a tensor of the loaded
    ``obj`` has another shape or dtype than ``layout`` (from :func:`expected_layout`) says, when a
    subtree of ``_STRICT_PREFIXES`` holds a tensor the layout does not know, or when the model's state
    dict lacks one. Subtrees the file does not have at all are left to DeepSpeed (a model file has no
    ZeRO optimizer state and the other way round)."""
    if not isinstance(obj, dict):
        return
    strict = [p for p in _STRICT_PREFIXES if _lookup(obj, p) is not None]

    def visit(o: Any, keys: tuple) -> None:
        if isinstance(o, torch.Tensor):
            want = layout.get(keys)
            if want is None:
                if any(keys[: len(p)] == p for p in strict):
                    raise _refuse(path, _where(list(keys)), "a tensor the current model and optimizer have no use for")
                return
            shape, dtype = want
            if tuple(o.shape) != shape or o.dtype != dtype:
                raise _refuse(
                    path,
                    _where(list(keys)),
                    f"a tensor of shape {tuple(o.shape)} and dtype {o.dtype} where the current model and optimizer "
                    f"need shape {shape} and dtype {dtype}",
                )
        elif isinstance(o, dict):
            for k, v in o.items():
                visit(v, keys + (k,))
        elif isinstance(o, (list, tuple)):
            for k, v in enumerate(o):
                visit(v, keys + (k,))

    visit(obj, ())
    if isinstance(obj.get("module"), dict):
        missing = [k[1] for k in layout if k[0] == "module" and k[1] not in obj["module"]]
        if missing:
            more = ", ..." if len(missing) > 3 else ""
            raise _refuse(path, "['module']", f"no tensor for {', '.join(missing[:3])}{more}")


def _lookup(obj: Any, keys: tuple) -> Any:
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        else:
            return None
    return obj
