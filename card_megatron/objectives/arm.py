"""ARM: the autoregressive reference. Causal attention, next-token cross entropy, no masking."""

from __future__ import annotations

from typing import Optional

import torch

from card_megatron.objectives.base import Batch, LossInputs, ModelInputs, Objective, scalar
from card_megatron.objectives.traits import ObjectiveTraits


def next_token_batch(tokens: torch.Tensor) -> Batch:
    """Clean shifted causal prediction: input tokens[:, :-1], target tokens[:, 1:].

    tokens int64 [B, L+1] -> ModelInputs/LossInputs with S = L, weights 1 everywhere,
    normaliser B * L (the mean NLL per token), no masks.
    """
    B, L = tokens.shape[0], tokens.shape[1] - 1
    device = tokens.device
    inputs = tokens[:, :-1]
    positions = torch.arange(L, dtype=torch.int64, device=device).expand(B, L)
    model_inputs = ModelInputs(input_ids=inputs, position_ids=positions, mask_kind="causal")
    loss_inputs = LossInputs(
        targets=tokens[:, 1:],
        weights=torch.ones(B, L, dtype=torch.float32, device=device),
        normaliser=scalar(B * L, device),
        suppress_mask_logit=False,
        is_masked=torch.zeros(B, L, dtype=torch.bool, device=device),
    )
    return model_inputs, loss_inputs


class ArmObjective(Objective):
    traits = ObjectiveTraits(
        name="arm",
        label="ARM",
        mask_kind="causal",
        likelihood="exact",
        decoders=("ar",),
        decoder_note=(
            "an ARM checkpoint never saw [MASK] inputs, so it can only decode autoregressively (--decoding ar)"
        ),
        causal_lm=True,
        lm_eval_loglikelihood="exact",
    )

    def prepare(
        self,
        tokens: torch.Tensor,
        noise_seeds: torch.Tensor,
        sample_ids: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        t: Optional[torch.Tensor] = None,
    ) -> Batch:
        """Next-token prediction on tokens [B, L+1]; the seeds, generator and t are unused."""
        self.check_batch(tokens, noise_seeds, sample_ids)
        return next_token_batch(tokens)

    def eval_passes(self, tokens: torch.Tensor, noise_seeds: torch.Tensor, sample_ids: torch.Tensor) -> list[Batch]:
        """One clean pass: the exact autoregressive NLL."""
        self.check_batch(tokens, noise_seeds, sample_ids)
        return [next_token_batch(tokens)]
