"""Core attention for the CARD transformer, plugged into Megatron-core's layer spec.

Megatron's ``SelfAttention`` computes the tensor-parallel QKV projection and applies
RoPE; this module is its ``core_attention`` submodule: softmax(QK^T)V over the local
heads. It uses ``torch.nn.functional.scaled_dot_product_attention`` so that GPUs get
fused flash / memory-efficient kernels (bf16) and CPUs a correct reference, and it
understands the three mask kinds the objectives ask for:

* ``causal`` (ARM, CARD): query i sees keys j <= i;
* ``full`` (MDLM): every query sees every key;
* ``block`` (BD3LM): an explicit boolean mask, True where the query may attend.

During decoding the inference code attaches a KV cache (``kv_cache``, any
:class:`KVCacheSlot`; ``inference/cache.py``): the new keys/values (already rotated by RoPE)
are handed to it, and attention runs over what it returns (the cached prefix plus the
new positions) with its mask.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from card_megatron.objectives.traits import MASK_KINDS


class KVCacheSlot(Protocol):
    """What core attention needs from an inference KV cache (``inference/cache.py`` implements it)."""

    def write_and_read(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stores new keys/values [S, B, g, d]; returns (keys, values) [B, T, g, d] and the bool mask [B, 1, S, T]."""
        ...


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
        self.kv_cache: Optional[KVCacheSlot] = None

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
