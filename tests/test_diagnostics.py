"""The CARD diagnostics (training/diagnostics.py) against direct loop computations.

Tolerances: fp32 sums against loops. Measured gaps: 1.7e-7 on log-probabilities of about 1.5 (atol 1e-5)
and 4.7e-7 on NLL sums of about 78 (rtol 1e-5, 1.6x the gap: a sum of ~100 fp32 terms rounds ~1e-7
relative per term in the worst case); counts are compared exactly.
"""

import math

import pytest
import torch

from card_megatron.model.gpt import per_token_nll, per_token_top1_logprob
from card_megatron.training import diagnostics


@pytest.fixture(scope="module", autouse=True)
def single_process():
    from card_megatron.parallel.state import init_single_process

    init_single_process()


def _model_outputs(B, L, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, B, V, generator=g) * 3.0  # [S, B, V]
    targets = torch.randint(0, V, (B, L), generator=g)
    # make some targets the argmax so that both outcomes occur
    argmax = logits.argmax(-1).t()
    take = torch.rand(B, L, generator=g) < 0.5
    targets = torch.where(take, argmax, targets)
    return logits, targets, g


def test_top1_logprob_is_log_softmax_max():
    logits, targets, _ = _model_outputs(3, 7, 11)
    expected = torch.log_softmax(logits.double(), -1).max(-1).values.t()
    assert torch.allclose(per_token_top1_logprob(logits).double(), expected, atol=1e-5)


def test_context_sums_match_a_loop():
    B, L, V = 4, 20, 13
    logits, targets, g = _model_outputs(B, L, V, seed=1)
    is_masked = torch.rand(B, L, generator=g) < 0.4
    top1 = per_token_top1_logprob(logits)  # first: the NLL overwrites fp32 logits in place
    nll = per_token_nll(logits.clone(), targets)
    sums = diagnostics.context_sums(nll, top1, is_masked)
    probs = torch.softmax(logits.double(), -1)
    ref = torch.zeros(4, 3, dtype=torch.float64)
    for b in range(B):
        for j in range(L):
            group = min(3, sum(int(is_masked[b, i]) for i in range(max(0, j - 3), j + 1)))
            p = probs[j, b]
            ref[group, 0] += 1
            ref[group, 1] += -math.log(p[targets[b, j]])
            ref[group, 2] += float(int(p.argmax()) == int(targets[b, j]))
    assert torch.equal(sums[:, 0], ref[:, 0]) and torch.equal(sums[:, 2], ref[:, 2])
    assert torch.allclose(sums[:, 1], ref[:, 1], rtol=1e-5)
    assert (ref[:, 0] > 0).all() and 0 < ref[:, 2].sum() < B * L  # every group and both outcomes occur
    metrics = diagnostics.context_metrics(sums, "val_")
    assert math.isclose(metrics["val_ctx3plus_acc"], ref[3, 2] / ref[3, 0])
    assert math.isclose(metrics["val_ctx0_nll"], ref[0, 1] / ref[0, 0], rel_tol=1e-5)


def test_probe_batch_and_sums_match_a_loop():
    B, L, V, K, mask = 6, 24, 17, 5, 16
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, mask, (B, L + 1), generator=g)
    sample_ids = torch.arange(100, 100 + B)
    ids, pos, targets, gather = diagnostics.probe_batch(tokens, sample_ids, K, mask)
    cuts = diagnostics.probe_cuts(sample_ids, L, K)
    assert len(set(cuts.tolist())) > 1 and bool(((cuts >= 1) & (cuts + K - 1 <= L)).all())
    for b in range(B):
        n = int(cuts[b])
        expect = tokens[b, :L].clone()
        expect[n : n + K - 1] = mask  # clean prefix x_0..x_{n-1}, then K-1 masks
        assert torch.equal(ids[b], expect)
        for k in range(K):  # output n-1+k predicts x[n+k] after exactly k masks
            j = int(gather[b, k])
            assert j == n - 1 + k and int(targets[b, j]) == int(tokens[b, n + k])
            assert int((ids[b, : j + 1] == mask).sum()) == k
    logits = torch.randn(L, B, V, generator=g) * 4.0
    nll = per_token_nll(logits.clone(), targets)
    sums = diagnostics.probe_sums(nll, per_token_top1_logprob(logits), gather)
    probs = torch.softmax(logits.double(), -1)
    metrics = diagnostics.probe_metrics(sums)
    for k in range(K):
        right = 0
        confident = [0] * len(diagnostics.PROBE_THRESHOLDS)
        for b in range(B):
            p = probs[int(gather[b, k]), b]
            right += int(int(p.argmax()) == int(tokens[b, int(cuts[b]) + k]))
            for i, tau in enumerate(diagnostics.PROBE_THRESHOLDS):
                confident[i] += int(float(p.max()) > tau)
        assert sums[k].tolist() == [B, right, *confident]
        assert metrics[f"probe_conf_k{k}"] == metrics[f"probe_conf0.9_k{k}"] == confident[5] / B
    assert diagnostics.PROBE_THRESHOLDS[5] == diagnostics.CONFIDENT
    assert sums[:, 2 + 5].sum() > 0  # the scaled logits make some predictions confident


def test_probe_cuts_several_per_sample_after_a_minimum_prefix():
    """Cut c of C uses the Weyl point sample_id * C + c; with C = 1 and min prefix 1 the cuts are the
    original ones; every cut leaves at least min_prefix clean tokens and room for the window."""
    L, K = 128, 8
    ids = torch.arange(0, 64)
    u = (0.5 + (ids.double() + diagnostics.PROBE_OFFSET) * 0.6180339887498949) % 1.0
    assert torch.equal(diagnostics.probe_cuts(ids, L, K), 1 + torch.floor(u * (L - K + 1)).long())
    cuts = torch.stack([diagnostics.probe_cuts(ids, L, K, c, 4, min_prefix=24) for c in range(4)])
    assert int(cuts.min()) >= 24 and int(cuts.max()) + K - 1 <= L
    assert int(cuts.min()) < 30 and int(cuts.max()) > L - K - 5  # the range is covered
    assert len(set(cuts.flatten().tolist())) > 50  # 256 cuts spread over 98 values
    with pytest.raises(ValueError, match="probe min prefix"):
        diagnostics.probe_cuts(ids, L, K, min_prefix=L)
