"""The inference KV cache: one :class:`KVCache` per layer, and cached forward passes.

:class:`ModelCache` attaches one :class:`KVCache` to each layer's core attention
(``CardCoreAttention.kv_cache``; detached again on exit), keeps their lengths in step, and
runs forward passes through the model's own ``forward`` with position ids that continue
each sequence where its cache ends (``lengths[b] + arange(S)``, so RoPE is per sequence).
The attention plan (positions and mask) is computed once per forward pass and shared by
the layers.

Static-shape mode (:class:`StaticShapes`, for CUDA graphs; ``docs/generation.md``): every pass
attends over the whole capacity (key length T = capacity, fixed), its mask is computed from
tensors only (no ``int(lengths.max())``), passes are padded to fixed widths, the lengths are
updated in place and finished sequences stay in the batch (ignored), so one (batch, new
positions, output rows) shape runs the same kernels on the same memory every time and
:class:`~card_megatron.inference.graphs.CudaGraphForward` can capture and replay it.
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

    ``static``: the static-shape plan (:meth:`plan`): keys over the whole capacity, and only
    written slots (``k < lengths[b] + S``) visible; a position past the capacity is written to
    the last slot (no out-of-bounds index on a device) and sets ``overflow``, a device flag that
    :class:`ModelCache` turns into an error when it is done.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    block: int = 1
    valid: Optional[torch.Tensor] = None
    # (positions [B, S], mask [B, 1, S, T]) shared by all layers of one forward pass; see ``plan``.
    shared_plan: Optional[tuple] = None
    static: bool = False
    overflow: Optional[torch.Tensor] = None  # bool [], static mode: some position was past the capacity

    @classmethod
    def empty(
        cls, batch: int, max_len: int, heads: int, head_dim: int, dtype, device, block: int = 1, static: bool = False
    ) -> "KVCache":
        z = torch.zeros(batch, max_len, heads, head_dim, dtype=dtype, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        overflow = torch.zeros((), dtype=torch.bool, device=device) if static else None
        return cls(z, z.clone(), lengths, block=block, static=static, overflow=overflow)

    def plan(self, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, S] of the next S = ``num_new`` positions and the mask [B, 1, S, T] they attend with.

        T = max(lengths) + S (static: T = capacity); mask[b, 0, q, k] is True where new position q
        may attend key k.
        """
        if self.static:
            return self._static_plan(num_new)
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

    def _static_plan(self, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`plan` with T = capacity, from tensors only: the same kernels for every call with
        the same S. The rule as in the dynamic plan, and only written slots visible (under the
        causal rule ``k <= p`` already implies it; a block rule could reach past the written keys)."""
        capacity = self.keys.shape[1]
        device = self.lengths.device
        pos = self.lengths[:, None] + torch.arange(num_new, device=device)[None, :]  # [B, S]
        key_pos = torch.arange(capacity, device=device)[None, None, :]
        mask = (key_pos // self.block) <= (pos[:, :, None] // self.block)  # [B, S, T]
        mask &= key_pos < (self.lengths + num_new)[:, None, None]
        if self.valid is not None:
            mask &= key_pos < (self.lengths + self.valid)[:, None, None]
            mask |= key_pos == pos[:, :, None]
        self.overflow |= (pos >= capacity).any()
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
        if self.static:  # no out-of-bounds index on a device (``overflow`` is raised instead)
            pos = pos.clamp(max=self.keys.shape[1] - 1)
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


@dataclass(frozen=True)
class StaticShapes:
    """The static-shape mode of :class:`ModelCache`: new: each pass is padded (on the right) to at
    least this many new positions; gather: to at least this many output rows; cuda_graphs: capture
    one CUDA graph per shape when the model is on CUDA (``inference/graphs.py``; elsewhere the same
    function runs eagerly through the same static buffers)."""

    new: int = 1
    gather: int = 1
    cuda_graphs: bool = True

    def __post_init__(self):
        if self.new < 1 or self.gather < 1:
            raise ValueError(f"static shapes need new ({self.new}) and gather ({self.gather}) >= 1")


class ModelCache:
    """Per-layer KV caches for a batch of ``batch`` sequences of up to ``capacity`` positions.

    Use as a context manager (``with ModelCache(model, ...) as cache:``) or call
    :meth:`detach` when done; the model behaves as in training again afterwards.
    ``block``: the attention rule over absolute positions (1 causal; see KVCache). ``lean``:
    run :meth:`forward` through :class:`~card_megatron.inference.lean.LeanForward` (the same
    function on the same weights without Megatron's training-time module wrappers) instead of
    the model's own ``forward``.

    ``static`` (a :class:`StaticShapes`; causal rule only): static-shape mode. Passes attend over
    the whole capacity and run through a :class:`~card_megatron.inference.graphs.CudaGraphForward`
    at the full batch; :meth:`select` only changes which rows the caller sees (finished sequences
    stay in the batch, their rows are computed and ignored, their lengths no longer advance), so
    the shapes, and the captured graphs, stay the same until the batch ends. Right padding is
    neutral under the causal rule (no real query sees a later position). The caller sizes the
    capacity so that ``lengths[b]`` plus a padded pass fits, for finished rows too; the context
    manager raises ValueError on exit if a position ever fell past it.
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
        static: Optional[StaticShapes] = None,
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
        if static is not None and block != 1:
            raise ValueError(
                f"static shapes pad passes on the right, which only the causal rule ignores (block {block})"
            )
        self.static = static
        self.attentions = model.core_attentions()
        for attention in self.attentions:
            if attention.kv_cache is not None:
                raise ValueError("the model already has KV caches attached (nested ModelCache?)")
        self.layers = [
            KVCache.empty(batch, capacity, groups, head_dim, dtype, device, block=block, static=static is not None)
            for _ in self.attentions
        ]
        if static is not None:
            from card_megatron.inference.graphs import CudaGraphForward

            for cache in self.layers[1:]:  # one lengths tensor, updated in place (a graph reads it by address)
                cache.lengths = self.layers[0].lengths
            self._active = torch.arange(batch, device=device)  # the cache row of each row the caller sees
            self.runner = CudaGraphForward(self._pass, device, use_graphs=static.cuda_graphs)
        for attention, cache in zip(self.attentions, self.layers):
            attention.kv_cache = cache

    def __enter__(self) -> "ModelCache":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.detach()
        if exc_type is None and self.static is not None and bool(self.layers[0].overflow):
            raise ValueError(
                f"KV cache overflow: a static-shape pass wrote past the capacity {self.capacity} "
                "(the decoder must size the cache for its padded passes)"
            )

    def detach(self) -> None:
        """Removes the caches from the model's layers."""
        for attention in self.attentions:
            attention.kv_cache = None

    @property
    def lengths(self) -> torch.Tensor:
        """Kept positions per sequence: int64 [B] (static mode: of the rows the caller sees, a copy)."""
        if self.static is not None:
            return self.layers[0].lengths[self._active]
        return self.layers[0].lengths

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[1]

    def set_block(self, block: int) -> None:
        if self.static is not None and block != 1:
            raise ValueError(f"static shapes need the causal rule (block 1), not block {block}")
        for cache in self.layers:
            cache.block = block

    def advance(self, num_kept: torch.Tensor) -> None:
        """Keeps the first ``num_kept[b]`` positions written by the last forward pass: int64 [B]."""
        if self.static is not None:
            lengths = self.layers[0].lengths
            lengths.index_add_(0, self._active, num_kept.to(lengths))
            return
        for cache in self.layers:
            cache.advance(num_kept)

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only the sequences ``rows`` (int64 [B']), in that order."""
        if self.static is not None:
            self._active = self._active[rows]
            return
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
        if self.static is not None:
            return self._static_forward(input_ids, valid, gather)
        return self._pass(input_ids, gather, valid)

    def _pass(
        self, input_ids: torch.Tensor, gather: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The forward pass over all cache rows: logits [B, G, V] (or [B, S, V]); no host sync in static mode."""
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

    def _static_forward(
        self, input_ids: torch.Tensor, valid: Optional[torch.Tensor], gather: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """:meth:`forward` in static mode: the caller's rows are placed in the full batch, padded to
        the static widths (ids 0 on the right, gather index 0), run through the graph runner, and
        the caller's rows and widths copied out."""
        active, shapes = self._active, self.static
        batch = self.layers[0].keys.shape[0]
        num, s = input_ids.shape
        ids = input_ids.new_zeros(batch, max(s, shapes.new))
        ids[active, :s] = input_ids
        rows_out = s
        full_gather = full_valid = None
        if gather is not None:
            rows_out = gather.shape[1]
            full_gather = gather.new_zeros(batch, max(rows_out, shapes.gather))
            full_gather[active, :rows_out] = gather
        if valid is not None:
            full_valid = valid.new_zeros(batch)
            full_valid[active] = valid
        logits = self.runner(input_ids=ids, gather=full_gather, valid=full_valid)
        return logits[active, :rows_out]  # a copy: the runner's buffer is overwritten by the next pass
