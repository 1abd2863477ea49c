"""The one interface every training objective implements.

An objective turns a batch of clean samples and their noise seeds into what the model
consumes (:class:`ModelInputs`) and what the loss needs (:class:`LossInputs`), and
turns the per-token NLL the model produces into a scalar loss and metrics. It knows
nothing about parallelism: no ``torch.distributed`` here, every tensor stays on the
device of the input tokens, and everything is vectorised over the batch.

Shapes: B samples, L = ``seq_length`` tokens read by the model per sample (a sample
holds L+1 tokens so that causal objectives can shift), S = L *
``sequence_length_multiplier`` positions the model processes (2L for BD3LM).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from card_megatron import noise
from card_megatron.objectives.config import ObjectiveConfig
from card_megatron.objectives.traits import ObjectiveTraits


@dataclass
class ModelInputs:
    """What the model reads.

    input_ids int64 [B, S]; position_ids int64 [B, S] (may be an expanded view);
    mask_kind in ``causal | full | block``; attention_mask bool [S, S], True where the
    query (row) may attend the key (column), given only for ``block``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask_kind: str
    attention_mask: Optional[torch.Tensor] = None


@dataclass
class LossInputs:
    """What the loss needs.

    targets int64 [B, S]; weights float32 [B, S] (0 = no loss at that position);
    normaliser a scalar tensor (loss = sum(weights * nll) / normaliser);
    suppress_mask_logit: SUBS parameterisation (the ``[MASK]`` logit is -inf);
    is_masked bool [B, S]: positions of the input that hold ``[MASK]``.
    """

    targets: torch.Tensor
    weights: torch.Tensor
    normaliser: torch.Tensor
    suppress_mask_logit: bool
    is_masked: Optional[torch.Tensor] = None


Batch = tuple[ModelInputs, LossInputs]


class Objective(abc.ABC):
    """Base class: batch checks, noise draws, the loss and the evaluation sums.

    A subclass declares its :class:`~card_megatron.objectives.traits.ObjectiveTraits` (``traits``:
    its name, attention, exact or bound likelihood, decoders, ...) and implements :meth:`prepare`
    and :meth:`eval_passes`; its own config rules, if any, go in :meth:`config_problems`.
    ``objectives/__init__.py`` registers it (``OBJECTIVE_CLASSES``).
    """

    traits: ClassVar[ObjectiveTraits]

    @property
    def name(self) -> str:
        return self.traits.name

    @property
    def mask_kind(self) -> str:
        return self.traits.mask_kind

    @property
    def is_bound(self) -> bool:
        return self.traits.is_bound

    @property
    def sequence_length_multiplier(self) -> int:
        return self.traits.sequence_length_multiplier

    @classmethod
    def config_problems(cls, cfg: ObjectiveConfig, seq_length: int) -> list[str]:
        """This objective's own rules on the objective section (beyond ranges and choices), one
        message per problem; [] by default."""
        return []

    def __init__(self, cfg: ObjectiveConfig, seq_length: int, mask_token_id: int, vocab_size: int):
        if seq_length <= 0:
            raise ValueError(f"objectives: seq_length ({seq_length}) must be positive")
        if not 0 <= mask_token_id < vocab_size:
            raise ValueError(
                f"objectives: mask_token_id ({mask_token_id}) must lie in [0, vocab_size={vocab_size}); "
                "the tokenizer must provide a <mask> token inside model.vocab_size"
            )
        self.cfg = cfg
        self.seq_length = seq_length
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size

    # ----------------------------------------------------------------- interface

    @abc.abstractmethod
    def prepare(
        self,
        tokens: torch.Tensor,
        noise_seeds: torch.Tensor,
        sample_ids: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        t: Optional[torch.Tensor] = None,
    ) -> Batch:
        """Corrupts a training batch.

        tokens int64 [B, L+1]; noise_seeds int64 [B] (uint64 bits); sample_ids int64 [B]
        (global sample ids). With ``generator`` all draws come from it instead of the
        seeds (tests, ad-hoc use); ``t`` overrides the noise level (float [B]).
        Returns (ModelInputs, LossInputs) with S = L * sequence_length_multiplier.
        """

    @abc.abstractmethod
    def eval_passes(self, tokens: torch.Tensor, noise_seeds: torch.Tensor, sample_ids: torch.Tensor) -> list[Batch]:
        """The forward passes of one validation estimate of this batch.

        Sum :meth:`nll_terms` over the passes (and batches); perplexity is
        exp(sum / count), an exact likelihood unless ``is_bound`` (then an upper bound).
        """

    def loss(self, nll: torch.Tensor, loss_inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """sum(weights * nll) / normaliser, and detached metrics.

        nll float [B, S] (per-token negative log-likelihood, with grad). Returns the
        scalar loss and a dict of scalar float tensors: ``token_utilisation`` (fraction
        of the S positions with weight > 0), ``mask_ratio`` (fraction of the maskable
        input positions, L per sample, holding [MASK]) and ``nll_mean`` (plain mean NLL
        over the positions with weight > 0).
        """
        weights = loss_inputs.weights
        if nll.shape != weights.shape:
            raise ValueError(
                f"objective {self.name}: nll shape {tuple(nll.shape)} != weights shape {tuple(weights.shape)}"
            )
        loss = (weights * nll).sum() / loss_inputs.normaliser
        with torch.no_grad():
            carries = weights > 0
            num_carrying = carries.sum()
            nll_mean = (nll.detach().float() * carries).sum() / num_carrying.clamp(min=1)
            if loss_inputs.is_masked is not None:
                maskable = loss_inputs.is_masked.numel() / self.sequence_length_multiplier
                mask_ratio = loss_inputs.is_masked.sum().float() / maskable
            else:
                mask_ratio = torch.zeros((), device=nll.device)
            metrics = {
                "token_utilisation": num_carrying.float() / carries.numel(),
                "mask_ratio": mask_ratio,
                "nll_mean": nll_mean,
            }
        return loss, metrics

    def nll_terms(self, nll: torch.Tensor, loss_inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of weighted NLL, number of tokens) of one evaluation pass, as float64 scalars.

        nll float [B, S]; ``loss_inputs`` from :meth:`eval_passes`, whose normaliser is
        the token count of the pass (B * L).
        """
        with torch.no_grad():
            total = (loss_inputs.weights.double() * nll.detach().double()).sum()
            return total, loss_inputs.normaliser.detach().double()

    # ----------------------------------------------------------------- helpers

    def check_batch(self, tokens: torch.Tensor, noise_seeds: torch.Tensor, sample_ids: torch.Tensor) -> None:
        """Raises ValueError naming the problem when the batch does not match this objective."""
        L = self.seq_length
        if tokens.dim() != 2 or tokens.shape[1] != L + 1:
            raise ValueError(
                f"objective {self.name}: tokens must be [B, seq_length + 1] = [B, {L + 1}], "
                f"got {tuple(tokens.shape)} (model.seq_length = {L})"
            )
        B = tokens.shape[0]
        for what, x in (("noise_seeds", noise_seeds), ("sample_ids", sample_ids)):
            if x is None or x.shape != (B,):
                shape = None if x is None else tuple(x.shape)
                raise ValueError(f"objective {self.name}: {what} must be [B] = [{B}], got {shape}")
            if x.dtype != torch.int64:
                raise ValueError(f"objective {self.name}: {what} must be int64, got {x.dtype}")

    def draw_t(
        self,
        noise_seeds: torch.Tensor,
        sample_ids: torch.Tensor,
        num_blocks: int,
        t_min: float,
        generator: Optional[torch.Generator],
    ) -> torch.Tensor:
        """Noise levels t in [t_min, 1), one per block: float64 [B, num_blocks].

        ``generator``: torch.rand; ``low_discrepancy``: the Weyl sequence over
        ``sample_id * num_blocks + b`` (a pure function of the sample, low-discrepancy
        over consecutive global ids); otherwise ``uniform(seed, T_STREAM + b)``.
        """
        B = noise_seeds.shape[0]
        device = noise_seeds.device
        blocks = torch.arange(num_blocks, dtype=torch.int64, device=device)
        if generator is not None:
            u = torch.rand(B, num_blocks, dtype=torch.float64, generator=generator, device=device)
        elif self.cfg.low_discrepancy:
            u = noise.weyl_uniform(sample_ids.to(device)[:, None] * num_blocks + blocks[None, :])
        else:
            u = noise.uniform(noise_seeds, noise.T_STREAM + blocks)
        return t_min + (1.0 - t_min) * u

    def eval_t(
        self, noise_seeds: torch.Tensor, pass_index: int, num_passes: int, num_blocks: int, t_min: float
    ) -> torch.Tensor:
        """Stratified t of evaluation pass k of K: t_min + (1 - t_min) * frac(u + k / K).

        u = uniform(seed, EVAL_OFFSET_STREAM + b) per sample and block, so each pass's t
        is marginally uniform (the average over passes is an unbiased ELBO estimate)
        while the K passes cover [t_min, 1) evenly. Returns float64 [B, num_blocks].
        """
        blocks = torch.arange(num_blocks, dtype=torch.int64, device=noise_seeds.device)
        u = noise.uniform(noise_seeds, noise.EVAL_OFFSET_STREAM + blocks)
        u = torch.remainder(u + pass_index / num_passes, 1.0)
        return t_min + (1.0 - t_min) * u

    def position_keys(
        self, noise_seeds: torch.Tensor, num_positions: int, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        """One uniform key per input position: float64 [B, num_positions] in [0, 1)."""
        B = noise_seeds.shape[0]
        device = noise_seeds.device
        if generator is not None:
            return torch.rand(B, num_positions, dtype=torch.float64, generator=generator, device=device)
        counters = noise.POSITION_STREAM + torch.arange(num_positions, dtype=torch.int64, device=device)
        return noise.uniform(noise_seeds, counters)


def scalar(value: float, device: torch.device) -> torch.Tensor:
    """A float32 scalar tensor on ``device``."""
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def check_t(t: torch.Tensor, shapes: tuple[tuple[int, ...], ...], name: str, lo: float = 0.0) -> torch.Tensor:
    """Validates a user-given noise level override (one of ``shapes``); returns it as float64."""
    t = torch.as_tensor(t)
    if tuple(t.shape) not in shapes:
        raise ValueError(f"objective {name}: t must have shape {' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
    t = t.to(torch.float64)
    if bool(((t < lo) | (t > 1.0)).any()) or not math.isfinite(float(t.sum())):
        raise ValueError(f"objective {name}: t must lie in [{lo}, 1], got {t.tolist()}")
    return t
