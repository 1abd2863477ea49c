"""objectives/: masking, weights, losses and batch construction against the definitions.

Tolerances: fp32 results against float64 or loop references of the same formulas, no training. Measured
gaps: 0 for masks, weights and normalisers (the same operations), at most 4.8e-7 on losses of about 2.6 and
4.3e-8 on values of about 1 (rtol 1e-6 and torch's fp32 default of 1.3e-6 are a few ulps above them).
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

from card_megatron import noise
from card_megatron.config import ObjectiveConfig
from card_megatron.objectives import (
    block_diffusion_attention_mask,
    build_objective,
    context_aware_weights,
    soft_tail_mask,
)

VOCAB = 50
MASK_ID = VOCAB - 1
GOLDEN_FRAC = 0.6180339887498949


def make(name: str, seq_len: int, **overrides):
    cfg = dataclasses.replace(ObjectiveConfig(name=name), **overrides)
    return build_objective(cfg, seq_len, MASK_ID, VOCAB)


def batch(B: int, L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MASK_ID, (B, L + 1), generator=g)
    ids = torch.arange(B, dtype=torch.int64) + 1000 * seed
    return tokens, noise.noise_seeds(1234, 0, ids), ids


def weyl_t(ids, t_eps):
    return t_eps + (1 - t_eps) * np.mod(0.5 + np.asarray(ids, dtype=np.float64) * GOLDEN_FRAC, 1.0)


# ------------------------------------------------------------------ soft tail masking


@pytest.mark.parametrize("tail_factor", [1.0, 1.5, 3.0])
def test_soft_tail_mask_count_and_window(tail_factor):
    L = 37
    t = torch.linspace(0, 1, 301, dtype=torch.float64)
    mask = soft_tail_mask(t, L, tail_factor, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (301, L)
    for row, tv in zip(mask, t.tolist()):
        n = math.floor(tv * L)
        w = min(L, math.floor(tail_factor * n))
        assert int(row.sum()) == n
        assert not row[: L - w].any()


def test_strict_tail_is_solid():
    L = 20
    t = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = soft_tail_mask(t, L, 1.0, generator=torch.Generator().manual_seed(2))
    n = torch.floor(t * L).long()
    expected = torch.arange(L)[None, :] >= (L - n)[:, None]
    assert torch.equal(mask, expected)


def test_wide_window_covers_whole_sequence():
    # lambda * t >= 1: the window is the whole sequence, position 0 included.
    L, draws = 16, 4000
    t = torch.full((draws,), 0.5, dtype=torch.float64)
    mask = soft_tail_mask(t, L, 2.0, generator=torch.Generator().manual_seed(3))
    assert (mask.sum(1) == 8).all()
    freq = mask.double().mean(0)
    p = 8 / 16
    assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / draws)


def test_soft_tail_mask_marginals_match_definition():
    L, draws, t, lam = 40, 20000, 0.3, 1.5
    n = math.floor(t * L)  # 12
    w = min(L, math.floor(lam * n))  # 18
    mask = soft_tail_mask(torch.full((draws,), t), L, lam, generator=torch.Generator().manual_seed(4))
    counts = mask.sum(0).double()
    p = n / w
    assert (counts[: L - w] == 0).all()
    inside = counts[L - w :]
    expected = draws * p
    chi2 = float(((inside - expected) ** 2 / (expected * (1 - p))).sum())
    assert chi2 < w + 6 * math.sqrt(2 * w)  # chi-square with ~w dof, loose tail bound
    # Pairwise: two window positions are masked together with prob N(N-1)/(W(W-1)).
    both = (mask[:, L - 1] & mask[:, L - w]).double().mean()
    p2 = n * (n - 1) / (w * (w - 1))
    assert abs(float(both) - p2) < 5 * math.sqrt(p2 * (1 - p2) / draws)


def test_soft_tail_mask_uses_given_keys():
    keys = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.2, 0.8]], dtype=torch.float64)
    # N = 2, W = 3 (last three: keys 0.3, 0.2, 0.8) -> positions 3 and 4.
    mask = soft_tail_mask(torch.tensor([2 / 6 + 1e-9]), 6, 1.5, keys=keys)
    assert mask.tolist() == [[False, False, False, True, True, False]]
    with pytest.raises(ValueError):
        soft_tail_mask(torch.tensor([0.5]), 6, 0.5)


# ------------------------------------------------------------------ context-aware weights


def reference_weights(m: np.ndarray, p: float, beta: float) -> np.ndarray:
    B, L = m.shape
    w = np.zeros((B, L))
    for b in range(B):
        c = [m[b, i] * (1 + (m[b, i - 1] if i > 0 else 0)) for i in range(L)]
        for j in range(L):
            s = sum(c[i] * (1 - p) ** (j - i) for i in range(j + 1))
            w[b, j] = 1.0 / (beta + s)
    return w


@pytest.mark.parametrize("p,beta", [(0.5, 1.0), (0.0, 1.0), (1.0, 2.0), (0.1, 0.5), (0.93, 1.0), (1e-4, 3.0)])
def test_context_aware_weights_match_quadratic_reference(p, beta):
    rng = np.random.default_rng(5)
    m = rng.random((6, 70)) < rng.random((6, 1))
    got = context_aware_weights(torch.from_numpy(m), p, beta)
    assert got.dtype == torch.float32 and not got.requires_grad
    np.testing.assert_allclose(got.numpy(), reference_weights(m.astype(np.float64), p, beta), rtol=2e-6, atol=1e-7)


def test_context_aware_weights_hand_example():
    m = torch.tensor([[False, True, True, False, True]])
    # C = [0, 1, 2, 0, 1]; S = [0, 1, 2.5, 1.25, 1.625]
    want = torch.tensor([[1.0, 1 / 2, 1 / 3.5, 1 / 2.25, 1 / 2.625]])
    torch.testing.assert_close(context_aware_weights(m, 0.5, 1.0), want)


# ------------------------------------------------------------------ CARD


def test_card_at_t0_is_exactly_arm():
    L = 24
    tokens, seeds, ids = batch(5, L)
    card, arm = make("card", L), make("arm", L)
    cm, cl = card.prepare(tokens, seeds, ids, t=torch.zeros(5))
    am, al = arm.prepare(tokens, seeds, ids)
    assert torch.equal(cm.input_ids, am.input_ids) and torch.equal(cl.targets, al.targets)
    nll = torch.rand(5, L, generator=torch.Generator().manual_seed(6)) * 5
    card_loss, _ = card.loss(nll, cl)
    arm_loss, _ = arm.loss(nll, al)
    assert torch.equal(card_loss, arm_loss)
    assert torch.equal(arm_loss, nll.sum() / (5 * L))
    # With another beta the weights are a constant 1/beta and cancel (up to rounding).
    card3 = make("card", L, reweight_beta=3.0)
    loss3, _ = card3.loss(nll, card3.prepare(tokens, seeds, ids, t=torch.zeros(5))[1])
    torch.testing.assert_close(loss3, arm_loss)


def test_card_prepare_follows_the_definition():
    L, B = 32, 64
    tokens, seeds, ids = batch(B, L, seed=7)
    card = make("card", L)
    mi, li = card.prepare(tokens, seeds, ids)
    assert mi.mask_kind == "causal" and mi.attention_mask is None
    assert torch.equal(mi.position_ids, torch.arange(L).expand(B, L))
    assert torch.equal(li.targets, tokens[:, 1:])
    masked = li.is_masked
    assert torch.equal(mi.input_ids, torch.where(masked, MASK_ID, tokens[:, :-1]))
    # t is the Weyl sequence over the sample id (low_discrepancy, t in [0, 1)).
    t = weyl_t(ids.numpy(), 0.0)
    assert masked.sum(1).tolist() == [math.floor(v * L) for v in t]
    # The window: nothing masked before L - floor(1.5 N).
    for row, v in zip(masked, t):
        n = math.floor(v * L)
        assert not row[: L - min(L, math.floor(1.5 * n))].any()
    torch.testing.assert_close(li.weights, context_aware_weights(masked, 0.5, 1.0))
    torch.testing.assert_close(li.normaliser, li.weights.sum())
    assert li.suppress_mask_logit is False
    nll = torch.rand(B, L, requires_grad=True)
    loss, metrics = card.loss(nll, li)
    torch.testing.assert_close(loss, (li.weights * nll).sum() / li.weights.sum())
    assert float(metrics["token_utilisation"]) == 1.0
    torch.testing.assert_close(metrics["mask_ratio"], masked.float().mean())
    loss.backward()
    torch.testing.assert_close(nll.grad, li.weights / li.weights.sum())


def test_card_options():
    L, B = 32, 16
    tokens, seeds, ids = batch(B, L, seed=8)
    t = torch.full((B,), 0.25)
    li = make("card", L, normaliser="tokens").prepare(tokens, seeds, ids, t=t)[1]
    assert float(li.normaliser) == B * L
    li = make("card", L, reweighting="none").prepare(tokens, seeds, ids, t=t)[1]
    assert torch.equal(li.weights, torch.ones(B, L))
    # Uniform masking: exactly N masked, anywhere in the sequence.
    li = make("card", L, masking="uniform").prepare(tokens, seeds, ids, t=t)[1]
    assert (li.is_masked.sum(1) == 8).all() and li.is_masked[:, : L - 8].any()
    # Non-low-discrepancy t comes from uniform(seed, counter 0).
    li = make("card", L, low_discrepancy=False).prepare(tokens, seeds, ids)[1]
    t_ref = noise.uniform(seeds, torch.tensor([0]))[:, 0]
    assert li.is_masked.sum(1).tolist() == torch.floor(t_ref * L).long().tolist()


def test_strict_tail_fraction_against_a_per_sample_reference():
    """objective.strict_tail_fraction: a sample gets a strict tail (lambda = 1) when the NumPy
    SplitMix64 reference of uniform(seed, VARIANT_STREAM) is below the fraction, else lambda 1.5;
    each row equals soft_tail_mask of that one sample with its own lambda and keys."""
    from card_megatron.data.index import noise_seeds_np, splitmix64_np

    L, B, f = 32, 400, 0.3
    ids = np.arange(B, dtype=np.uint64) + 5000
    seeds = torch.from_numpy(noise_seeds_np(1234, 0, ids).view(np.int64))
    tokens = torch.randint(0, MASK_ID, (B, L + 1), generator=torch.Generator().manual_seed(0))
    card = make("card", L, strict_tail_fraction=f)
    li = card.prepare(tokens, seeds, torch.from_numpy(ids.astype(np.int64)))[1]
    u = (splitmix64_np(seeds.numpy().view(np.uint64) ^ splitmix64_np(np.uint64(4 << 32))) >> np.uint64(11)) * 2.0**-53
    strict = u < f
    assert 0.24 < strict.mean() < 0.36  # the fraction, within sampling noise of 400 draws
    t = torch.from_numpy(weyl_t(ids.astype(np.float64), 0.0))
    keys = card.position_keys(seeds, L, None)
    for b in range(B):
        ref = soft_tail_mask(t[b : b + 1], L, 1.0 if strict[b] else 1.5, keys=keys[b : b + 1])[0]
        assert torch.equal(li.is_masked[b], ref), b
        n = int(ref.sum())
        if strict[b]:  # a solid run of masks at the end, as the decoder feeds it
            assert ref[L - n :].all()
    # fraction 0 is exactly the soft tail; fraction 1 exactly the strict tail
    base = make("card", L).prepare(tokens, seeds, torch.from_numpy(ids.astype(np.int64)))[1]
    none = make("card", L, strict_tail_fraction=0.0).prepare(tokens, seeds, torch.from_numpy(ids.astype(np.int64)))[1]
    assert torch.equal(base.is_masked, none.is_masked)
    all_strict = make("card", L, strict_tail_fraction=1.0).prepare(
        tokens, seeds, torch.from_numpy(ids.astype(np.int64))
    )
    strict_tail = make("card", L, tail_factor=1.0).prepare(tokens, seeds, torch.from_numpy(ids.astype(np.int64)))
    assert torch.equal(all_strict[0].input_ids, strict_tail[0].input_ids)


def test_strict_tail_fraction_does_not_depend_on_the_batch_split():
    """The same samples corrupted as one batch of 12 or as batches of 5 and 7 in another order."""
    L = 24
    tokens, seeds, ids = batch(12, L, seed=4)
    card = make("card", L, strict_tail_fraction=0.5)
    whole = card.prepare(tokens, seeds, ids)
    order = torch.tensor([7, 2, 11, 0, 5, 3, 9, 1, 10, 4, 8, 6])
    parts = [card.prepare(tokens[i], seeds[i], ids[i]) for i in (order[:5], order[5:])]
    for (mi, li), idx in zip(parts, (order[:5], order[5:])):
        assert torch.equal(mi.input_ids, whole[0].input_ids[idx])
        assert torch.equal(li.weights, whole[1].weights[idx])
    assert 0 < int(card.strict_tail_samples(seeds).sum()) < 12  # both kinds occur in this batch
    with pytest.raises(ValueError, match="strict_tail_fraction .* applies to CARD only"):
        make("mdlm", L, strict_tail_fraction=0.5)


def test_card_eval_is_one_clean_pass():
    L = 16
    tokens, seeds, ids = batch(4, L)
    card, arm = make("card", L), make("arm", L)
    passes = card.eval_passes(tokens, seeds, ids)
    assert len(passes) == 1 and not card.is_bound
    mi, li = passes[0]
    am, al = arm.eval_passes(tokens, seeds, ids)[0]
    assert torch.equal(mi.input_ids, tokens[:, :-1]) and torch.equal(mi.input_ids, am.input_ids)
    nll = torch.rand(4, L)
    total, count = card.nll_terms(nll, li)
    assert float(count) == 4 * L
    torch.testing.assert_close(total, nll.double().sum())


# ------------------------------------------------------------------ MDLM


def test_mdlm_batch_and_loss():
    L, B = 32, 8
    tokens, seeds, ids = batch(B, L, seed=9)
    mdlm = make("mdlm", L)
    assert mdlm.mask_kind == "full" and mdlm.is_bound
    t = torch.linspace(0.1, 0.9, B)
    mi, li = mdlm.prepare(tokens, seeds, ids, t=t)
    masked = li.is_masked
    assert torch.equal(mi.input_ids, torch.where(masked, MASK_ID, tokens[:, :L]))
    assert torch.equal(li.targets, tokens[:, :L]) and li.suppress_mask_logit
    assert float(li.normaliser) == B * L
    # Weight 1/t on masked positions, 0 elsewhere.
    want = torch.where(masked, 1.0 / t[:, None], torch.zeros(()))
    torch.testing.assert_close(li.weights, want.float())
    # Unmasked positions carry no loss: zero gradient there.
    nll = torch.rand(B, L, requires_grad=True)
    loss, metrics = mdlm.loss(nll, li)
    loss.backward()
    assert (nll.grad[~masked] == 0).all()
    torch.testing.assert_close(nll.grad[masked], (1.0 / (t[:, None] * B * L)).expand(B, L)[masked])
    torch.testing.assert_close(metrics["token_utilisation"], masked.float().mean())
    # Same keys, larger t: a superset of the masks (keys < t).
    li2 = mdlm.prepare(tokens, seeds, ids, t=t + 0.1)[1]
    assert (li2.is_masked | ~masked).all()


def test_mdlm_fully_masked_elbo_is_mean_nll():
    L, B = 16, 4
    tokens, seeds, ids = batch(B, L)
    mdlm = make("mdlm", L)
    mi, li = mdlm.prepare(tokens, seeds, ids, t=torch.ones(B))
    assert (mi.input_ids == MASK_ID).all()
    nll = torch.rand(B, L)
    loss, _ = mdlm.loss(nll, li)
    torch.testing.assert_close(loss, nll.mean())
    total, count = mdlm.nll_terms(nll, li)
    torch.testing.assert_close(total / count, nll.double().mean())


def test_mdlm_t_draws():
    L, B = 64, 32
    tokens, seeds, ids = batch(B, L, seed=10)
    for low_discrepancy in (True, False):
        mdlm = make("mdlm", L, low_discrepancy=low_discrepancy, t_eps=1e-3)
        li = mdlm.prepare(tokens, seeds, ids)[1]
        if low_discrepancy:
            t_ref = torch.from_numpy(weyl_t(ids.numpy(), 1e-3))
        else:
            t_ref = 1e-3 + (1 - 1e-3) * noise.uniform(seeds, torch.tensor([0]))[:, 0]
        keys = noise.uniform(seeds, noise.POSITION_STREAM + torch.arange(L))
        assert torch.equal(li.is_masked, keys < t_ref[:, None])
        inv = li.weights.double().amax(1)
        has = li.is_masked.any(1)
        torch.testing.assert_close(1.0 / inv[has], t_ref[has], rtol=1e-6, atol=0)


def test_mdlm_eval_passes_are_stratified_elbo_passes():
    L, B, K = 32, 6, 4
    tokens, seeds, ids = batch(B, L)
    mdlm = make("mdlm", L, eval_t_samples=K, t_eps=0.01)
    passes = mdlm.eval_passes(tokens, seeds, ids)
    assert len(passes) == K
    u0 = noise.uniform(seeds, torch.tensor([noise.EVAL_OFFSET_STREAM]))[:, 0]
    for k, (_mi, li) in enumerate(passes):
        t = 0.01 + 0.99 * torch.remainder(u0 + k / K, 1.0)
        keys = noise.uniform(noise.derive_seeds(seeds, k), noise.POSITION_STREAM + torch.arange(L))
        assert torch.equal(li.is_masked, keys < t[:, None])
        assert float(li.normaliser) == B * L
    nll = torch.rand(B, L)
    counts = sum(float(mdlm.nll_terms(nll, li)[1]) for _, li in passes)
    assert counts == K * B * L
    assert not torch.equal(passes[0][0].input_ids, passes[1][0].input_ids)


# ------------------------------------------------------------------ BD3LM


def reference_block_mask(L: int, bs: int) -> torch.Tensor:
    mask = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            qn, kn = q < L, k < L
            qb, kb = (q % L) // bs, (k % L) // bs
            if qn and kn:
                mask[q, k] = qb == kb
            elif qn and not kn:
                mask[q, k] = kb < qb
            elif not qn and not kn:
                mask[q, k] = kb <= qb
    return mask


@pytest.mark.parametrize("L,bs", [(8, 1), (8, 2), (8, 4), (8, 8), (12, 3), (12, 4), (16, 16)])
def test_block_mask_matches_enumeration(L, bs):
    assert torch.equal(block_diffusion_attention_mask(L, bs), reference_block_mask(L, bs))


def test_block_mask_rejects_bad_block_size():
    with pytest.raises(ValueError):
        block_diffusion_attention_mask(10, 4)
    with pytest.raises(ValueError):
        make("bd3lm", 10, block_size=4)


def test_bd3lm_batch():
    L, B, bs = 16, 5, 4
    tokens, seeds, ids = batch(B, L, seed=11)
    bd = make("bd3lm", L, block_size=bs)
    assert bd.sequence_length_multiplier == 2 and bd.mask_kind == "block" and bd.is_bound
    mi, li = bd.prepare(tokens, seeds, ids)
    x0 = tokens[:, :L]
    assert mi.input_ids.shape == (B, 2 * L)
    assert torch.equal(mi.input_ids[:, L:], x0)
    noised = li.is_masked[:, :L]
    assert torch.equal(mi.input_ids[:, :L], torch.where(noised, MASK_ID, x0))
    assert not li.is_masked[:, L:].any() and (li.weights[:, L:] == 0).all()
    assert torch.equal(li.targets[:, :L], x0)
    assert torch.equal(mi.position_ids, torch.arange(L).repeat(2).expand(B, 2 * L))
    assert torch.equal(mi.attention_mask, reference_block_mask(L, bs))
    assert float(li.normaliser) == B * L and li.suppress_mask_logit
    # Per-block t: the Weyl sequence over sample_id * num_blocks + b.
    nb = L // bs
    t = torch.from_numpy(weyl_t((ids[:, None] * nb + torch.arange(nb)).numpy(), 1e-3)).repeat_interleave(bs, 1)
    keys = noise.uniform(seeds, noise.POSITION_STREAM + torch.arange(L))
    assert torch.equal(noised, keys < t)
    torch.testing.assert_close(li.weights[:, :L], torch.where(noised, 1.0 / t, 0.0).float())
    nll = torch.rand(B, 2 * L)
    _, metrics = bd.loss(nll, li)
    torch.testing.assert_close(metrics["mask_ratio"], noised.float().mean())


@pytest.mark.parametrize("mode", ["low_discrepancy", "seeded", "generator", "given_t"])
def test_bd3lm_with_one_block_is_mdlm_on_the_noised_half(mode):
    L, B = 16, 6
    tokens, seeds, ids = batch(B, L, seed=12)
    kw = {"low_discrepancy": mode != "seeded"}
    bd, mdlm = make("bd3lm", L, block_size=L, **kw), make("mdlm", L, **kw)
    gen = (lambda: torch.Generator().manual_seed(3)) if mode == "generator" else (lambda: None)
    t = torch.linspace(0.2, 1.0, B) if mode == "given_t" else None
    bm, bl = bd.prepare(tokens, seeds, ids, generator=gen(), t=t)
    mm, ml = mdlm.prepare(tokens, seeds, ids, generator=gen(), t=t)
    assert torch.equal(bm.input_ids[:, :L], mm.input_ids)
    assert torch.equal(bl.weights[:, :L], ml.weights)
    assert torch.equal(bl.targets[:, :L], ml.targets)
    nll = torch.rand(B, 2 * L)
    torch.testing.assert_close(bd.loss(nll, bl)[0], mdlm.loss(nll[:, :L], ml)[0])
    for (_, be), (_, me) in zip(bd.eval_passes(tokens, seeds, ids), mdlm.eval_passes(tokens, seeds, ids)):
        assert torch.equal(be.weights[:, :L], me.weights)


# ------------------------------------------------------------------ seeds and batch layout


@pytest.mark.parametrize("name", ["card", "mdlm", "bd3lm"])
@pytest.mark.parametrize("low_discrepancy", [True, False])
def test_corruption_is_a_function_of_the_sample(name, low_discrepancy):
    L = 16
    obj = make(name, L, low_discrepancy=low_discrepancy)
    tok_a, seeds_a, ids_a = batch(4, L, seed=1)
    tok_b, seeds_b, ids_b = batch(6, L, seed=2)
    # Put sample 0 of batch A at row 3 of batch B.
    tok_b[3], seeds_b[3], ids_b[3] = tok_a[0], seeds_a[0], ids_a[0]
    ma, la = obj.prepare(tok_a, seeds_a, ids_a)
    mb, lb = obj.prepare(tok_b, seeds_b, ids_b)
    assert torch.equal(ma.input_ids[0], mb.input_ids[3])
    assert torch.equal(la.weights[0], lb.weights[3])
    # Same seeds -> same corruption; different seeds -> different corruption.
    assert torch.equal(obj.prepare(tok_a, seeds_a, ids_a)[0].input_ids, ma.input_ids)
    other = obj.prepare(tok_a, seeds_a ^ 0x5555, ids_a + 17)[1]
    assert not torch.equal(other.is_masked, la.is_masked)
    # Evaluation passes too.
    ea, eb = obj.eval_passes(tok_a, seeds_a, ids_a), obj.eval_passes(tok_b, seeds_b, ids_b)
    for (pa, _), (pb, _) in zip(ea, eb):
        assert torch.equal(pa.input_ids[0], pb.input_ids[3])


def test_generator_path_is_reproducible():
    L = 16
    tokens, seeds, ids = batch(4, L)
    card = make("card", L)
    a = card.prepare(tokens, seeds, ids, generator=torch.Generator().manual_seed(5))[1]
    b = card.prepare(tokens, seeds, ids, generator=torch.Generator().manual_seed(5))[1]
    c = card.prepare(tokens, seeds, ids, generator=torch.Generator().manual_seed(6))[1]
    assert torch.equal(a.is_masked, b.is_masked) and not torch.equal(a.is_masked, c.is_masked)


def test_user_errors():
    L = 8
    tokens, seeds, ids = batch(2, L)
    card = make("card", L)
    with pytest.raises(ValueError, match="seq_length"):
        card.prepare(tokens[:, :-1], seeds, ids)
    with pytest.raises(ValueError, match="noise_seeds"):
        card.prepare(tokens, seeds[:1], ids)
    with pytest.raises(ValueError, match="objective.name"):
        make("gpt", L)
    with pytest.raises(ValueError, match="mask_token_id"):
        build_objective(ObjectiveConfig(), L, VOCAB, VOCAB)
    with pytest.raises(ValueError, match="t must"):
        card.prepare(tokens, seeds, ids, t=torch.tensor([0.5, 1.5]))


# ------------------------------------------------------------------ device independence


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["card", "arm", "mdlm", "bd3lm"])
def test_cuda_corruption_equals_cpu(name):
    L = 64
    tokens, seeds, ids = batch(8, L, seed=13)
    obj = make(name, L)
    cm, cl = obj.prepare(tokens, seeds, ids)
    gm, gl = obj.prepare(tokens.cuda(), seeds.cuda(), ids.cuda())
    assert gm.input_ids.is_cuda and gl.weights.is_cuda
    assert torch.equal(gm.input_ids.cpu(), cm.input_ids)
    assert torch.equal(gl.is_masked.cpu(), cl.is_masked)
    torch.testing.assert_close(gl.weights.cpu(), cl.weights)
    if cm.attention_mask is not None:
        assert torch.equal(gm.attention_mask.cpu(), cm.attention_mask)
    counters = torch.arange(100)
    assert torch.equal(noise.uniform(seeds.cuda(), counters.cuda()).cpu(), noise.uniform(seeds, counters))
