"""MDLM (Sahoo et al. 2024): bidirectional masked diffusion with the linear schedule.

The model reads the first L tokens of a sample (no shift) under full attention. Each
token is masked with probability t; with the SUBS parameterisation (the [MASK] logit
is -inf and unmasked positions are copied through) only masked positions carry loss,
with weight 1/t. Normalised by the token count B * L, the loss is the per-token NELBO,
an upper bound on the NLL (``is_bound``).
"""

from __future__ import annotations

from typing import Optional

import torch

from card_megatron import noise
from card_megatron.objectives.base import Batch, LossInputs, ModelInputs, Objective, check_t, scalar
from card_megatron.objectives.traits import ObjectiveTraits


def masked_diffusion_corruption(
    x0: torch.Tensor, t: torch.Tensor, keys: torch.Tensor, mask_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks each position whose key is below its noise level.

    x0 int64 [B, L]; t float64 [B, L] (the noise level of each position); keys float64
    [B, L] uniform in [0, 1). Returns (xt int64 [B, L], is_masked bool [B, L],
    weights float32 [B, L] = is_masked / t).
    """
    is_masked = keys < t
    xt = x0.masked_fill(is_masked, mask_token_id)
    weights = (is_masked.to(torch.float64) / t).to(torch.float32)
    return xt, is_masked, weights


class MdlmObjective(Objective):
    traits = ObjectiveTraits(
        name="mdlm",
        label="MDLM",
        mask_kind="full",
        likelihood="bound",
        decoders=("mdlm",),
        decoder_note="an MDLM checkpoint is bidirectional (no KV cache, no causal shift); use --decoding mdlm",
        causal_lm=False,
        lm_eval_loglikelihood="bound",  # the conditional ELBO of the continuation (eval/harness.py)
    )

    def _batch(self, tokens: torch.Tensor, t: torch.Tensor, keys: torch.Tensor) -> Batch:
        """t float64 [B]; keys float64 [B, L]."""
        B, L, device = tokens.shape[0], self.seq_length, tokens.device
        x0 = tokens[:, :L]
        xt, is_masked, weights = masked_diffusion_corruption(x0, t[:, None].expand(B, L), keys, self.mask_token_id)
        positions = torch.arange(L, dtype=torch.int64, device=device).expand(B, L)
        model_inputs = ModelInputs(input_ids=xt, position_ids=positions, mask_kind="full")
        loss_inputs = LossInputs(
            targets=x0,
            weights=weights,
            normaliser=scalar(B * L, device),
            suppress_mask_logit=True,
            is_masked=is_masked,
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
        """Corrupts tokens [B, L+1] (the last token is unused) into the MDLM batch (S = L).

        t in [t_eps, 1) per sample (``low_discrepancy``: t_eps + (1 - t_eps) *
        frac(0.5 + sample_id * 0.6180339887498949); else from uniform(seed, counter 0));
        position i is masked when uniform(seed, POSITION_STREAM + i) < t.
        """
        self.check_batch(tokens, noise_seeds, sample_ids)
        B, device = tokens.shape[0], tokens.device
        seeds = noise_seeds.to(device)
        if t is None:
            t = self.draw_t(seeds, sample_ids, 1, self.cfg.t_eps, generator)[:, 0]
        else:
            t = check_t(t, ((B,),), self.name, lo=1e-12).to(device)
        keys = self.position_keys(seeds, self.seq_length, generator)
        return self._batch(tokens, t, keys)

    def eval_passes(self, tokens: torch.Tensor, noise_seeds: torch.Tensor, sample_ids: torch.Tensor) -> list[Batch]:
        """``eval_t_samples`` passes with stratified t and masks from derived seeds (ELBO)."""
        self.check_batch(tokens, noise_seeds, sample_ids)
        seeds = noise_seeds.to(tokens.device)
        num_passes = self.cfg.eval_t_samples
        passes = []
        for k in range(num_passes):
            t = self.eval_t(seeds, k, num_passes, 1, self.cfg.t_eps)[:, 0]
            keys = self.position_keys(noise.derive_seeds(seeds, k), self.seq_length, None)
            passes.append(self._batch(tokens, t, keys))
        return passes
