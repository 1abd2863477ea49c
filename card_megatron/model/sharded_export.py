"""The export on disk: canonical weights as safetensors shards with an index, written in parallel
by the ranks that hold them and read back, under any layout, one slice at a time.

An export directory (``{checkpoint}/export/``) holds::

    model-tp00-pp000.safetensors   the canonical weights that tensor rank 0 of pipeline stage 0 holds
    ...                            one file per (tensor, pipeline) rank, written by data-parallel rank 0
    ema-tp00-pp000.safetensors     with an EMA: the EMA weights, sharded alike
    model.index.json               written last, after every shard: an index present means the export
                                   is complete (``rundir.export_problem`` checks it)
    config.yaml, tokenizer.model   the resolved config and the tokenizer

*Canonical* names and shapes are those of a single-process :class:`CardGPT` (``model/export.py``).
A tensor-parallel weight is stored as its rank's slice: the index gives, for every canonical
tensor, its full shape and dtype and each piece's file, key and ``start`` offsets in the full
tensor (a piece is a box ``start .. start + shape``). The gated MLP's ``linear_fc1`` shard is
two pieces (its gate rows and its up rows are apart in the canonical weight); a replicated
weight (norms, a row-parallel bias) is written once, by tensor rank 0. Each shard file also
carries its pieces in its safetensors metadata, from which rank 0 builds the index.

A reader (:class:`ShardedExport`) opens only the files that hold the slices it asks for and reads
only those slices (safetensors ``get_slice``): one process reads the whole tensors, a TP rank of
another layout reads its slice (:meth:`ShardedExport.load_into`). Exports written before the
shards (``model.pt``: one ``torch.save`` of the gathered weights) still load (:func:`open_export`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from card_megatron.fileio import atomic_write, fsync_path, temp_path
from card_megatron.model.export import canonical_name, is_glu_fc1
from card_megatron.rundir import EXPORT_INDEX, LEGACY_EXPORT, export_problem

FORMAT = "card_megatron.sharded_export"
VERSION = 1
KINDS = {"weights": "model", "ema": "ema"}  # the index's sections and their shard files' prefixes

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}

Box = list[tuple[int, int]]  # [start, stop) per dimension


def shard_file(kind: str, tp_rank: int, pp_rank: int) -> str:
    """The file name of one rank's shard: ``model-tp00-pp000.safetensors`` (``ema-...`` for the EMA)."""
    return f"{KINDS[kind]}-tp{tp_rank:02d}-pp{pp_rank:03d}.safetensors"


@dataclass
class ShardPart:
    """What one rank contributes to an export: its pieces of the canonical weights (and of the EMA).

    ``weights``/``ema``: {key in the file: tensor}; ``pieces``: {key: {"name": canonical name,
    "start": offsets, "shape": full shape}} (the same keys for both). Empty on the ranks that write
    nothing (data-parallel ranks other than 0)."""

    tp_rank: int
    pp_rank: int
    tp_size: int
    pp_size: int
    writes: bool
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    ema: Optional[dict[str, torch.Tensor]] = None
    pieces: dict[str, dict] = field(default_factory=dict)


def _param_pieces(
    key: str, tensor: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int
) -> list[tuple[str, torch.Tensor, list[int], list[int]]]:
    """(file key, tensor, start, full shape) of each piece of canonical ``key`` that this TP rank writes."""
    full = list(tensor.shape)
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return [(key, tensor, [0] * tensor.dim(), full)] if tp_rank == 0 else []
    dim = param.partition_dim
    n = tensor.shape[dim]
    full[dim] = n * tp_size
    start = [0] * tensor.dim()
    if is_glu_fc1(key):  # this rank holds [gate_r; up_r]; the canonical weight is [gate_0..; up_0..]
        half = n // 2
        out = []
        for i, (offset, begin) in enumerate(((0, tp_rank * half), (half, full[dim] // 2 + tp_rank * half))):
            s = list(start)
            s[dim] = begin
            out.append((f"{key}#{i}", tensor.narrow(dim, offset, half), s, full))
        return out
    start[dim] = tp_rank * n
    return [(key, tensor, start, full)]


def local_pieces(
    named: list[tuple[str, torch.Tensor]],
    num_layers: int,
    tp_rank: int,
    tp_size: int,
    zero3: bool = False,
    copy: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """This rank's pieces of the canonical weights: ({file key: CPU tensor}, {file key: piece}).

    ``named`` are the module's ``named_parameters()`` (names as a CardGPT or a pipeline stage
    set has them; each parameter's Megatron attributes say how it is split). Nothing is gathered
    across ranks except, under ZeRO-3 (``zero3``; collective over data parallelism), each parameter's
    data-parallel partitions. CPU parameters are returned as views unless ``copy`` (or ZeRO-3):
    write them before the parameters change (the EMA swap changes them: take its pieces with ``copy``).
    """
    ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        copy = True
    tensors, pieces = {}, {}
    with ctx:
        for name, p in named:
            key = canonical_name(name, num_layers)
            value = p.detach().cpu()
            for file_key, t, start, full in _param_pieces(key, value, p, tp_rank, tp_size):
                tensors[file_key] = t.clone() if copy else t.contiguous()
                pieces[file_key] = {"name": key, "start": start, "shape": full}
    return tensors, pieces


def write_shards(export_dir: str, part: ShardPart) -> list[str]:
    """Writes this rank's shard files (weights, and EMA when ``part.ema``) atomically; returns them.

    Each is written to a temporary name, flushed and renamed; an OSError names the final file."""
    if not part.writes:
        return []
    os.makedirs(export_dir, exist_ok=True)
    meta = {"format": FORMAT, "version": str(VERSION), "pieces": json.dumps(part.pieces, sort_keys=True)}
    written = []
    for kind, tensors in (("weights", part.weights), ("ema", part.ema)):
        if tensors is None:
            continue
        file = os.path.join(export_dir, shard_file(kind, part.tp_rank, part.pp_rank))
        tmp = temp_path(file)
        try:
            save_file(tensors, tmp, metadata=meta)
            fsync_path(tmp)
            os.replace(tmp, file)
        except (OSError, SafetensorError) as e:  # safetensors reports an I/O error as "... (os error 28) ..."
            with contextlib.suppress(OSError):
                os.remove(tmp)
            code = getattr(e, "errno", None) or int((re.findall(r"os error (\d+)", str(e)) or [errno.EIO])[0])
            raise OSError(code, f"{os.strerror(code)} ({e})", file) from e
        written.append(file)
    return written


def write_index(export_dir: str, tp_size: int, pp_size: int, ema: bool, step: int, layout: dict) -> str:
    """Builds ``model.index.json`` from the shard files' headers and writes it (atomically); returns its path.

    Call it once every shard is written (after a barrier). Raises FileNotFoundError naming a missing
    shard and ValueError naming a canonical tensor whose pieces do not cover it (a shard written
    by another layout or code)."""
    index: dict = {"format": FORMAT, "version": VERSION, "step": step, "layout": layout, "files": {}}
    for kind in ("weights", "ema") if ema else ("weights",):
        tensors: dict[str, dict] = {}
        for pp in range(pp_size):
            for tp in range(tp_size):
                name = shard_file(kind, tp, pp)
                file = os.path.join(export_dir, name)
                if not os.path.exists(file):
                    raise FileNotFoundError(f"{file} is missing: a rank did not write its shard of the export")
                index["files"][name] = os.path.getsize(file)
                with safe_open(file, "pt") as f:
                    pieces = json.loads((f.metadata() or {}).get("pieces", "{}"))
                    for key, piece in pieces.items():
                        sl = f.get_slice(key)
                        entry = tensors.setdefault(
                            piece["name"], {"shape": piece["shape"], "dtype": sl.get_dtype(), "pieces": []}
                        )
                        entry["pieces"].append(
                            {"file": name, "key": key, "start": piece["start"], "shape": list(sl.get_shape())}
                        )
        for tensor_name, entry in tensors.items():
            covered = sum(math.prod(p["shape"]) for p in entry["pieces"])
            if covered != math.prod(entry["shape"]):
                raise ValueError(
                    f"{export_dir}: the shards hold {covered} of the {math.prod(entry['shape'])} values "
                    f"of {tensor_name}"
                )
        index[kind] = dict(sorted(tensors.items()))
    file = os.path.join(export_dir, EXPORT_INDEX)
    atomic_write(file, json.dumps(index, indent=1))
    return file


def _overlap(a: Box, b: Box) -> Optional[Box]:
    box = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b)]
    return None if any(lo >= hi for lo, hi in box) else box


def tp_boxes(key: str, shape: list[int], param: torch.Tensor, tp_rank: int, tp_size: int) -> list[Box]:
    """The boxes of canonical tensor ``key`` (full ``shape``) that ``param`` holds on tensor rank ``tp_rank``,
    in the order they are concatenated along its partition dimension (``export.shard_for_rank``'s slice)."""
    full = [(0, n) for n in shape]
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return [full]
    dim = param.partition_dim
    parts = [(0, shape[dim])]
    if is_glu_fc1(key):
        parts = [(0, shape[dim] // 2), (shape[dim] // 2, shape[dim])]
    boxes = []
    for begin, end in parts:
        n = (end - begin) // tp_size
        box = list(full)
        box[dim] = (begin + tp_rank * n, begin + (tp_rank + 1) * n)
        boxes.append(box)
    return boxes


class ShardedExport:
    """Reads an export directory written by :func:`write_shards` and :func:`write_index`.

    Files are opened on first use and only when they hold a piece of what is read (``opened``
    lists them). ``close()`` (or ``with``) closes them. Raises FileNotFoundError naming the file when
    the index or a shard it names is missing, ValueError when the index is not this format's."""

    def __init__(self, export_dir: str) -> None:
        self.dir = export_dir
        self.index_file = os.path.join(export_dir, EXPORT_INDEX)
        problem = export_problem(export_dir)
        if problem is not None:
            raise FileNotFoundError(problem)
        with open(self.index_file) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ValueError(f"{self.index_file}: not a card_megatron export index (format {FORMAT} {VERSION})")
        self.step = int(self.index.get("step", 0))
        self.has_ema = "ema" in self.index
        self.opened: list[str] = []
        self._files: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ShardedExport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def _section(self, ema: bool) -> dict:
        if ema and not self.has_ema:
            raise ValueError(
                f"{self.index_file} has no EMA weights (the run was trained with optim.ema_decay=0); "
                "load it without EMA"
            )
        return self.index["ema" if ema else "weights"]

    def names(self, ema: bool = False) -> list[str]:
        return list(self._section(ema))

    def shape(self, name: str, ema: bool = False) -> list[int]:
        return list(self._section(ema)[name]["shape"])

    def _open(self, name: str):
        if name not in self._files:
            file = os.path.join(self.dir, name)
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file} is missing: the export {self.dir} is incomplete (its index names it)")
            try:
                self._files[name] = self._stack.enter_context(safe_open(file, "pt"))
            except (SafetensorError, OSError) as e:  # a damaged or foreign file of the recorded size
                raise ValueError(f"{file} is not a card_megatron export shard ({e})") from None
            self.opened.append(name)
        return self._files[name]

    def read(self, name: str, ema: bool = False, box: Optional[Box] = None) -> torch.Tensor:
        """Canonical tensor ``name`` (``box``: only that part of it), read from the pieces that overlap it."""
        entry = self._section(ema).get(name)
        if entry is None:
            raise KeyError(f"{self.index_file} has no tensor {name}")
        box = box or [(0, n) for n in entry["shape"]]
        out = torch.empty([hi - lo for lo, hi in box], dtype=_DTYPES[entry["dtype"]])
        filled = 0
        for piece in entry["pieces"]:
            own = [(s, s + n) for s, n in zip(piece["start"], piece["shape"])]
            common = _overlap(own, box)
            if common is None:
                continue
            src = tuple(slice(lo - s, hi - s) for (lo, hi), (s, _) in zip(common, own))
            dst = tuple(slice(lo - b, hi - b) for (lo, hi), (b, _) in zip(common, box))
            out[dst] = self._open(piece["file"]).get_slice(piece["key"])[src]
            filled += math.prod(hi - lo for lo, hi in common)
        if filled != out.numel():
            raise ValueError(f"{self.index_file}: its pieces of {name} do not cover {box}")
        return out

    def state_dict(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """Every canonical tensor, whole (one process)."""
        return {name: self.read(name, ema) for name in self.names(ema)}

    def load_into(
        self, module: torch.nn.Module, num_layers: int, tp_rank: int = 0, tp_size: int = 1, ema: bool = False
    ) -> None:
        """Copies this rank's slice of every parameter of ``module`` (a CardGPT or pipeline stage set of any
        TP size) from the export, reading only the shards and slices it needs. ValueError naming the
        weight when the export lacks it or its shape does not fit."""
        section = self._section(ema)
        with torch.no_grad():
            for name, p in module.named_parameters():
                key = canonical_name(name, num_layers)
                if key not in section:
                    raise ValueError(f"{self.index_file} lacks weight {key}")
                boxes = tp_boxes(key, section[key]["shape"], p, tp_rank, tp_size)
                parts = [self.read(key, ema, box) for box in boxes]
                piece = parts[0] if len(parts) == 1 else torch.cat(parts, dim=p.partition_dim)
                if piece.shape != p.shape:
                    raise ValueError(
                        f"weight {key}: export shape {tuple(piece.shape)} does not fit model shape {tuple(p.shape)}"
                    )
                p.copy_(piece.to(p.dtype))


class LegacyExport:
    """An export written before the shards: ``model.pt`` (``torch.load(weights_only=True)`` of
    ``{"state_dict", "ema_state_dict", "step"}``), as ``tools/import_hf.py`` still writes it. Read whole."""

    def __init__(self, export_dir: str) -> None:
        self.dir = export_dir
        self.index_file = os.path.join(export_dir, LEGACY_EXPORT)
        try:
            blob = torch.load(self.index_file, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise ValueError(f"{self.index_file} is not a card_megatron export ({type(e).__name__}: {e})") from None
        if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
            raise ValueError(f"{self.index_file} is not a card_megatron export (no state_dict)")
        self._blob = blob
        self.step = int(blob.get("step", 0))
        self.has_ema = "ema_state_dict" in blob
        self.opened = [LEGACY_EXPORT]

    def __enter__(self) -> "LegacyExport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def state_dict(self, ema: bool = False) -> dict[str, torch.Tensor]:
        if ema and not self.has_ema:
            raise ValueError(
                f"{self.index_file} has no EMA weights (the run was trained with optim.ema_decay=0); "
                "load it without EMA"
            )
        return self._blob["ema_state_dict" if ema else "state_dict"]

    def names(self, ema: bool = False) -> list[str]:
        return list(self.state_dict(ema))

    def shape(self, name: str, ema: bool = False) -> list[int]:
        return list(self.state_dict(ema)[name].shape)

    def read(self, name: str, ema: bool = False, box: Optional[Box] = None) -> torch.Tensor:
        t = self.state_dict(ema)[name]
        return t[tuple(slice(lo, hi) for lo, hi in box)] if box else t

    def load_into(
        self, module: torch.nn.Module, num_layers: int, tp_rank: int = 0, tp_size: int = 1, ema: bool = False
    ) -> None:
        from card_megatron.model.export import load_canonical_state

        load_canonical_state(module, self.state_dict(ema), num_layers, tp_rank, tp_size)


@contextlib.contextmanager
def open_export(export_dir: str) -> Iterator[ShardedExport | LegacyExport]:
    """The export in ``export_dir`` (sharded, or an older ``model.pt``), closed on exit."""
    if os.path.exists(os.path.join(export_dir, EXPORT_INDEX)):
        reader: ShardedExport | LegacyExport = ShardedExport(export_dir)
    elif os.path.exists(os.path.join(export_dir, LEGACY_EXPORT)):
        reader = LegacyExport(export_dir)
    else:
        raise FileNotFoundError(f"{export_dir} holds no export ({EXPORT_INDEX} or {LEGACY_EXPORT})")
    with reader:
        yield reader
