"""KV caches for every layer of a :class:`~card_megatron.model.gpt.CardGPT`, and cached forward passes.

:class:`ModelCache` attaches one :class:`~card_megatron.model.attention.KVCache` to each
layer's core attention (detached again on exit), keeps their lengths in step, and runs
forward passes whose position ids continue each sequence where its cache ends
(``lengths[b] + arange(S)``, so RoPE is per sequence). The attention plan (positions and
mask) is computed once per forward pass and shared by the layers.
"""

from __future__ import annotations

from typing import Optional

import torch

from card_megatron.model.attention import KVCache


class ModelCache:
    """Per-layer KV caches for a batch of ``batch`` sequences of up to ``capacity`` positions.

    Use as a context manager (``with ModelCache(model, ...) as cache:``) or call
    :meth:`detach` when done; the model behaves as in training again afterwards.
    ``block``: the attention rule over absolute positions (1 causal; see KVCache).
    """

    def __init__(self, model: torch.nn.Module, batch: int, capacity: int, block: int = 1,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        self.model = model
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
        self.layers = [KVCache.empty(batch, capacity, groups, head_dim, dtype, device, block=block)
                       for _ in self.attentions]
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

    def forward(self, input_ids: torch.Tensor, valid: Optional[torch.Tensor] = None,
                gather: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One forward pass over new positions written at ``lengths[b] + [0, S)``.

        input_ids int64 [B, S]; valid int64 [B] (optional): real new positions per
        sequence, the rest is right padding hidden from every real query; gather int64
        [B, G] (optional): new-position indices whose logits are wanted (the output head
        then runs on those rows only). Returns logits [B, G, V] (or [B, S, V]) of the
        model's dtype. The caches are not advanced: call :meth:`advance`.
        """
        model = self.model
        s = input_ids.shape[1]
        for cache in self.layers:
            cache.valid = valid
        positions, mask = self.layers[0].plan(s)
        for cache in self.layers:
            cache.shared_plan = (positions, mask)
        try:
            x = model.embedding((input_ids, positions, torch.zeros(1, dtype=torch.long, device=input_ids.device)))
            for layer in model.layers:
                x = layer(x)
        finally:
            for cache in self.layers:
                cache.shared_plan = None
                cache.valid = None
        hidden = x[0]  # [S, B, H]
        if gather is not None:
            index = gather.t()[:, :, None].expand(-1, -1, hidden.shape[-1])  # [G, B, H]
            hidden = torch.gather(hidden, 0, index)
        weight = model.embedding.embedding.word_embeddings.weight if model.tied else None
        logits = model.output((hidden,), weight=weight)  # [G, B, V]
        return logits.transpose(0, 1)
