"""Core attention for the CARD transformer, plugged into Megatron-core's layer spec.

Megatron's ``SelfAttention`` computes the tensor-parallel QKV projection and applies
RoPE; this module is its ``core_attention`` submodule: softmax(QK^T)V over the local
heads. It uses ``torch.nn.functional.scaled_dot_product_attention`` so that GPUs get
fused flash / memory-efficient kernels (bf16) and CPUs a correct reference, and it
understands the three mask kinds the objectives ask for:

* ``causal`` (ARM, CARD): query i sees keys j <= i;
* ``full`` (MDLM): every query sees every key;
* ``block`` (BD3LM): an explicit boolean mask, True where the query may attend.

It also hosts the inference KV cache (:class:`KVCache`): when one is attached, the new
keys/values (already rotated by RoPE) are written at each sequence's own positions
and attention runs over the cached prefix plus the new positions. Because attention is
causal the cached prefix is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from card_megatron.config import MASK_KINDS


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


class CardCoreAttention(MegatronModule):
    """Megatron-core ``core_attention`` submodule using scaled_dot_product_attention.

    Inputs are Megatron's [S, B, heads_per_partition, head_dim] query/key/value; output
    is [S, B, heads_per_partition * head_dim].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        mask_kind: str = "causal",
    ):
        super().__init__(config=config)
        if mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind {mask_kind!r} must be one of {MASK_KINDS}")
        self.mask_kind = mask_kind
        self.layer_number = layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        # Set by the inference code for KV-cached decoding; None during training.
        self.kv_cache: Optional[KVCache] = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias are not used by card_megatron")
        s, b, h, d = query.shape
        groups = key.shape[2]
        mask = None
        is_causal = False
        if self.kv_cache is not None:
            key, value, mask = self.kv_cache.write_and_read(key, value)  # [B, T, g, d]
            k = key.permute(0, 2, 1, 3)
            v = value.permute(0, 2, 1, 3)
        else:
            k = key.permute(1, 2, 0, 3)  # [B, g, S, d]
            v = value.permute(1, 2, 0, 3)
            if self.mask_kind == "causal":
                is_causal = True
            elif self.mask_kind == "block":
                if attention_mask is None:
                    raise ValueError("the block mask kind needs an explicit attention mask")
                mask = attention_mask
        q = query.permute(1, 2, 0, 3)  # [B, h, S, d]
        if groups != h:  # grouped-query attention: repeat key/value heads
            k = k.repeat_interleave(h // groups, dim=1)
            v = v.repeat_interleave(h // groups, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
        )  # [B, h, S, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
