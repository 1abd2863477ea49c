"""Lossless CARD decoding (``--commit-policy verify``): the model drafts at [MASK] positions and
verifies its drafts in the next pass, so the output is exactly what AR decoding gives.

State of one sequence: committed tokens ``x_0 .. x_{n-1}``, the exact KV of positions
``< lengths[b]`` (``lengths[b] <= n - 1``) and D drafts ``d_n .. d_{n+D-1}`` (D = 0 at the
start and after a rejection). One forward pass reads

    [x_lengths .. x_{n-1}]  committed, not yet cached (at least x_{n-1})
    [d_n .. d_{n+D-1}]      the drafts of the previous pass
    [M x [MASK]]            at positions n+D .. n+D+M-1, M = K - 1 (fewer near the length limit)

and, with the shift of CARD's objective, window row g (the output at position n-1+g)
predicts position n+g:

* rows 0 .. D read only committed tokens and drafts, all clean inputs under a causal mask,
  so they are the AR model's predictions *given the drafts*: row g verifies d_{n+g}, and
  row D, which follows the last draft, is the AR prediction of position n+D;
* rows D+1 .. D+M read [MASK]s: they are the drafts of positions n+D+1 .. n+D+M for the
  next pass (CARD's parallel predictions, whatever their confidence).

Greedy: the longest run of drafts equal to the argmax of their verifying row is accepted,
then the argmax of the next row is committed (the correction, or after all D drafts the
bonus). Every committed token is then the argmax of an exact AR prediction given exactly
the committed tokens before it, so the output is greedy AR decoding's, token for token.

Sampling: the speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) with p
the verifying and q the drafting distribution (both after temperature, top-k and top-p):
draft d is accepted when u < p(d) / q(d), u uniform; at the first rejection the token is
drawn from max(0, p - q) renormalised; after D accepted drafts the bonus is drawn from p.
Each committed token is then distributed exactly as AR sampling's given the tokens before
it, so the output *distribution* equals AR sampling's (the samples themselves differ: the
uniforms are used differently; ``tests/test_verify.py`` checks the distribution).

After a pass with a accepted drafts the cache keeps ``x .. d_{n+a-1}``: their inputs and all
inputs before them were committed tokens, so their KV is exact; the KV of rejected drafts
and of [MASK]s is never kept (it is overwritten by the next pass). Drafts of the next pass
are kept only when all D drafts were accepted (otherwise they were computed after a
rejected token). Tokens per forward pass = accepted drafts + 1 <= K.

Uniforms (``noise.uniform``, counter streams of ``sampling``): the committed token at a
position uses ``TOKEN_STREAM + position`` (a pass without drafts therefore commits what
AR commits), the accept test ``ACCEPT_STREAM + position`` (a position is tested at most
once) and a draft ``DRAFT_STREAM + step * STEP_STRIDE + position`` (a position may be
drafted again after a rejection; each draft gets a fresh uniform).
"""

from __future__ import annotations

import torch

from card_megatron import noise
from card_megatron.inference import sampling


def verify_pass(
    scaled: torch.Tensor,
    drafts: torch.Tensor,
    draft_q: torch.Tensor | None,
    num_drafts: torch.Tensor,
    width: torch.Tensor,
    prefix: torch.Tensor,
    steps: torch.Tensor,
    seeds: torch.Tensor,
    cfg: sampling.SamplingConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The decisions of one verify pass for A sequences, from its window rows.

    scaled: float64 [A, G, V] (``sampling.scaled_logits``; row g predicts position prefix + g);
    drafts int64 [A, K-1] (draft j is for position prefix + j) and, when sampling, their
    distributions draft_q float64 [A, K-1, V]; num_drafts D int64 [A]; width int64 [A]: rows
    in use (D + 1 + new drafts); steps: passes done so far [A]; seeds [A].
    Returns (committed int64 [A, G]: the tokens of positions prefix + g for g <= accepted,
    accepted int64 [A], new drafts int64 [A, K-1], their number int64 [A], their q or None).
    """
    num, rows_g, _ = scaled.shape
    k1 = drafts.shape[1]
    device = scaled.device
    g = torch.arange(rows_g, device=device)
    position = prefix[:, None] + g[None, :]
    is_draft = g[None, :] < num_drafts[:, None]  # rows that verify a draft
    draft_at = torch.zeros(num, rows_g, dtype=torch.long, device=device)
    draft_at[:, : min(k1, rows_g)] = drafts[:, : min(k1, rows_g)]
    greedy = cfg.is_greedy
    if greedy:
        target = scaled.argmax(dim=-1)  # [A, G]
        ok = (draft_at == target) & is_draft
    else:
        p = sampling.sampled_distribution(scaled, cfg)  # [A, G, V]
        q = torch.zeros_like(p[:, :k1]) if draft_q is None else draft_q[:, : min(k1, rows_g)]
        q_rows = torch.zeros_like(p)
        q_rows[:, : q.shape[1]] = q
        p_d = p.gather(2, draft_at[..., None])[..., 0]
        q_d = q_rows.gather(2, draft_at[..., None])[..., 0]
        u_acc = noise.uniform(seeds, sampling.ACCEPT_STREAM + position)
        ok = (u_acc * q_d < p_d) & is_draft  # u < p/q without dividing (q_d > 0 for a drawn draft)
    accepted = torch.cumprod(ok.long(), dim=1).sum(dim=1)  # [A]
    if greedy:
        committed = target
    else:
        # token at position prefix + accepted: the residual after a rejection, else the bonus from p
        at = accepted[:, None]
        u_tok = noise.uniform(seeds, (sampling.TOKEN_STREAM + prefix + accepted)[:, None])[:, 0]
        p_a = p.gather(1, at[:, :, None].expand(-1, -1, p.shape[-1]))[:, 0]  # [A, V]
        q_a = q_rows.gather(1, at[:, :, None].expand(-1, -1, p.shape[-1]))[:, 0]
        rejected = accepted < num_drafts
        residual = (p_a - q_a).clamp(min=0)
        empty = residual.sum(-1) <= 0  # p == q to rounding: the rejection had probability ~0
        residual = torch.where((rejected & ~empty)[:, None], residual, p_a)
        corrected = sampling.inverse_cdf(residual, u_tok)
        scaled_a = scaled.gather(1, at[:, :, None].expand(-1, -1, scaled.shape[-1]))[:, 0]
        bonus = sampling.draw_from_logits(scaled_a, u_tok, cfg)  # AR's own draw
        last = torch.where(rejected, corrected, bonus)
        committed = torch.where(g[None, :] < at, draft_at, last[:, None])
    # new drafts: rows D+1 .. width-1 (kept only when every draft was accepted)
    new_count = torch.where(accepted == num_drafts, width - num_drafts - 1, torch.zeros_like(accepted))
    j = torch.arange(k1, device=device)
    src = (num_drafts[:, None] + 1 + j[None, :]).clamp(max=rows_g - 1)
    rows_new = scaled.gather(1, src[:, :, None].expand(-1, -1, scaled.shape[-1]))  # [A, K-1, V]
    if greedy:
        new_drafts, new_q = rows_new.argmax(dim=-1), None
    else:
        new_q = sampling.sampled_distribution(rows_new, cfg)
        draft_pos = prefix[:, None] + num_drafts[:, None] + 1 + j[None, :]
        u_draft = noise.uniform(seeds, sampling.DRAFT_STREAM + steps[:, None] * sampling.STEP_STRIDE + draft_pos)
        new_drafts = sampling.inverse_cdf(new_q, u_draft)
    return committed, accepted, new_drafts, new_count, new_q
