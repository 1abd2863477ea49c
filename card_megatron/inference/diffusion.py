"""Samplers for the masked-diffusion baselines: MDLM (whole canvas) and BD3LM (block by block).

Both use ancestral sampling under the linear schedule (alpha_t = 1 - t) that trained
them: at a step from time t to s < t every still-masked position is unmasked with
probability (t - s) / t, its token drawn from the model's x0 distribution (SUBS: the
[MASK] logit is -inf; unmasked tokens are never changed); the last step (s = 0) unmasks
everything left. The output at position i predicts position i (no shift).

*Caching* (MDLM paper, §"efficient sampling"): the model is not told t, so when a step
unmasks nothing its input is unchanged and the next step reuses the last probabilities
instead of running the model again. A sequence's ``num_forward_passes`` counts only
the passes its own input needed (what decoding it alone would cost).

MDLM: one canvas per sequence, [prompt, max_new_tokens masks], full attention; ragged
canvases in a batch are right-padded and the padding is hidden (``KVCache.valid``).

BD3LM: blocks of ``block_size`` positions aligned to absolute positions (as in training,
block(i) = i // block_size). The prompt's complete blocks are clean context; the block
holding the first generated position starts with the prompt's tail unmasked. Each block
is denoised with ``steps`` ancestral steps while attending to itself bidirectionally and
to the cached clean KV of the blocks before it; the first pass of a block also carries
the previous block's (or the prompt's) clean tokens, whose KV the block-causal rule of
the clean half computes in the same pass and the cache keeps (so computing a committed
block's clean KV costs no extra pass).
"""

from __future__ import annotations

from typing import Optional

import torch

from card_megatron import noise
from card_megatron.inference import sampling
from card_megatron.inference.cache import ModelCache
from card_megatron.inference.causal import SequenceOutput, SpecialTokenIds


def _ancestral(
    probs: torch.Tensor,
    masked: torch.Tensor,
    t: float,
    s: float,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    step: int,
    cfg: sampling.SamplingConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step t -> s. probs float64 [R, N, V]; masked bool [R, N]; positions int64 [R, N] (absolute).

    Returns (unmask bool [R, N], tokens int64 [R, N], valid where ``unmask``).
    """
    p_unmask = 1.0 if s <= 0.0 else (t - s) / t
    counter = step * sampling.STEP_STRIDE + positions
    u = noise.uniform(seeds, sampling.UNMASK_STREAM + counter)
    unmask = masked & (u < p_unmask)
    tokens = torch.zeros_like(positions)
    if bool(unmask.any()):
        v = noise.uniform(seeds, sampling.DIFFUSION_TOKEN_STREAM + counter)
        tokens[unmask] = sampling.draw(probs[unmask], v[unmask], cfg)
    return unmask, tokens


def _finish(gen: list[int], eos: int, max_new_tokens: int, forwards: int) -> SequenceOutput:
    gen = gen[:max_new_tokens]
    if eos in gen:
        return SequenceOutput(gen[: gen.index(eos) + 1], forwards, "eos")
    return SequenceOutput(gen, forwards, "length")


def decode_mdlm(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    special: SpecialTokenIds,
    banned: torch.Tensor,
    sampling_cfg: sampling.SamplingConfig,
    seeds: torch.Tensor,
    steps: int,
) -> tuple[list[SequenceOutput], int]:
    """MDLM ancestral sampling with ``steps`` steps over canvases [prompt, max_new_tokens masks].

    Returns (one SequenceOutput per prompt, number of batched forward calls).
    """
    if steps < 1:
        raise ValueError(f"--steps ({steps}) must be >= 1")
    device = next(model.parameters()).device
    num = len(prompts)
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    canvas_len = prompt_len + max_new_tokens
    N = int(canvas_len.max())
    tokens = torch.full((num, N), special.pad, dtype=torch.long, device=device)
    offs = torch.arange(N, device=device)
    masked = (offs[None, :] >= prompt_len[:, None]) & (offs[None, :] < canvas_len[:, None])
    tokens[masked] = special.mask
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    positions = offs[None, :].expand(num, N)
    seeds = seeds.to(device)
    probs: Optional[torch.Tensor] = None
    stale = torch.ones(num, dtype=torch.bool, device=device)  # input changed since the last pass
    forwards = torch.zeros(num, dtype=torch.long, device=device)
    num_calls = 0
    for i in range(steps):
        t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
        need = torch.nonzero(stale & masked.any(1)).flatten()
        if need.numel() > 0:
            with ModelCache(model, need.numel(), N, block=N) as cache:
                logits = cache.forward(tokens[need], valid=canvas_len[need])  # [R, N, V]
            fresh = sampling.distribution(logits, banned, sampling_cfg)
            if probs is None:
                probs = torch.zeros(num, N, fresh.shape[-1], dtype=torch.float64, device=device)
            probs[need] = fresh
            forwards[need] += 1
            num_calls += 1
            stale[need] = False
        unmask, drawn = _ancestral(probs, masked, t, s, seeds, positions, i, sampling_cfg)
        tokens = torch.where(unmask, drawn, tokens)
        masked &= ~unmask
        stale |= unmask.any(1)
    outputs = [
        _finish(tokens[b, len(p) : int(canvas_len[b])].tolist(), special.eos, max_new_tokens, int(forwards[b]))
        for b, p in enumerate(prompts)
    ]
    return outputs, num_calls


def decode_bd3lm(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    special: SpecialTokenIds,
    banned: torch.Tensor,
    sampling_cfg: sampling.SamplingConfig,
    seeds: torch.Tensor,
    block_size: int,
    steps: int,
) -> tuple[list[SequenceOutput], int]:
    """BD3LM block-by-block sampling, ``steps`` ancestral steps per block, with an exact KV cache.

    Returns (one SequenceOutput per prompt, number of batched forward calls).
    """
    if steps < 1:
        raise ValueError(f"--steps ({steps}) must be >= 1")
    bs = block_size
    device = next(model.parameters()).device
    num = len(prompts)
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    limit = prompt_len + max_new_tokens
    capacity = int(limit.max()) + int(prompt_len.max()) + 3 * bs
    tokens = torch.full((num, capacity), special.mask, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    block_start = (prompt_len // bs) * bs  # first block with a position to generate
    forwards = torch.zeros(num, dtype=torch.long, device=device)
    seeds = seeds.to(device)
    rows = torch.arange(num, device=device)
    outputs: list[Optional[SequenceOutput]] = [None] * num
    num_calls = 0
    in_block = torch.arange(bs, device=device)
    with ModelCache(model, num, capacity, block=bs) as cache:
        while rows.numel() > 0:
            A = rows.numel()
            positions = block_start[:, None] + in_block[None, :]  # [A, bs]
            masked = positions >= prompt_len[:, None]
            probs: Optional[torch.Tensor] = None
            stale = torch.ones(A, dtype=torch.bool, device=device)
            first = True
            for i in range(steps):
                t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
                need = stale & masked.any(1)
                if bool(need.any()):
                    if first:  # clean blocks not yet cached, then the noised block
                        clean = block_start - cache.lengths
                        S = int(clean.max()) + bs
                        src = (cache.lengths[:, None] + torch.arange(S, device=device)[None, :]).clamp(max=capacity - 1)
                        ids = tokens.gather(1, src)
                        gather = clean[:, None] + in_block[None, :]
                    else:
                        ids, gather, clean = tokens.gather(1, positions), None, None
                    logits = cache.forward(ids, gather=gather)  # [A, bs, V]
                    if first:
                        cache.advance(clean)
                        first = False
                    fresh = sampling.distribution(logits, banned, sampling_cfg)
                    probs = fresh if probs is None else torch.where(need[:, None, None], fresh, probs)
                    forwards += need.long()
                    num_calls += 1
                    stale &= ~need
                unmask, drawn = _ancestral(probs, masked, t, s, seeds, positions, i, sampling_cfg)
                tokens.scatter_(1, positions, torch.where(unmask, drawn, tokens.gather(1, positions)))
                masked &= ~unmask
                stale |= unmask.any(1)
            block_tokens = tokens.gather(1, positions)
            generated = (positions >= prompt_len[:, None]) & (positions < limit[:, None])
            finished = ((block_tokens == special.eos) & generated).any(1) | (positions[:, -1] + 1 >= limit)
            block_start = block_start + bs
            if bool(finished.any()):
                for a in torch.nonzero(finished).flatten().tolist():
                    gen = tokens[a, int(prompt_len[a]) : int(limit[a])].tolist()
                    outputs[int(rows[a])] = _finish(gen, special.eos, max_new_tokens, int(forwards[a]))
                keep = torch.nonzero(~finished).flatten()
                cache.select(keep)
                state = (rows, tokens, block_start, forwards, seeds)
                rows, tokens, block_start, forwards, seeds = (x[keep] for x in state)
                prompt_len, limit = prompt_len[keep], limit[keep]
    assert all(o is not None for o in outputs)
    return outputs, num_calls
