"""Exponential moving average (EMA) of the weights, kept under every parallel layout.

The EMA is an fp32 shadow of this rank's *local* parameters, whatever the layout holds
there: tensor-parallel shards, this pipeline stage's parameters, the whole parameter
under ZeRO 0-2 (replicated over data parallelism, like the weights) and only this rank's
flat partition (``param.ds_tensor``) under ZeRO-3. Updates are local and need no
communication. To evaluate or export the EMA, :meth:`EMA.swapped` puts it into the
parameters for a while, so the model's own forward pass and the export's own gather
see the EMA weights with no second code path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


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
