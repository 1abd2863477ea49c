"""Decoding causal models with an exact KV cache: CARD's dynamic parallel decoding and AR.

State of one sequence: committed tokens ``x_0 .. x_{n-1}`` (the prompt, then generated
tokens), the cache holding the clean KV of positions ``< lengths[b]`` (``lengths[b] <=
n - 1``), and a *window* of K undecided positions ``n .. n+K-1``. One forward pass reads

    [x_lengths .. x_{n-1}]  (committed, not yet cached: at least x_{n-1})
    [input n .. n+K-2]     ([MASK], or a token already committed there by ``any``)

and, because the output at input position j predicts position j+1 (the shift of CARD's
objective), the outputs at positions n-1 .. n+K-2 predict window positions n .. n+K-1.
Window positions whose top-1 probability exceeds the threshold tau are committed
(``prefix``: only a contiguous confident run from the left; ``any``: any confident one);
the leftmost, position n, is always committed, so every step makes progress. Committed
tokens are never re-masked. The cache then keeps positions ``< n``: their inputs and all
inputs before them were clean, so their KV is exactly what a clean causal pass computes;
KV computed from [MASK] inputs is never kept. The first step reads the whole prompt
(the prefill costs no extra forward pass).

K = 1 is autoregressive decoding (one token per forward, nothing masked). With tau > 1
only the leftmost position commits each step; since its prediction reads only clean
committed tokens (attention is causal, the masks lie to its right) it is the AR
prediction, so CARD decoding then equals AR decoding token for token.

``commit_policy="verify"`` (:func:`_decode_verify`, rule in ``inference/verify.py``) reads the
previous pass's drafts instead of [MASK]s and commits only verified tokens: lossless. K = 1
without a step limit runs :func:`_decode_ar`, the same passes without the window bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

from card_megatron import noise
from card_megatron.inference import sampling, verify
from card_megatron.inference.cache import ModelCache, StaticShapes

CommitPolicy = Literal["prefix", "any", "verify"]
COMMIT_POLICIES = get_args(CommitPolicy)


@dataclass(frozen=True)
class CausalDecodeConfig:
    """window: K positions decided per forward (1 = AR; the default 8 is CARD's, and ``--decoding ar``
    sets 1); threshold: tau (> 0; > 1 = one token per step); commit_policy: ``prefix`` or ``any``
    (commit confident positions, lossy below tau = 1) or ``verify`` (lossless: K - 1 drafts verified
    by the next pass, ``inference/verify.py``; tau is not used); max_steps: forward passes per
    sequence before the last one commits everything left (None = no limit; not with ``verify``);
    cuda_graphs: static shapes (``ModelCache`` with :class:`StaticShapes`: attention over the whole
    cache, passes padded to fixed widths, finished sequences kept in the batch) and, on CUDA, one
    captured graph per pass shape (``inference/graphs.py``); on a CPU the static-shape path runs
    eagerly (same tokens, slower). These defaults are the only ones: ``GenerationConfig`` and
    ``tools/generate.py`` use them."""

    window: int = 8
    threshold: float = 0.9
    commit_policy: CommitPolicy = "prefix"
    max_steps: Optional[int] = None
    lean: bool = True  # run the model through inference/lean.py (False: Megatron's modules, the reference)
    cuda_graphs: bool = False  # static shapes, captured as CUDA graphs on a GPU (needs lean)

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"--window ({self.window}) must be >= 1")
        if not self.threshold > 0:
            raise ValueError(f"--threshold ({self.threshold}) must be > 0 (tau > 1 means one token per step)")
        if self.commit_policy not in COMMIT_POLICIES:
            raise ValueError(f"--commit-policy ({self.commit_policy!r}) must be one of {', '.join(COMMIT_POLICIES)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps ({self.max_steps}) must be >= 1")
        if self.max_steps is not None and self.commit_policy == "verify":
            raise ValueError(
                f"--max-steps ({self.max_steps}) cannot be combined with --commit-policy verify: verify mode is "
                "lossless and commits only verified tokens, so it cannot force-fill the rest (drop --max-steps)"
            )
        if self.cuda_graphs and not self.lean:
            raise ValueError("--cuda-graphs captures the lean forward (inference/lean.py): drop --no-lean")

    def static_shapes(self, new: int, gather: int) -> Optional[StaticShapes]:
        """The cache's static-shape mode for passes padded to ``new`` positions and ``gather`` rows
        (None: dynamic shapes)."""
        return StaticShapes(new=new, gather=gather) if self.cuda_graphs else None


@dataclass
class SequenceOutput:
    """One generated continuation: new token ids (eos included when it stopped there)."""

    token_ids: list[int]
    num_forward_passes: int
    stopped: str  # "eos" | "length"


@dataclass
class SpecialTokenIds:
    """The token ids a decoder needs."""

    eos: int
    mask: int
    pad: int


def decode_causal(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    special: SpecialTokenIds,
    banned: torch.Tensor,
    sampling_cfg: sampling.SamplingConfig,
    seeds: torch.Tensor,
    cfg: CausalDecodeConfig,
) -> tuple[list[SequenceOutput], int]:
    """Decodes a batch of prompts (lists of >= 1 ids) with a causal model and an exact KV cache.

    banned: bool [V] ids never sampled; seeds: int64 [B] per-sequence sampling seeds.
    Returns (one SequenceOutput per prompt, number of batched forward calls).
    """
    if any(len(p) < 1 for p in prompts):
        raise ValueError("every prompt needs at least one token (the document-boundary token)")
    if cfg.commit_policy == "verify":
        return _decode_verify(model, prompts, max_new_tokens, special, banned, sampling_cfg, seeds, cfg)
    if cfg.window == 1 and cfg.max_steps is None:
        return _decode_ar(model, prompts, max_new_tokens, special, banned, sampling_cfg, seeds, cfg)
    device = next(model.parameters()).device
    num = len(prompts)
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    limit = prompt_len + max_new_tokens
    max_limit = int(limit.max())
    capacity = 2 * max_limit + cfg.window + 2  # room for the right padding of ragged forwards
    # static shapes: a pass reads at most 2K - 1 new positions (K - 1 masks after at most K committed
    # tokens not yet cached) and predicts at most K (the step limit's last pass may need more: its own shape)
    static = cfg.static_shapes(new=2 * cfg.window - 1, gather=cfg.window)
    if static is not None:  # a finished row keeps its length and is padded on like the others
        capacity = max(capacity, max_limit + 2 * cfg.window)
    tokens = torch.full((num, capacity), special.mask, dtype=torch.long, device=device)
    decided = torch.zeros(num, capacity, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        decided[b, : len(p)] = True
    prefix = prompt_len.clone()
    steps = torch.zeros(num, dtype=torch.long, device=device)
    seeds = seeds.to(device)
    rows = torch.arange(num, device=device)  # original index of each active row
    outputs: list[Optional[SequenceOutput]] = [None] * num
    num_calls = 0
    K = cfg.window
    with ModelCache(model, num, capacity, lean=cfg.lean, static=static) as cache:
        while rows.numel() > 0:
            lengths = cache.lengths
            uncached = prefix - lengths  # >= 1
            remaining = limit - prefix  # >= 1
            if cfg.max_steps is None:
                forced = torch.zeros_like(steps, dtype=torch.bool)
            else:  # the last allowed pass commits everything left
                forced = steps + 1 == cfg.max_steps
            width = torch.where(forced, remaining, remaining.clamp(max=K))  # window positions decided now
            num_in = uncached + width - 1
            S = int(num_in.max())
            G = int(width.max())
            offs = torch.arange(S, device=device)
            src = (lengths[:, None] + offs[None, :]).clamp(max=capacity - 1)
            ids = tokens.gather(1, src).masked_fill(offs[None, :] >= num_in[:, None], special.pad)
            win = torch.arange(G, device=device)
            in_window = win[None, :] < width[:, None]  # [A, G]
            out_index = (uncached[:, None] - 1 + win[None, :]).clamp(max=S - 1)
            logits = cache.forward(ids, gather=out_index)  # [A, G, V]
            num_calls += 1
            scaled, confidence = sampling.scaled_logits(logits, banned, sampling_cfg, confidence=K > 1)  # [A, G, V]
            if confidence is None:  # AR: the one window position always commits
                confidence = torch.ones(scaled.shape[:2], dtype=scaled.dtype, device=device)
            position = prefix[:, None] + win[None, :]  # absolute positions of the window
            pos_c = position.clamp(max=capacity - 1)
            undecided = ~decided.gather(1, pos_c) & in_window
            confident = (confidence > cfg.threshold) | (win[None, :] == 0)
            if cfg.commit_policy == "prefix":
                confident = torch.cumprod(confident.long(), dim=1).bool()
            commit = undecided & (confident | forced[:, None])
            # draw only where a token is committed (the decision reads the confidence, never the draw)
            if sampling_cfg.is_greedy:  # argmax: no uniforms to compute
                u = torch.zeros(position.shape, dtype=torch.float64, device=device)
            else:
                u = noise.uniform(seeds, sampling.TOKEN_STREAM + position)
            drawn = torch.zeros_like(position)
            drawn[commit] = sampling.draw_from_logits(scaled[commit], u[commit], sampling_cfg)
            tokens.scatter_(1, pos_c, torch.where(commit, drawn, tokens.gather(1, pos_c)))
            decided.scatter_(1, pos_c, decided.gather(1, pos_c) | commit)
            cache.advance(uncached)  # positions < prefix now hold clean KV
            run = torch.cumprod((decided.gather(1, pos_c) & in_window).long(), dim=1).sum(1)
            old_prefix, prefix = prefix, prefix + run
            steps += 1
            span = torch.arange(int(run.max()), device=device)
            new_pos = (old_prefix[:, None] + span[None, :]).clamp(max=capacity - 1)
            new_eos = (tokens.gather(1, new_pos) == special.eos) & (span[None, :] < run[:, None])
            finished = new_eos.any(1) | (prefix >= limit)
            if bool(finished.any()):
                _record_finished(
                    finished, tokens, prompt_len, prefix, steps, rows, outputs, special.eos, max_new_tokens
                )
                keep = torch.nonzero(~finished).flatten()
                cache.select(keep)
                state = (rows, tokens, decided, prefix, steps, seeds)
                rows, tokens, decided, prefix, steps, seeds = (t[keep] for t in state)
                prompt_len, limit = prompt_len[keep], limit[keep]
    assert all(o is not None for o in outputs)
    return outputs, num_calls


def _record_finished(finished, tokens, prompt_len, prefix, steps, rows, outputs, eos: int, max_new_tokens: int) -> None:
    """Writes the SequenceOutput of every finished row (bool [A]) into ``outputs`` (by original index)."""
    for a in torch.nonzero(finished).flatten().tolist():
        start, end = int(prompt_len[a]), int(prefix[a])
        gen = tokens[a, start:end].tolist()
        stopped = "length"
        if eos in gen:
            gen = gen[: gen.index(eos) + 1]
            stopped = "eos"
        else:
            gen = gen[:max_new_tokens]
        outputs[int(rows[a])] = SequenceOutput(gen, int(steps[a]), stopped)


def _decode_verify(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    special: SpecialTokenIds,
    banned: torch.Tensor,
    sampling_cfg: sampling.SamplingConfig,
    seeds: torch.Tensor,
    cfg: CausalDecodeConfig,
) -> tuple[list[SequenceOutput], int]:
    """:func:`decode_causal` with ``commit_policy="verify"``: drafts verified by the next pass
    (``inference/verify.py`` states the rule and why the output equals AR decoding's)."""
    device = next(model.parameters()).device
    num = len(prompts)
    K = cfg.window
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    limit = prompt_len + max_new_tokens
    max_limit = int(limit.max())
    capacity = max_limit + 2 * K  # + room for the drafts, masks and right padding of one pass
    tokens = torch.full((num, capacity), special.pad, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    prefix = prompt_len.clone()
    steps = torch.zeros(num, dtype=torch.long, device=device)
    seeds = seeds.to(device)
    rows = torch.arange(num, device=device)
    drafts = torch.zeros(num, K - 1, dtype=torch.long, device=device)
    draft_q = None
    num_drafts = torch.zeros(num, dtype=torch.long, device=device)
    outputs: list[Optional[SequenceOutput]] = [None] * num
    num_calls = 0
    # static shapes: after the first pass a pass reads 1 + D + M <= 2K - 1 new positions, all window rows
    static = cfg.static_shapes(new=2 * K - 1, gather=2 * K - 1)
    with ModelCache(model, num, capacity, lean=cfg.lean, static=static) as cache:
        while rows.numel() > 0:
            lengths = cache.lengths
            uncached = prefix - lengths  # >= 1
            remaining = limit - prefix  # >= 1
            num_drafts = torch.minimum(num_drafts, remaining - 1)
            width = torch.minimum(num_drafts + K, remaining)  # window rows: D verifying + 1 + new drafts
            num_in = uncached + width - 1
            S = int(num_in.max())
            G = int(width.max())
            offs = torch.arange(S, device=device)
            src = (lengths[:, None] + offs[None, :]).clamp(max=capacity - 1)
            ids = tokens.gather(1, src)
            rel = offs[None, :] - uncached[:, None]  # index into the window inputs (drafts, then masks)
            ids = torch.where(rel >= 0, special.mask, ids)
            if K > 1:
                draft_ids = drafts.gather(1, rel.clamp(min=0, max=K - 2))
                ids = torch.where((rel >= 0) & (rel < num_drafts[:, None]), draft_ids, ids)
            ids = ids.masked_fill(offs[None, :] >= num_in[:, None], special.pad)
            out_index = (uncached[:, None] - 1 + torch.arange(G, device=device)[None, :]).clamp(max=S - 1)
            logits = cache.forward(ids, gather=out_index)  # [A, G, V]
            num_calls += 1
            scaled, _ = sampling.scaled_logits(logits, banned, sampling_cfg, confidence=False)
            committed, accepted, drafts, num_drafts, draft_q = verify.verify_pass(
                scaled, drafts, draft_q, num_drafts, width, prefix, steps, seeds, sampling_cfg
            )
            span = torch.arange(G, device=device)
            new_pos = (prefix[:, None] + span[None, :]).clamp(max=capacity - 1)
            is_new = span[None, :] <= accepted[:, None]
            tokens.scatter_(1, new_pos, torch.where(is_new, committed, tokens.gather(1, new_pos)))
            cache.advance(uncached + accepted)  # committed inputs only: never a rejected draft or a mask
            prefix = prefix + accepted + 1
            steps += 1
            new_eos = ((committed == special.eos) & is_new).any(1)
            finished = new_eos | (prefix >= limit)
            if bool(finished.any()):
                _record_finished(
                    finished, tokens, prompt_len, prefix, steps, rows, outputs, special.eos, max_new_tokens
                )
                keep = torch.nonzero(~finished).flatten()
                cache.select(keep)
                rows, tokens, prefix, steps, seeds = rows[keep], tokens[keep], prefix[keep], steps[keep], seeds[keep]
                drafts, num_drafts, prompt_len, limit = drafts[keep], num_drafts[keep], prompt_len[keep], limit[keep]
                draft_q = None if draft_q is None else draft_q[keep]
    assert all(o is not None for o in outputs)
    return outputs, num_calls


def _decode_ar(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    special: SpecialTokenIds,
    banned: torch.Tensor,
    sampling_cfg: sampling.SamplingConfig,
    seeds: torch.Tensor,
    cfg: CausalDecodeConfig,
) -> tuple[list[SequenceOutput], int]:
    """:func:`decode_causal` with K = 1 (AR), without the window bookkeeping: the first pass reads
    the prompts (right padded) and predicts from each one's last token, every later pass reads the
    token just committed. The same passes, positions and uniforms as the general loop (tested)."""
    device = next(model.parameters()).device
    num = len(prompts)
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    limit = prompt_len + max_new_tokens
    capacity = int(limit.max()) + 1
    tokens = torch.full((num, capacity), special.pad, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    prefix = prompt_len.clone()
    steps = torch.zeros(num, dtype=torch.long, device=device)
    seeds = seeds.to(device)
    rows = torch.arange(num, device=device)
    outputs: list[Optional[SequenceOutput]] = [None] * num
    ids = tokens[:, : int(prompt_len.max())]
    gather = (prompt_len - 1)[:, None]
    uncached = prompt_len
    num_calls = 0
    with ModelCache(model, num, capacity, lean=cfg.lean, static=cfg.static_shapes(new=1, gather=1)) as cache:
        while rows.numel() > 0:
            logits = cache.forward(ids, gather=gather)[:, 0]  # [A, V]
            num_calls += 1
            scaled, _ = sampling.scaled_logits(logits, banned, sampling_cfg, confidence=False)
            if sampling_cfg.is_greedy:
                token = scaled.argmax(dim=-1)
            else:
                u = noise.uniform(seeds, (sampling.TOKEN_STREAM + prefix)[:, None])[:, 0]
                token = sampling.draw_from_logits(scaled, u, sampling_cfg)
            tokens[torch.arange(rows.numel(), device=device), prefix] = token
            cache.advance(uncached)
            prefix = prefix + 1
            steps += 1
            finished = (token == special.eos) | (prefix >= limit)
            ids = token[:, None]
            if bool(finished.any()):
                _record_finished(
                    finished, tokens, prompt_len, prefix, steps, rows, outputs, special.eos, max_new_tokens
                )
                keep = torch.nonzero(~finished).flatten()
                cache.select(keep)
                rows, tokens, prefix, steps, seeds = rows[keep], tokens[keep], prefix[keep], steps[keep], seeds[keep]
                prompt_len, limit, ids = prompt_len[keep], limit[keep], ids[keep]
            gather = torch.zeros(rows.numel(), 1, dtype=torch.long, device=device)
            uncached = torch.ones(rows.numel(), dtype=torch.long, device=device)
    assert all(o is not None for o in outputs)
    return outputs, num_calls
