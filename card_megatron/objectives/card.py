"""CARD: soft tail masking, context-aware reweighting, shifted causal prediction (CARD.md §1-§3).

A sample holds L+1 clean tokens x0. The model reads xt[:, :-1] (L positions) under a
causal mask and the output at position j predicts the clean x0[:, j+1]; every
position carries loss, weighted by w_j.

Masking is applied to the L *input* positions 0..L-1 (N = floor(t * L) of them): the
(L+1)-th token is only ever a target, so masking it would change nothing the model
sees. The tail window is therefore the last W input positions, and the weight of the
prediction at input position j depends on the mask pattern of input positions 0..j.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from card_megatron import noise
from card_megatron.objectives.arm import next_token_batch
from card_megatron.objectives.base import Batch, LossInputs, ModelInputs, Objective, check_t, scalar
from card_megatron.objectives.config import ObjectiveConfig
from card_megatron.objectives.traits import ObjectiveTraits


def soft_tail_mask(
    t: torch.Tensor,
    seq_len: int,
    tail_factor: Union[float, torch.Tensor],
    generator: Optional[torch.Generator] = None,
    *,
    keys: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Soft tail masking (CARD.md §2): BoolTensor [B, seq_len], True where masked.

    t float [B] in [0, 1]. N = floor(t * L) positions are masked, drawn uniformly
    without replacement from the last W = min(L, floor(tail_factor * N)) positions.
    ``tail_factor`` = 1 gives a solid masked tail; ``math.inf`` gives uniform masking
    over the whole sequence; a float [B] tensor gives each sample its own. The draw ranks
    one uniform key per position (``keys`` float [B, seq_len] if given, else drawn from
    ``generator``): keys outside the window are +inf, and the N smallest are masked.
    """
    # A number is checked here; a [B] tensor comes from CardObjective (tail_factor or 1 per sample) and is
    # not read back: a check of its values would be a host synchronisation in every training step.
    if not isinstance(tail_factor, torch.Tensor) and not tail_factor >= 1.0:
        raise ValueError(f"soft_tail_mask: tail_factor ({tail_factor}) must be >= 1 (objective.tail_factor)")
    factors = torch.as_tensor(tail_factor, dtype=torch.float64, device=t.device)
    if factors.dim() > 1 or (factors.dim() == 1 and factors.shape != t.shape):
        raise ValueError(f"soft_tail_mask: tail_factor must be a number or [B] like t, got {tuple(factors.shape)}")
    if t.dim() != 1:
        raise ValueError(f"soft_tail_mask: t must be [B], got {tuple(t.shape)}")
    B, L, device = t.shape[0], seq_len, t.device
    if keys is None:
        keys = torch.rand(B, L, dtype=torch.float64, generator=generator, device=device)
    elif keys.shape != (B, L):
        raise ValueError(f"soft_tail_mask: keys must be [{B}, {L}], got {tuple(keys.shape)}")
    num_masked = torch.floor(t.to(torch.float64) * L).clamp(0, L).to(torch.int64)  # [B]
    # inf * 0 would be nan: an infinite factor is the whole sequence whatever N
    scaled = torch.floor(num_masked.to(torch.float64) * factors.clamp(max=L + 1)).clamp(max=L)
    window = torch.where(factors.isinf(), torch.full_like(scaled, L), scaled).to(torch.int64)
    positions = torch.arange(L, dtype=torch.int64, device=device)
    in_window = positions[None, :] >= (L - window)[:, None]
    order = keys.masked_fill(~in_window, math.inf).argsort(dim=1)
    # N <= W, so the N smallest keys all lie inside the window.
    first_n = positions[None, :] < num_masked[:, None]
    return torch.zeros(B, L, dtype=torch.bool, device=device).scatter_(1, order, first_n)


@torch.no_grad()
def context_aware_weights(is_mask: torch.Tensor, decay: float = 0.5, beta: float = 1.0) -> torch.Tensor:
    """Context-aware weights (CARD.md §3): FloatTensor [B, L], no grad.

    is_mask bool [B, L]. C_i = m_i (1 + m_{i-1}) (m_{-1} = 0),
    S_j = sum_{i<=j} C_i (1-p)^(j-i), w_j = 1 / (beta + S_j), p = ``decay``.
    S is the linear recurrence S_j = C_j + (1-p) S_{j-1}, computed exactly with a
    log-depth doubling scan (after the step with shift s, S_j sums the terms i > j - 2s),
    so p = 0 (plain cumulative sum) and p = 1 (only C_j) need no special case and
    nothing is truncated.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"context_aware_weights: decay ({decay}) must be in [0, 1] (objective.reweight_decay)")
    if beta <= 0:
        raise ValueError(f"context_aware_weights: beta ({beta}) must be positive (objective.reweight_beta)")
    m = is_mask.to(torch.float32)
    L = m.shape[1]
    s = m * (1.0 + F.pad(m[:, :-1], (1, 0)))
    ratio = 1.0 - decay
    shift = 1
    while shift < L:
        factor = ratio**shift
        if factor == 0.0:
            break
        s = s + factor * F.pad(s[:, :-shift], (shift, 0))
        shift *= 2
    return 1.0 / (beta + s)


class CardObjective(Objective):
    traits = ObjectiveTraits(
        name="card",
        label="CARD",
        mask_kind="causal",
        likelihood="exact",  # a CARD model is an exact AR model on clean text: one clean pass
        decoders=("card", "ar"),
        decoder_note="a CARD checkpoint is causal; use --decoding card (parallel) or ar (one token per forward)",
        causal_lm=True,
        lm_eval_loglikelihood="exact",
        mask_diagnostics=True,
        exclusive_keys=("strict_tail_fraction",),
    )

    def __init__(self, cfg: ObjectiveConfig, seq_length: int, mask_token_id: int, vocab_size: int):
        super().__init__(
            cfg, seq_length, mask_token_id, vocab_size
        )  # cfg is checked by objectives.config.check_objective
        # Uniform masking is the window covering the whole sequence (tail_factor -> inf).
        self.tail_factor = math.inf if cfg.masking == "uniform" else cfg.tail_factor

    def prepare(
        self,
        tokens: torch.Tensor,
        noise_seeds: torch.Tensor,
        sample_ids: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        t: Optional[torch.Tensor] = None,
    ) -> Batch:
        """Corrupts tokens [B, L+1] into the CARD training batch (S = L).

        t ~ U[0, 1) per sample (``low_discrepancy``: Weyl sequence over the sample id;
        else uniform(seed, counter 0)); the masked positions rank the per-position keys
        uniform(seed, POSITION_STREAM + i). With ``strict_tail_fraction`` f > 0 a sample
        whose uniform(seed, VARIANT_STREAM) is below f is masked with a strict tail
        (lambda = 1) instead. Weights are w_j (or 1 with ``reweighting: none``) at every
        position; normaliser sum(w) or B * L.
        """
        self.check_batch(tokens, noise_seeds, sample_ids)
        B, L, device = tokens.shape[0], self.seq_length, tokens.device
        if t is None:
            t = self.draw_t(noise_seeds.to(device), sample_ids, 1, 0.0, generator)[:, 0]
        else:
            t = check_t(t, ((B,),), self.name).to(device)
        keys = self.position_keys(noise_seeds.to(device), L, generator)
        is_masked = soft_tail_mask(t, L, self.sample_tail_factors(noise_seeds.to(device), generator), keys=keys)
        inputs = tokens[:, :-1].masked_fill(is_masked, self.mask_token_id)
        if self.cfg.reweighting == "context":
            weights = context_aware_weights(is_masked, self.cfg.reweight_decay, self.cfg.reweight_beta)
        else:
            weights = torch.ones(B, L, dtype=torch.float32, device=device)
        normaliser = weights.sum() if self.cfg.normaliser == "weights" else scalar(B * L, device)
        positions = torch.arange(L, dtype=torch.int64, device=device).expand(B, L)
        model_inputs = ModelInputs(input_ids=inputs, position_ids=positions, mask_kind="causal")
        loss_inputs = LossInputs(
            targets=tokens[:, 1:],
            weights=weights,
            normaliser=normaliser,
            suppress_mask_logit=False,
            is_masked=is_masked,
        )
        return model_inputs, loss_inputs

    def strict_tail_samples(
        self, noise_seeds: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Which samples get a strict tail (``objective.strict_tail_fraction``): bool [B].

        uniform(seed, VARIANT_STREAM) < fraction: a pure function of each sample's noise seed, so the
        choice does not depend on the batch, the ranks or the layout (``generator``: torch.rand instead).
        """
        B, device = noise_seeds.shape[0], noise_seeds.device
        fraction = self.cfg.strict_tail_fraction
        if not fraction:
            return torch.zeros(B, dtype=torch.bool, device=device)
        if generator is not None:
            u = torch.rand(B, dtype=torch.float64, generator=generator, device=device)
        else:
            u = noise.uniform(noise_seeds, torch.tensor([noise.VARIANT_STREAM], dtype=torch.int64))[:, 0]
        return u < fraction

    def sample_tail_factors(
        self, noise_seeds: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Union[float, torch.Tensor]:
        """lambda of each sample: the configured one, or float64 [B] with 1 where a strict tail is drawn."""
        if not self.cfg.strict_tail_fraction:
            return self.tail_factor
        strict = self.strict_tail_samples(noise_seeds, generator)
        return torch.where(strict, 1.0, self.tail_factor).to(torch.float64)

    def eval_passes(self, tokens: torch.Tensor, noise_seeds: torch.Tensor, sample_ids: torch.Tensor) -> list[Batch]:
        """One clean pass (t = 0, unit weights): the exact autoregressive NLL."""
        self.check_batch(tokens, noise_seeds, sample_ids)
        return [next_token_batch(tokens)]
