"""What a CARD model learns behind masks: per-corruption metrics and the mask probe.

Two measurements, both sums over tensors (no ``torch.distributed`` here: the trainer
reduces the sums over ranks and turns them into ratios with :func:`ratios`).

* **Per-corruption metrics.** Each prediction of a corrupted training (or validation)
  pass is grouped by how many of the last :data:`CONTEXT_WINDOW` input positions before
  its target hold ``[MASK]`` (the prediction at input position j targets position j+1,
  and reads inputs j-3..j): groups ``0, 1, 2, 3+``. Per group: count, summed NLL and
  top-1 correct. The clean group is what an ARM sees; the others show how much the
  model can still say with masks right before the target.
* **The mask probe** measures what the parallel decoder relies on. Each sample is cut
  at a position n; the input is the clean prefix ``x_0..x_{n-1}`` followed by K-1
  ``[MASK]`` (positions n..n+K-2). Because attention is causal, the output at n-1+k
  predicts position n+k having seen exactly the clean prefix and k masks, so one
  forward pass measures k = 0..K-1 at once. Per k: count, top-1 correct, and how often the
  top-1 probability exceeds each of :data:`PROBE_THRESHOLDS` (what commits a token at that
  tau; ``probe_conf_k{k}`` is the one at :data:`CONFIDENT` = 0.9). ``logging.probe_min_prefix``
  keeps cuts at least that far into the sequence (a prompt's length: what decoding sees), and
  ``logging.probe_cuts`` probes each validation sample at that many cuts (one pass each), so
  the probe's count is validation samples x cuts per k.
"""

from __future__ import annotations

import math

import torch

from card_megatron import noise

CONTEXT_WINDOW = 4  # input positions j-3..j read by the prediction of position j+1
CONTEXT_GROUPS = ("0", "1", "2", "3+")
CONFIDENT = 0.9  # top-1 probability counted as confident by probe_conf_k{k}
# Every tau the study's decoding sweeps use (and a few more): the probe counts top-1 > tau for each.
PROBE_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# Cut c of C of sample k: n = P + floor(frac(0.5 + (k * C + c + PROBE_OFFSET) * golden) * (L - K + 2 - P)),
# P the minimum prefix: a low-discrepancy spread of cuts that is a pure function of the sample id
# (C = 1, P = 1 is the original single cut).
PROBE_OFFSET = 7919


def context_groups(is_masked: torch.Tensor) -> torch.Tensor:
    """Group of each prediction: int64 [B, L] in 0..3, the number of [MASK] among input
    positions max(0, j-3)..j, capped at 3. is_masked bool [B, L] (input positions)."""
    m = is_masked.to(torch.int64)
    count = torch.cumsum(m, dim=1)
    shifted = torch.nn.functional.pad(count, (CONTEXT_WINDOW, 0))[:, : count.shape[1]]
    return (count - shifted).clamp(max=len(CONTEXT_GROUPS) - 1)


def context_sums(nll: torch.Tensor, top1_logprob: torch.Tensor, is_masked: torch.Tensor) -> torch.Tensor:
    """Per-group sums: float64 [4, 3] = (count, summed NLL, top-1 correct) per context group.

    nll, top1_logprob float [B, L] (the log-probability of the model's top-1 token);
    a prediction is correct when its target is (one of) the most probable tokens.
    """
    groups = context_groups(is_masked).reshape(-1)
    nll = nll.detach().double().reshape(-1)
    correct = _is_top1(nll, top1_logprob.detach().double().reshape(-1))
    out = torch.zeros(len(CONTEXT_GROUPS), 3, dtype=torch.float64, device=nll.device)
    out[:, 0].index_add_(0, groups, torch.ones_like(nll))
    out[:, 1].index_add_(0, groups, nll)
    out[:, 2].index_add_(0, groups, correct)
    return out


def context_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """``{prefix}ctx{g}_nll`` and ``{prefix}ctx{g}_acc`` per group (None where a group is empty)."""
    out: dict[str, float] = {}
    for g, name in enumerate(CONTEXT_GROUPS):
        count, nll, correct = (float(v) for v in sums[g])
        tag = name.replace("+", "plus")
        out[f"{prefix}ctx{tag}_nll"] = nll / count if count else None
        out[f"{prefix}ctx{tag}_acc"] = correct / count if count else None
    return out


def probe_cuts(
    sample_ids: torch.Tensor, seq_length: int, window: int, cut: int = 0, num_cuts: int = 1, min_prefix: int = 1
) -> torch.Tensor:
    """Cut n of each sample (its ``cut``-th of ``num_cuts``): int64 [B] in [min_prefix, L - K + 1]
    (so n + K - 1 <= L), from its id."""
    if not 1 <= window <= seq_length:
        raise ValueError(f"probe window ({window}) must lie in [1, seq_length={seq_length}]")
    if not 1 <= min_prefix <= seq_length - window + 1:
        raise ValueError(
            f"probe min prefix ({min_prefix}) must lie in [1, seq_length - window + 1 = {seq_length - window + 1}]"
        )
    if not 0 <= cut < num_cuts:
        raise ValueError(f"probe cut ({cut}) must lie in [0, {num_cuts})")
    u = noise.weyl_uniform(sample_ids * num_cuts + cut + PROBE_OFFSET)
    return min_prefix + torch.floor(u * (seq_length - window + 2 - min_prefix)).to(torch.int64)


def probe_batch(
    tokens: torch.Tensor,
    sample_ids: torch.Tensor,
    window: int,
    mask_id: int,
    cut: int = 0,
    num_cuts: int = 1,
    min_prefix: int = 1,
):
    """The probe's causal pass over tokens [B, L+1] at cut ``cut`` of ``num_cuts`` (:func:`probe_cuts`).

    Returns (input_ids [B, L], position_ids [B, L], targets [B, L], gather [B, K]):
    inputs are the clean tokens with positions n..n+K-2 set to [MASK]; ``gather[b, k]``
    = n-1+k is the output position that predicts position n+k (targets are the usual
    shifted tokens, so ``targets[b, gather[b, k]] = x[n+k]``).
    """
    B, L = tokens.shape[0], tokens.shape[1] - 1
    cuts = probe_cuts(sample_ids.to(tokens.device), L, window, cut, num_cuts, min_prefix)
    pos = torch.arange(L, device=tokens.device)
    masked = (pos[None, :] >= cuts[:, None]) & (pos[None, :] < (cuts + window - 1)[:, None])
    input_ids = tokens[:, :-1].masked_fill(masked, mask_id)
    gather = cuts[:, None] - 1 + torch.arange(window, device=tokens.device)[None, :]
    return input_ids, pos.expand(B, L), tokens[:, 1:], gather


def probe_sums(nll: torch.Tensor, top1_logprob: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """Per k: float64 [K, 2 + len(PROBE_THRESHOLDS)] = (count, top-1 correct, then for each tau of
    :data:`PROBE_THRESHOLDS` the number with top-1 probability > tau).

    nll, top1_logprob float [B, L] from the probe pass; gather int64 [B, K] from
    :func:`probe_batch`.
    """
    nll_k = nll.detach().double().gather(1, gather)
    lp_k = top1_logprob.detach().double().gather(1, gather)
    out = torch.zeros(gather.shape[1], 2 + len(PROBE_THRESHOLDS), dtype=torch.float64, device=nll.device)
    out[:, 0] = gather.shape[0]
    out[:, 1] = _is_top1(nll_k, lp_k).sum(0)
    for i, tau in enumerate(PROBE_THRESHOLDS):
        out[:, 2 + i] = (lp_k > math.log(tau)).double().sum(0)
    return out


def probe_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Fractions of the probed predictions per k: ``probe_acc_k{k}``, ``probe_conf_k{k}`` (top-1
    probability > 0.9), ``probe_conf{tau}_k{k}`` for each tau of :data:`PROBE_THRESHOLDS`, and
    ``probe_n_k{k}`` (the count)."""
    out: dict[str, float] = {}
    for k in range(sums.shape[0]):
        count = float(sums[k, 0])
        out[f"probe_n_k{k}"] = count
        out[f"probe_acc_k{k}"] = float(sums[k, 1]) / count if count else None
        for i, tau in enumerate(PROBE_THRESHOLDS):
            out[f"probe_conf{tau:g}_k{k}"] = float(sums[k, 2 + i]) / count if count else None
        out[f"probe_conf_k{k}"] = out[f"probe_conf{CONFIDENT:g}_k{k}"]
    return out


def _is_top1(nll: torch.Tensor, top1_logprob: torch.Tensor) -> torch.Tensor:
    # the target's log-probability -nll equals the top-1 log-probability up to rounding
    return (-nll >= top1_logprob - 1e-5).double()
