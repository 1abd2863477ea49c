"""Exponential moving average (EMA) of the weights, kept under every parallel layout.

The EMA is an fp32 shadow of this rank's *local* parameters, whatever the layout holds
there: tensor-parallel shards, this pipeline stage's parameters, the whole parameter
under ZeRO 0-2 (replicated over data parallelism, like the weights) and only this rank's
flat partition (``param.ds_tensor``) under ZeRO-3. Updates are local and need no
communication. To evaluate or export the EMA, :meth:`EMA.swapped` puts it into the
parameters for a while, so the model's own forward pass and the export's own slicing
see the EMA weights with no second code path.

:class:`RunEMA` is the run's EMA as the trainer keeps it: built from ``optim.ema_decay`` (none at 0),
its files in a checkpoint under this layout (:func:`ema_file_name`), saved and resumed.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import ContextManager, Iterator, Optional

import torch

from card_megatron.config import OptimConfig
from card_megatron.parallel.state import ParallelInfo
from card_megatron.training.safe_io import safe_load

_EMA_FILE = re.compile(r"^ema_tp\d+_pp\d+_dp\d+\.pt$")


def warmup_decay(decay: float, n: int) -> float:
    """The decay applied by the ``n``-th update (n = 1, 2, ...) with warm-up: ``min(decay, (1 + n) / (10 + n))``.

    The warm-up of MDLM's and BD3LM's EMA: early on the shadow follows the weights closely
    (2/11 at the first update, 0.9 at the 80th, 0.99 at the 890th) instead of staying mostly the
    initial weights (at 0.9999 without warm-up, 92% of the shadow is the initial weights after 800
    updates). The effective decay reaches ``decay`` after ``(10 * decay - 1) / (1 - decay)`` updates.
    """
    return min(decay, (1.0 + n) / (10.0 + n))


class EMA:
    """``shadow = d * shadow + (1 - d) * weights`` after each :meth:`update`, where ``d`` is ``decay``,
    or with ``warmup`` (the default) :func:`warmup_decay` of the update's number.

    ``named_parameters`` are the model's (name, parameter) pairs; ``zero3_optimizer`` is
    DeepSpeed's ZeRO-3 optimizer when the parameters are ZeRO-3 partitioned, else None.
    The shadow starts from the current weights.
    """

    def __init__(
        self,
        named_parameters: list[tuple[str, torch.nn.Parameter]],
        decay: float,
        zero3_optimizer=None,
        warmup: bool = True,
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay ({decay}) must be in (0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.names = [n for n, _ in named_parameters]
        self.params = [p for _, p in named_parameters]
        self._zero3 = zero3_optimizer
        self.shadow: list[torch.Tensor] = []
        self.num_updates = 0
        self.reset()

    def _local(self, p: torch.nn.Parameter) -> torch.Tensor:
        # Under ZeRO-3 the partition is the weight's only up-to-date copy between steps
        # (the optimizer writes it; gathered copies are rebuilt from it).
        return p.ds_tensor if self._zero3 is not None else p

    @torch.no_grad()
    def reset(self) -> None:
        """Restarts the EMA from the current weights."""
        self.shadow = [self._local(p).detach().float().clone() for p in self.params]
        self.num_updates = 0

    def next_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        return warmup_decay(self.decay, self.num_updates + 1) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Folds the current weights into the shadow (in place; call after each applied step)."""
        decay = self.next_decay()
        local = [self._local(p).float() for p in self.params]
        torch._foreach_mul_(self.shadow, decay)
        torch._foreach_add_(self.shadow, local, alpha=1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside, the parameters hold the EMA (cast to their dtype); the trained values come back
        bit for bit on exit. Collective under ZeRO-3: every rank must enter it."""
        trained = [self._local(p).detach().clone() for p in self.params]
        self._write(self.shadow)
        try:
            yield
        finally:
            self._write(trained)

    @torch.no_grad()
    def _write(self, values: list[torch.Tensor]) -> None:
        if self._zero3 is not None:
            # Release every gathered copy (the persistent small parameters, and any the last
            # forward pass kept), write the partitions, re-gather the persistent ones: what
            # DeepSpeed itself does around loading a checkpoint.
            self._zero3.checkpoint_event_prologue()
        for p, v in zip(self.params, values):
            self._local(p).copy_(v)
        if self._zero3 is not None:
            self._zero3.checkpoint_event_epilogue()

    def state_dict(self) -> dict:
        """Plain tensors and numbers (``torch.load(weights_only=True)`` reads it back)."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "names": list(self.names),
            "shadow": [s.detach().clone() for s in self.shadow],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict, source: Optional[str] = None) -> None:
        """Restores a :meth:`state_dict` saved under the same layout; raises ValueError naming
        ``source`` when its parameters do not match this model's."""
        where = source or "EMA state"
        if state["names"] != self.names:
            raise ValueError(
                f"{where}: its EMA covers other parameters ({len(state['names'])} saved, "
                f"{len(self.names)} in this model)"
            )
        for name, s, saved in zip(self.names, self.shadow, state["shadow"]):
            if saved.shape != s.shape:
                raise ValueError(
                    f"{where}: EMA of {name} has shape {tuple(saved.shape)}, this rank holds {tuple(s.shape)}"
                )
            s.copy_(saved)
        self.num_updates = int(state["num_updates"])


def ema_file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """The file of one rank's EMA state in a checkpoint directory (dp_rank 0 unless ZeRO-3)."""
    return f"ema_tp{tp_rank:02d}_pp{pp_rank:03d}_dp{dp_rank:05d}.pt"


def has_ema(path: str) -> bool:
    """Whether checkpoint ``path`` holds EMA files."""
    return any(_EMA_FILE.match(f) for f in os.listdir(path))


def load_ema_state(path: str, ema_file: str, layout_files: set[str]) -> Optional[dict]:
    """The EMA state in ``ema_file`` of checkpoint ``path``; None when the checkpoint has no EMA.

    ``layout_files`` are the EMA files that the current layout writes (the same set on every
    rank, so every rank decides alike). Raises ValueError when the checkpoint's EMA files are
    another set: the EMA was saved under another layout, and it is not resharded.
    """
    found = {f for f in os.listdir(path) if _EMA_FILE.match(f)}
    if not found:
        return None
    if found != layout_files:
        names = sorted(found)
        raise ValueError(
            f"{path} holds the EMA of another parallel layout ({len(names)} files: {', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}; this layout needs {len(layout_files)}). The EMA is not resharded: "
            "resume with the tensor and pipeline sizes (and, under ZeRO-3, the data-parallel size) that saved it"
        )
    return safe_load(os.path.join(path, ema_file), map_location="cpu")  # checked like every resume file


class RunEMA:
    """The run's EMA, or none (``optim.ema_decay=0``: :attr:`ema` is None), and its checkpoint files.

    Files: one per (tensor, pipeline) rank, and per data-parallel rank only under ZeRO-3 (the EMA is
    replicated over data parallelism otherwise, so the run can resume on another data-parallel size).
    """

    def __init__(self, named_parameters: list, optim: OptimConfig, zero_stage: int, zero_optimizer, info: ParallelInfo):
        partitioned = zero_stage == 3
        self.ema: Optional[EMA] = None
        if optim.ema_decay != 0.0:
            zero3 = zero_optimizer if partitioned else None
            self.ema = EMA(named_parameters, optim.ema_decay, zero3_optimizer=zero3, warmup=optim.ema_warmup)
        self.file = ema_file_name(info.tp_rank, info.pp_rank, info.dp_rank if partitioned else 0)
        self.layout_files = {
            ema_file_name(t, p, d)
            for t in range(info.tp_size)
            for p in range(info.pp_size)
            for d in (range(info.dp_size) if partitioned else [0])
        }
        self.writes_file = partitioned or info.dp_rank == 0  # this rank's state is not another's copy

    def weights(self) -> ContextManager[None]:
        """Inside, the model holds the EMA weights (the trained ones come back on exit); a no-op
        without EMA. Collective under ZeRO-3: every rank must enter it."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def update(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def file_to_save(self) -> Optional[tuple[str, dict]]:
        """(file name, state) that this rank writes into a checkpoint; None when it writes none."""
        if self.ema is None or not self.writes_file:
            return None
        return self.file, self.ema.state_dict()

    def resume(self, path: str, step: int, drop_ema: bool) -> list[str]:
        """Restores the EMA from checkpoint ``path`` (saved at ``step``), or starts it from the weights
        when the checkpoint has none; returns the lines to log. ValueError when the checkpoint's EMA
        is of another layout."""
        if self.ema is None:
            if has_ema(path):  # the resume check refused this unless train.drop_ema
                return [
                    f"{path} holds an EMA, but optim.ema_decay is 0 and train.drop_ema is true: the EMA is "
                    "dropped and later checkpoints have none"
                ]
            return []
        lines = []
        if drop_ema:
            lines.append(f"train.drop_ema has no effect: optim.ema_decay is {self.ema.decay}, the EMA is kept")
        saved = load_ema_state(path, self.file, self.layout_files)
        if saved is None:
            self.ema.reset()
            lines.append(f"{path} has no EMA: the EMA (decay {self.ema.decay}) starts from the weights of step {step}")
            return lines
        self.ema.load_state_dict(saved, os.path.join(path, self.file))
        if saved["decay"] != self.ema.decay:
            lines.append(f"the EMA saved with decay {saved['decay']} continues with optim.ema_decay={self.ema.decay}")
        return lines
