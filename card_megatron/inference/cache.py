"""The inference KV cache: one :class:`KVCache` per layer, and cached forward passes.

:class:`ModelCache` attaches one :class:`KVCache` to each layer's core attention
(``CardCoreAttention.kv_cache``; detached again on exit), keeps their lengths in step, and
runs forward passes through the model's own ``forward`` with position ids that continue
each sequence where its cache ends (``lengths[b] + arange(S)``, so RoPE is per sequence).
The attention plan (positions and mask) is computed once per forward pass and shared by
the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class KVCache:
    """Per-layer key/value cache for batched decoding with ragged lengths.

    ``keys``/``values``: [B, max_len, heads_per_partition, head_dim]. ``lengths`` [B]:
    kept positions per sequence. A forward pass over S new positions writes them at
    ``lengths[b] + [0, S)`` (tentatively: :meth:`advance` decides how many stay).

    Who sees whom is a rule over absolute positions p (query) and k (key) of one
    sequence: ``k // block <= p // block``. ``block = 1`` is the causal rule (ARM, CARD);
    ``block = n`` with ``lengths`` multiples of n is the block-causal rule of BD3LM (a
    block sees itself and the blocks before it); a block at least the capacity is full
    attention (MDLM). ``valid`` [B] (optional) hides new positions ``>= valid[b]`` of
    sequence b (right padding) from every query; a query always sees its own key, so no
    row of the softmax is empty and padded rows stay finite.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    block: int = 1
    valid: Optional[torch.Tensor] = None
    # (positions [B, S], mask [B, 1, S, T]) shared by all layers of one forward pass; see ``plan``.
    shared_plan: Optional[tuple] = None

    @classmethod
    def empty(cls, batch: int, max_len: int, heads: int, head_dim: int, dtype, device, block: int = 1) -> "KVCache":
        z = torch.zeros(batch, max_len, heads, head_dim, dtype=dtype, device=device)
        return cls(z, z.clone(), torch.zeros(batch, dtype=torch.long, device=device), block=block)

    def plan(self, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, S] of the next S = ``num_new`` positions and the mask [B, 1, S, T] they attend with.

        T = max(lengths) + S; mask[b, 0, q, k] is True where new position q may attend key k.
        """
        device = self.lengths.device
        pos = self.lengths[:, None] + torch.arange(num_new, device=device)[None, :]  # [B, S]
        total = int(self.lengths.max()) + num_new
        if total > self.keys.shape[1]:
            raise ValueError(f"KV cache overflow: {total} > capacity {self.keys.shape[1]}")
        key_pos = torch.arange(total, device=device)
        mask = (key_pos[None, None, :] // self.block) <= (pos[:, :, None] // self.block)  # [B, S, T]
        if self.valid is not None:
            mask &= key_pos[None, None, :] < (self.lengths + self.valid)[:, None, None]
            mask |= key_pos[None, None, :] == pos[:, :, None]
        return pos, mask[:, None]

    def write_and_read(self, key: torch.Tensor, value: torch.Tensor):
        """Writes new [S, B, h, d] keys/values; returns (keys, values, mask) to attend.

        keys/values: [B, T, h, d] with T = max(lengths) + S; mask: [B, 1, S, T] bool.
        """
        s, b = key.shape[0], key.shape[1]
        if self.shared_plan is not None and self.shared_plan[0].shape[1] == s:
            pos, mask = self.shared_plan
        else:
            pos, mask = self.plan(s)
        rows = torch.arange(b, device=key.device)[:, None].expand(b, s)
        self.keys[rows, pos] = key.transpose(0, 1).to(self.keys.dtype)
        self.values[rows, pos] = value.transpose(0, 1).to(self.values.dtype)
        total = mask.shape[-1]
        return self.keys[:, :total], self.values[:, :total], mask

    def advance(self, num_committed: torch.Tensor) -> None:
        """Marks the first ``num_committed[b]`` newly written positions of each sequence as kept."""
        self.lengths = self.lengths + num_committed.to(self.lengths)

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only the sequences ``rows`` (int64 [B']), in that order (e.g. to drop finished ones)."""
        self.keys, self.values, self.lengths = self.keys[rows], self.values[rows], self.lengths[rows]
        if self.valid is not None:
            self.valid = self.valid[rows]
        self.shared_plan = None


class ModelCache:
    """Per-layer KV caches for a batch of ``batch`` sequences of up to ``capacity`` positions.

    Use as a context manager (``with ModelCache(model, ...) as cache:``) or call
    :meth:`detach` when done; the model behaves as in training again afterwards.
    ``block``: the attention rule over absolute positions (1 causal; see KVCache). ``lean``:
    run :meth:`forward` through :class:`~card_megatron.inference.lean.LeanForward` (the same
    function on the same weights without Megatron's training-time module wrappers) instead of
    the model's own ``forward``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: int,
        capacity: int,
        block: int = 1,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        lean: bool = False,
    ):
        self.model = model
        if lean:
            from card_megatron.inference.lean import LeanForward

            self._forward = LeanForward(model)
        else:
            self._forward = model
        param = next(model.parameters())
        dtype = dtype or param.dtype
        device = device or param.device
        cfg = model.config
        groups = cfg.num_query_groups or cfg.num_attention_heads
        head_dim = cfg.kv_channels
        self.attentions = model.core_attentions()
        for attention in self.attentions:
            if attention.kv_cache is not None:
                raise ValueError("the model already has KV caches attached (nested ModelCache?)")
        self.layers = [
            KVCache.empty(batch, capacity, groups, head_dim, dtype, device, block=block) for _ in self.attentions
        ]
        for attention, cache in zip(self.attentions, self.layers):
            attention.kv_cache = cache

    def __enter__(self) -> "ModelCache":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> None:
        """Removes the caches from the model's layers."""
        for attention in self.attentions:
            attention.kv_cache = None

    @property
    def lengths(self) -> torch.Tensor:
        """Kept positions per sequence: int64 [B]."""
        return self.layers[0].lengths

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[1]

    def set_block(self, block: int) -> None:
        for cache in self.layers:
            cache.block = block

    def advance(self, num_kept: torch.Tensor) -> None:
        """Keeps the first ``num_kept[b]`` positions written by the last forward pass: int64 [B]."""
        for cache in self.layers:
            cache.advance(num_kept)

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only the sequences ``rows`` (int64 [B']), in that order."""
        for cache in self.layers:
            cache.select(rows)

    def forward(
        self, input_ids: torch.Tensor, valid: Optional[torch.Tensor] = None, gather: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """One forward pass over new positions written at ``lengths[b] + [0, S)``.

        input_ids int64 [B, S]; valid int64 [B] (optional): real new positions per
        sequence, the rest is right padding hidden from every real query; gather int64
        [B, G] (optional): new-position indices whose logits are wanted (the output head
        then runs on those rows only). Returns logits [B, G, V] (or [B, S, V]) of the
        model's dtype. The caches are not advanced: call :meth:`advance`.
        """
        s = input_ids.shape[1]
        for cache in self.layers:
            cache.valid = valid
        positions, mask = self.layers[0].plan(s)
        for cache in self.layers:
            cache.shared_plan = (positions, mask)
        try:
            logits = self._forward(input_ids, positions, output_positions=gather)  # [G, B, V]
        finally:
            for cache in self.layers:
                cache.shared_plan = None
                cache.valid = None
        return logits.transpose(0, 1)
