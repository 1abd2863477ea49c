"""BD3LM (Arriola et al. 2025): block diffusion over concat(xt, x0).

The model reads 2L positions: the noised sequence xt (positions 0..L-1) followed by the
clean sequence x0 (positions 0..L-1 again). Each block of ``block_size`` positions has
its own noise level; the loss is MDLM's on the noised half (weight 1/t_block on masked
noised positions, 0 on the clean half), normalised by B * L. The attention mask lets
noised block b see itself and the clean blocks before it, and the clean half see
itself block-causally, so one pass trains every block's denoiser.
"""

from __future__ import annotations

from typing import Optional

import torch

from card_megatron import noise
from card_megatron.objectives.base import Batch, LossInputs, ModelInputs, Objective, check_t, scalar
from card_megatron.objectives.config import ObjectiveConfig
from card_megatron.objectives.mdlm import masked_diffusion_corruption
from card_megatron.objectives.traits import ObjectiveTraits


def block_diffusion_attention_mask(
    seq_len: int, block_size: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """BoolTensor [2L, 2L], True where query (row) may attend key (column).

    Rows/columns 0..L-1 are the noised half, L..2L-1 the clean half; block(i) =
    (i mod L) // block_size. Noised block b attends noised block b (block-diagonal) and
    clean blocks < b (offset block-causal); clean block b attends clean blocks <= b
    (block-causal); clean never attends noised.
    """
    if block_size <= 0 or seq_len % block_size:
        raise ValueError(f"objective.block_size ({block_size}) must divide model.seq_length ({seq_len})")
    index = torch.arange(2 * seq_len, device=device)
    block = (index % seq_len) // block_size
    noised = index < seq_len
    q_block, k_block = block[:, None], block[None, :]
    q_noised, k_noised = noised[:, None], noised[None, :]
    noised_to_noised = q_noised & k_noised & (q_block == k_block)
    noised_to_clean = q_noised & ~k_noised & (k_block < q_block)
    clean_to_clean = ~q_noised & ~k_noised & (k_block <= q_block)
    return noised_to_noised | noised_to_clean | clean_to_clean


class Bd3lmObjective(Objective):
    traits = ObjectiveTraits(
        name="bd3lm",
        label="BD3LM",
        mask_kind="block",
        likelihood="bound",
        decoders=("bd3lm",),
        decoder_note="a BD3LM checkpoint denoises whole blocks; use --decoding bd3lm",
        causal_lm=False,
        lm_eval_loglikelihood="refused",  # its block structure has no conditional estimate in the adapter
        sequence_length_multiplier=2,  # the model reads concat(xt, x0)
    )

    @classmethod
    def config_problems(cls, cfg: ObjectiveConfig, seq_length: int) -> list[str]:
        if cfg.block_size >= 1 and seq_length % cfg.block_size:
            return [f"objective.block_size ({cfg.block_size}) must divide model.seq_length ({seq_length})"]
        return []

    def __init__(self, cfg: ObjectiveConfig, seq_length: int, mask_token_id: int, vocab_size: int):
        super().__init__(
            cfg, seq_length, mask_token_id, vocab_size
        )  # check_objective: block_size | L (config_problems)
        self.block_size = cfg.block_size
        self.num_blocks = seq_length // cfg.block_size
        self._masks: dict[torch.device, torch.Tensor] = {}

    def attention_mask(self, device: torch.device) -> torch.Tensor:
        """The [2L, 2L] block mask on ``device`` (built once per device)."""
        device = torch.device(device)
        if device not in self._masks:
            self._masks[device] = block_diffusion_attention_mask(self.seq_length, self.block_size, device)
        return self._masks[device]

    def _batch(self, tokens: torch.Tensor, t_blocks: torch.Tensor, keys: torch.Tensor) -> Batch:
        """t_blocks float64 [B, num_blocks]; keys float64 [B, L]."""
        B, L, device = tokens.shape[0], self.seq_length, tokens.device
        x0 = tokens[:, :L]
        t = t_blocks.repeat_interleave(self.block_size, dim=1)  # [B, L]
        xt, is_masked, weights = masked_diffusion_corruption(x0, t, keys, self.mask_token_id)
        positions = torch.arange(L, dtype=torch.int64, device=device).repeat(2).expand(B, 2 * L)
        model_inputs = ModelInputs(
            input_ids=torch.cat([xt, x0], dim=1),
            position_ids=positions,
            mask_kind="block",
            attention_mask=self.attention_mask(device),
        )
        loss_inputs = LossInputs(
            targets=torch.cat([x0, x0], dim=1),
            weights=torch.cat([weights, torch.zeros_like(weights)], dim=1),
            normaliser=scalar(B * L, device),
            suppress_mask_logit=True,
            is_masked=torch.cat([is_masked, torch.zeros_like(is_masked)], dim=1),
        )
        return model_inputs, loss_inputs

    def prepare(
        self,
        tokens: torch.Tensor,
        noise_seeds: torch.Tensor,
        sample_ids: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        t: Optional[torch.Tensor] = None,
    ) -> Batch:
        """Corrupts tokens [B, L+1] (the last token is unused) into the BD3LM batch (S = 2L).

        Block b's t lies in [t_eps, 1) (``low_discrepancy``: the Weyl sequence over
        sample_id * num_blocks + b; else uniform(seed, T_STREAM + b)); noised position i
        is masked when uniform(seed, POSITION_STREAM + i) < t of its block. With
        block_size = L this is exactly MDLM's corruption of the same sample.
        ``t`` overrides: float [B] (one t for all blocks) or [B, num_blocks].
        """
        self.check_batch(tokens, noise_seeds, sample_ids)
        B, device = tokens.shape[0], tokens.device
        seeds = noise_seeds.to(device)
        if t is None:
            t_blocks = self.draw_t(seeds, sample_ids, self.num_blocks, self.cfg.t_eps, generator)
        else:
            t = check_t(t, ((B,), (B, self.num_blocks)), self.name, lo=1e-12).to(device)
            t_blocks = t[:, None].expand(B, self.num_blocks) if t.dim() == 1 else t
        keys = self.position_keys(seeds, self.seq_length, generator)
        return self._batch(tokens, t_blocks, keys)

    def eval_passes(self, tokens: torch.Tensor, noise_seeds: torch.Tensor, sample_ids: torch.Tensor) -> list[Batch]:
        """``eval_t_samples`` passes with stratified per-block t and masks from derived seeds."""
        self.check_batch(tokens, noise_seeds, sample_ids)
        seeds = noise_seeds.to(tokens.device)
        num_passes = self.cfg.eval_t_samples
        passes = []
        for k in range(num_passes):
            t_blocks = self.eval_t(seeds, k, num_passes, self.num_blocks, self.cfg.t_eps)
            keys = self.position_keys(noise.derive_seeds(seeds, k), self.seq_length, None)
            passes.append(self._batch(tokens, t_blocks, keys))
        return passes
