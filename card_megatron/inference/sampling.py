"""Turning logits into tokens: banned ids, temperature, top-k, top-p, float64 sampling.

Every draw is an inverse-CDF lookup with a uniform from the counter-based generator of
``card_megatron/noise.py`` (``noise.uniform(sequence_seeds, counters)``, counters from the
streams below): the uniform for (sequence, position) is a pure function of
(``seed``, the sequence's index, the absolute position), so a sequence samples the same
tokens whether it is decoded alone or in a batch, and whatever the decoder (CARD with one
token per step and AR draw the same tokens from the same distributions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from card_megatron import noise

# Counter streams of the sampling uniforms (one 64-bit counter space per sequence seed).
TOKEN_STREAM = 0  # + position: the token drawn at a position
UNMASK_STREAM = 1 << 40  # + step * 2^20 + position: MDLM/BD3LM "unmask now?" draws
DIFFUSION_TOKEN_STREAM = 2 << 40  # + step * 2^20 + position: MDLM/BD3LM token draws
DRAFT_STREAM = 3 << 40  # + step * 2^20 + position: verify mode's drafts (a position may be drafted again)
ACCEPT_STREAM = 4 << 40  # + position: verify mode's accept/reject draw (a position is tested at most once)
STEP_STRIDE = 1 << 20


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. ``temperature`` 0 or ``greedy`` picks the argmax.

    top_k 0 = off; top_p 1.0 = off. Probabilities are computed in float64.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"--temperature ({self.temperature}) must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k ({self.top_k}) must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p ({self.top_p}) must lie in (0, 1]")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def banned_token_mask(model_vocab_size: int, tokenizer, device=None) -> torch.Tensor:
    """Bool [V_model]: ids never sampled: [MASK], pad, bos, and padded-vocab ids >= tokenizer.vocab_size.

    bos is banned too: the training stream never contains it (documents are separated by eos).
    """
    banned = torch.zeros(model_vocab_size, dtype=torch.bool, device=device)
    banned[tokenizer.vocab_size :] = True
    for token in (tokenizer.mask_id, tokenizer.pad_id, tokenizer.bos_id):
        if 0 <= token < model_vocab_size:
            banned[token] = True
    return banned


def sequence_seeds(seed: int, sequence_ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence noise seeds: int64 [B] from the global ``seed`` and int64 sequence ids [B]."""
    base = noise.mix(torch.tensor([seed], dtype=torch.int64, device=sequence_ids.device))
    return noise.mix(base ^ noise.mix(sequence_ids.to(torch.int64)))


def distribution(logits: torch.Tensor, banned: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """float64 probabilities [..., V] of softmax(logits / T) over the allowed ids (T = 1 when greedy).

    This (before top-k/top-p) is the distribution whose top-1 probability is the confidence.
    """
    temperature = 1.0 if cfg.is_greedy else cfg.temperature
    logits = logits.to(torch.float64) / temperature
    logits = logits.masked_fill(banned, float("-inf"))
    return torch.softmax(logits, dim=-1)


def scaled_logits(
    logits: torch.Tensor, banned: torch.Tensor, cfg: SamplingConfig, confidence: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(float64 logits / T with banned ids at -inf [..., V], top-1 probability [...] or None
    when ``confidence`` is False: decoders that never read it skip a logsumexp over the vocabulary).

    The same numbers as :func:`distribution` without materialising it: the confidence is
    exp(max - logsumexp). Feed rows of the first result to :func:`draw_from_logits`.
    """
    temperature = 1.0 if cfg.is_greedy else cfg.temperature
    scaled = (logits.to(torch.float64) / temperature).masked_fill(banned, float("-inf"))
    if not confidence:
        return scaled, None
    return scaled, torch.exp(scaled.max(dim=-1).values - torch.logsumexp(scaled, dim=-1))


def draw_from_logits(scaled: torch.Tensor, u: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Tokens int64 [...] from :func:`scaled_logits` rows [..., V] and uniforms float64 [...]."""
    if cfg.is_greedy:
        return scaled.argmax(dim=-1)
    return draw(torch.softmax(scaled, dim=-1), u, cfg)


def filter_top_k_top_p(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zeroes the tokens outside the top-k and outside the smallest top-p nucleus; [..., V] -> [..., V].

    The most likely token is always kept; the result is not renormalised.
    """
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the strictly better tokens
        drop_sorted = before >= top_p * sorted_probs.sum(-1, keepdim=True)
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


def draw(probs: torch.Tensor, u: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Tokens int64 [...] from float64 probabilities [..., V] and uniforms float64 [...] (inverse CDF)."""
    if cfg.is_greedy:
        return probs.argmax(dim=-1)
    return inverse_cdf(filter_top_k_top_p(probs, cfg.top_k, cfg.top_p), u)


def sampled_distribution(scaled: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution a draw samples from: float64 [..., V], top-k/top-p applied and renormalised.

    scaled: rows of :func:`scaled_logits`; the distribution :func:`draw_from_logits` samples (the
    speculative-sampling rule of verify decoding compares these probabilities).
    """
    probs = filter_top_k_top_p(torch.softmax(scaled, dim=-1), cfg.top_k, cfg.top_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens int64 [...] from nonnegative float64 weights [..., V] (not necessarily normalised,
    no filtering) and uniforms float64 [...] in [0, 1)."""
    cdf = torch.cumsum(probs, dim=-1)
    cdf = cdf / cdf[..., -1:]  # the last nonzero entry's cdf is exactly 1, so zero-mass ids are never hit
    token = torch.searchsorted(cdf, u[..., None].contiguous(), right=True)[..., 0]
    return token.clamp_(max=probs.shape[-1] - 1)
