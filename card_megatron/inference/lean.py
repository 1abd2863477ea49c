"""The lean decode path: an inference-only forward pass over the model's own weights.

A profile of cached decoding (cProfile, one thread, ``docs/generation.md``) showed that on
small models most of a step is not arithmetic: Megatron-core's modules route every linear
layer through an autograd ``Function`` (even under ``no_grad``), recompute the RoPE table
in every layer, call dropout and bias-dropout-add helpers that do nothing in eval mode and
issue warnings on the hot path. :class:`LeanForward` computes the same function with plain
``torch.nn.functional`` calls on the *same* parameter tensors (no copy): embedding, per
layer RMSNorm -> QKV -> RoPE -> KV cache -> SDPA -> projection -> residual -> RMSNorm ->
SwiGLU MLP -> residual, final RMSNorm and the output head on the requested rows only, in a
batch-first layout, with the rotation computed once per pass for all layers.

It needs the KV caches of :class:`~card_megatron.inference.cache.ModelCache` (attached to
the model's core attentions; the cache supplies the attention mask) and a single-process
model (tensor-parallel size 1). Tests compare its logits with the Megatron forward and its
decoded tokens with every reference test of ``tests/test_generate.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class LeanForward:
    """``__call__(input_ids [B, S], position_ids [B, S], output_positions=None) -> logits [G, B, V]``
    (or [S, B, V]), the signature and layout of ``CardGPT.forward``, for a model with KV caches attached."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        if cfg.tensor_model_parallel_size != 1:
            raise ValueError(
                f"the lean decode path needs a single-process model (tensor_model_parallel_size "
                f"{cfg.tensor_model_parallel_size}); load the checkpoint with inference.loading.load_model"
            )
        self.heads = cfg.num_attention_heads
        self.groups = cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = cfg.kv_channels
        self.hidden = cfg.hidden_size
        self.eps = cfg.layernorm_epsilon
        self.embed = model.embedding.embedding.word_embeddings.weight
        # Megatron keeps the RoPE frequencies on the CPU (a plain attribute, not a buffer): copied to the
        # weights' device once here, not in every pass (a host-to-device copy cannot be captured in a CUDA graph)
        self.inv_freq = model.layers[0].rotary.inv_freq.to(self.embed.device)
        self.layers = []
        for stage in model.layers:
            layer = stage.layer
            attention = layer.self_attention
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    attention.linear_qkv.weight,
                    attention.linear_proj.weight,
                    layer.pre_mlp_layernorm.weight,
                    layer.mlp.linear_fc1.weight,
                    layer.mlp.linear_fc2.weight,
                    attention.core_attention,
                )
            )
        self.final_norm = model.output.final_norm.weight
        self.out_weight = self.embed if model.tied else model.output.output_layer.weight

    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, 1, head_dim] (Megatron's non-interleaved halves; computed in float32)."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq
        freqs = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    @staticmethod
    def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-x2, x1), dim=-1) * sin

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, output_positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        b, s = input_ids.shape
        per_group = self.heads // self.groups
        x = F.embedding(input_ids, self.embed)  # [B, S, H]
        cos, sin = self._rotary(position_ids, x.dtype)
        for ln1, w_qkv, w_proj, ln2, w_fc1, w_fc2, core in self.layers:
            cache = core.kv_cache
            if cache is None:
                raise ValueError("the lean decode path runs only with KV caches attached (inference.cache.ModelCache)")
            h = F.rms_norm(x, (self.hidden,), ln1, self.eps)
            qkv = F.linear(h, w_qkv).view(b, s, self.groups, per_group + 2, self.head_dim)
            q = self._rope(qkv[:, :, :, :per_group].reshape(b, s, self.heads, self.head_dim), cos, sin)
            k = self._rope(qkv[:, :, :, per_group], cos[:, :, :1], sin[:, :, :1])  # [B, S, g, d]
            v = qkv[:, :, :, per_group + 1]
            keys, values, mask = cache.write_and_read(k.transpose(0, 1), v.transpose(0, 1))  # [B, T, g, d]
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, g, T, d]
            if per_group > 1:
                keys = keys.repeat_interleave(per_group, dim=1)
                values = values.repeat_interleave(per_group, dim=1)
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=core.softmax_scale
            )  # [B, h, S, d]
            x = x + F.linear(attn.transpose(1, 2).reshape(b, s, self.heads * self.head_dim), w_proj)
            gate, up = F.linear(F.rms_norm(x, (self.hidden,), ln2, self.eps), w_fc1).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w_fc2)
        if output_positions is not None:
            x = x.gather(1, output_positions[:, :, None].expand(-1, -1, self.hidden))  # [B, G, H]
        logits = F.linear(F.rms_norm(x, (self.hidden,), self.final_norm, self.eps), self.out_weight)
        return logits.transpose(0, 1)
