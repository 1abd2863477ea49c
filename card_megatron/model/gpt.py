"""The CARD transformer: a GPT-style decoder from Megatron-core tensor-parallel layers.

One spec function (:func:`layer_spec`) builds every transformer layer; the attention
mask kind (causal, full, block) is its parameter, not a fork of the model. The model
is cut into *stages* (embedding, one per transformer layer, output head) that pass a
tuple ``(hidden [S, B, H], position_ids [B, S], attention_mask)`` along, so the same
modules serve a single-process model (:class:`CardGPT`) and DeepSpeed's pipeline
engine (``model/pipeline.py``).

Every stage seeds its own initialisation from ``(seed, stage index)`` and Megatron
initialises the full (unsharded) weights on the CPU before sharding them, so the
initial weights are identical under any tensor- or pipeline-parallel layout.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from card_megatron.config import ModelConfig
from card_megatron.model.attention import CardCoreAttention
from card_megatron.model.compile import RowParallelLinear
from card_megatron.model.cross_entropy import chunked_vocab_parallel_nll
from card_megatron.objectives.traits import MASK_KINDS
from card_megatron.parallel.cpu_adapter import activation_checkpoint

_MEGATRON_MASK_TYPE = {"causal": AttnMaskType.causal, "full": AttnMaskType.no_mask, "block": AttnMaskType.arbitrary}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Rounds the vocabulary up so each tensor-parallel shard is a multiple of ``divisible_by``."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_config(cfg: ModelConfig, tp_size: int, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """Megatron-core's TransformerConfig for our decoder (RMSNorm, gated SiLU, no biases, RoPE).

    Pipeline parallelism is DeepSpeed's business (stages are cut by ``model/pipeline.py``),
    so Megatron sees pipeline size 1 and each layer receives its global layer number.
    """
    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    fused = torch.cuda.is_available() if cfg.fused_kernels is None else cfg.fused_kernels
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=ffn,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,  # layout-independent initial weights
        apply_rope_fusion=False,  # the unfused path accepts per-sequence [S, B, 1, D] rotations
        masked_softmax_fusion=False,  # attention is SDPA (CardCoreAttention), not Megatron's softmax
        bias_activation_fusion=fused,  # Megatron's fused SwiGLU
        bias_dropout_fusion=fused,  # Megatron's fused bias-dropout-add
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # the whole layer; Megatron-core's default "full" means the same, with a warning
    )


def layer_spec(mask_kind: str, ffn_hidden_size: Optional[int] = None) -> ModuleSpec:
    """The transformer layer spec: Megatron's local GPT layer with RMSNorm and our SDPA core attention
    (and the MLP's width, which Megatron-core asks its spec for rather than reading the config)."""
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind {mask_kind!r} must be one of {MASK_KINDS}")
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    attention = spec.submodules.self_attention
    attention.params = {**attention.params, "attn_mask_type": _MEGATRON_MASK_TYPE[mask_kind]}
    attention.submodules.core_attention = ModuleSpec(module=CardCoreAttention, params={"mask_kind": mask_kind})
    attention.submodules.linear_proj = RowParallelLinear  # passes its group: no graph break when compiled
    spec.submodules.mlp.submodules.linear_fc2 = RowParallelLinear
    if ffn_hidden_size is not None:
        spec.submodules.mlp.params = {**spec.submodules.mlp.params, "ffn_hidden_size": ffn_hidden_size}
    return spec


@contextlib.contextmanager
def _seeded(seed: int):
    """Initialises under a private RNG stream so weights do not depend on construction order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def no_attention_mask(device) -> torch.Tensor:
    """Stands in for the attention mask of the causal and full kinds: stage tuples (and
    DeepSpeed's pipeline, which sends them between stages) need a tensor in that slot."""
    return torch.zeros(1, dtype=torch.long, device=device)


class EmbeddingStage(torch.nn.Module):
    """Token embedding (vocab-parallel) and the RoPE table. In: (input_ids [B,S], position_ids [B,S], mask)."""

    def __init__(
        self, config: TransformerConfig, vocab_size: int, max_positions: int, rotary_base: int, seed: int, tp_group
    ):
        super().__init__()
        with _seeded(seed):
            self.embedding = LanguageModelEmbedding(
                config,
                vocab_size=vocab_size,
                max_sequence_length=max_positions,
                position_embedding_type="rope",
                tp_group=tp_group,
            )

    def forward(self, inputs):
        input_ids, position_ids, mask = inputs
        hidden = self.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        return hidden, position_ids, mask


class DecoderLayerStage(torch.nn.Module):
    """One Megatron-core TransformerLayer. In/out: (hidden [S,B,H], position_ids [B,S], mask)."""

    def __init__(
        self,
        config: TransformerConfig,
        spec: ModuleSpec,
        layer_number: int,
        rotary_base: int,
        recompute: bool,
        seed: int,
    ):
        super().__init__()
        with _seeded(seed):
            self.layer = build_module(spec, config=config, layer_number=layer_number)
        self.rotary = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=rotary_base, use_cpu_initialization=True
        )
        self.recompute = recompute
        self.mask_kind = spec.submodules.self_attention.submodules.core_attention.params["mask_kind"]

    def rotary_for(self, position_ids: torch.Tensor) -> torch.Tensor:
        """RoPE angles for arbitrary positions: [S, B, 1, head_dim] from position_ids [B, S]."""
        inv_freq = self.rotary.inv_freq.to(position_ids.device)
        freqs = position_ids.t().to(torch.float32)[..., None] * inv_freq  # [S, B, D/2]
        return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]

    def forward(self, inputs):
        hidden, position_ids, mask = inputs
        rotary = self.rotary_for(position_ids)
        attn_mask = mask.bool() if self.mask_kind == "block" else None

        def run(h):
            out, _ = self.layer(hidden_states=h, attention_mask=attn_mask, rotary_pos_emb=rotary)
            return out

        if self.recompute and self.training:
            hidden = activation_checkpoint(run, hidden)
        else:
            hidden = run(hidden)
        return hidden, position_ids, mask


class OutputStage(torch.nn.Module):
    """Final RMSNorm and the column-parallel output layer: returns logits [S, B, V / TP]."""

    def __init__(self, config: TransformerConfig, vocab_size: int, seed: int, tp_group, tied: bool = False):
        super().__init__()
        with _seeded(seed):
            self.final_norm = WrappedTorchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=tied,
                tp_group=tp_group,
            )

    def forward(self, inputs, weight: Optional[torch.Tensor] = None):
        hidden = inputs[0]
        logits, _ = self.output_layer(self.final_norm(hidden), weight=weight)
        return logits


def build_stages(
    cfg: ModelConfig,
    mask_kind: str,
    vocab_size: int,
    tp_size: int,
    seed: int,
    params_dtype: torch.dtype = torch.float32,
    tp_group=None,
):
    """The model as a list of (stage class, kwargs) in order: embedding, layers, output head.

    Returns (config, stages) where each (class, kwargs) builds one stage; stage i seeds with seed + i.
    ``tp_group``: the tensor-parallel group (``ParallelInfo.tp_group``); None takes Megatron's, which
    ``parallel/state.init_distributed`` created. The layers that ask for it receive it explicitly.
    """
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    config = transformer_config(cfg, tp_size, params_dtype)
    decoder_layer_spec = layer_spec(mask_kind, config.ffn_hidden_size)  # Megatron's ModuleSpec of one layer
    max_positions = cfg.seq_length
    stages = [
        (
            EmbeddingStage,
            dict(
                config=config,
                vocab_size=vocab_size,
                max_positions=max_positions,
                rotary_base=cfg.rotary_base,
                seed=seed,
                tp_group=tp_group,
            ),
        )
    ]
    for i in range(cfg.num_layers):
        stages.append(
            (
                DecoderLayerStage,
                dict(
                    config=config,
                    spec=decoder_layer_spec,
                    layer_number=i + 1,
                    rotary_base=cfg.rotary_base,
                    recompute=cfg.recompute_activations,
                    seed=seed + 1 + i,
                ),
            )
        )
    stages.append(
        (OutputStage, dict(config=config, vocab_size=vocab_size, seed=seed + 1 + cfg.num_layers, tp_group=tp_group))
    )
    return config, stages


class CardGPT(torch.nn.Module):
    """The whole decoder in one process (any tensor-parallel size, pipeline size 1).

    ``forward(input_ids [B,S], position_ids [B,S], attention_mask=None) -> logits [S, B, V/TP]``
    (vocab-sharded under tensor parallelism; never gathered for the loss). Decoding attaches
    KV caches to :meth:`core_attentions` (``inference/cache.py``) and calls the same forward.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        mask_kind: str,
        vocab_size: int,
        tp_size: int = 1,
        seed: int = 1234,
        params_dtype: torch.dtype = torch.float32,
        tp_group=None,
    ):
        super().__init__()
        self.config, stages = build_stages(cfg, mask_kind, vocab_size, tp_size, seed, params_dtype, tp_group)
        self.mask_kind = mask_kind
        self.vocab_size = vocab_size
        self.tied = not cfg.untie_embeddings_and_output_weights
        (ecls, ekw), *layer_stages, (ocls, okw) = stages
        self.embedding = ecls(**ekw)
        self.layers = torch.nn.ModuleList([cls(**kw) for cls, kw in layer_stages])
        self.output = ocls(**okw, tied=self.tied)

    def core_attentions(self) -> list[CardCoreAttention]:
        return [layer.layer.self_attention.core_attention for layer in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits [S, B, V/TP]; with ``output_positions`` int64 [B, G] only those positions' logits,
        [G, B, V/TP] (the output head runs on those rows only: decoders that need a few positions)."""
        mask = attention_mask if attention_mask is not None else no_attention_mask(input_ids.device)
        x = self.embedding((input_ids, position_ids, mask))
        for layer in self.layers:
            x = layer(x)
        if output_positions is not None:
            hidden = x[0]  # [S, B, H]
            index = output_positions.t()[:, :, None].expand(-1, -1, hidden.shape[-1])  # [G, B, H]
            x = (torch.gather(hidden, 0, index),)
        weight = self.embedding.embedding.word_embeddings.weight if self.tied else None
        return self.output(x, weight=weight)


def suppress_token_logit(logits: torch.Tensor, token_id: int, vocab_start: int) -> torch.Tensor:
    """Sets the logit of ``token_id`` to -inf on the shard that holds it (SUBS parameterisation).

    logits: [S, B, V/TP] covering ids [vocab_start, vocab_start + V/TP).
    """
    local = token_id - vocab_start
    if 0 <= local < logits.shape[-1]:
        logits = logits.clone()
        logits[..., local] = float("-inf")
    return logits


def per_token_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    suppress_id: Optional[int] = None,
    vocab_start: int = 0,
    tp_group=None,
) -> torch.Tensor:
    """Per-token negative log-likelihood from vocab-sharded logits, without gathering them.

    logits: [S, B, V/TP] (any float dtype); targets: [B, S] (global ids); ``tp_group``: the group
    the vocabulary is sharded over (None: Megatron's tensor-parallel group). Returns [B, S] float32.
    Chunked cross entropy (``model/cross_entropy.py``): no float32 copy of the logits; backward
    overwrites ``logits`` with their gradient, so read anything else from them (e.g.
    :func:`per_token_top1_logprob`) before backward.
    """
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return chunked_vocab_parallel_nll(logits, targets.t(), vocab_start, suppress_id, tp_group).t()


@torch.no_grad()
def per_token_top1_logprob(
    logits: torch.Tensor, suppress_id: Optional[int] = None, vocab_start: int = 0, tp_group=None
) -> torch.Tensor:
    """Log-probability of the most probable token at each position, from vocab-sharded logits.

    logits: [S, B, V/TP]; ``tp_group``: the tensor-parallel group over which the vocabulary
    is sharded (None or size 1: unsharded). Returns [B, S] float32 (no grad). A target is
    top-1 exactly when its log-probability (``-per_token_nll``) equals this value.
    """
    logits = logits.detach().float()
    if suppress_id is not None:
        logits = suppress_token_logit(logits, suppress_id, vocab_start)
    sharded = tp_group is not None and torch.distributed.get_world_size(tp_group) > 1
    top = logits.max(dim=-1).values
    if sharded:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    sum_exp = torch.exp(logits - top[..., None]).sum(dim=-1)
    if sharded:
        torch.distributed.all_reduce(sum_exp, group=tp_group)
    return (-torch.log(sum_exp)).t()
