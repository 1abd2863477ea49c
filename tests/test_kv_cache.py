"""KV cache: the attention rule against a loop reference, and cached logits against uncached ones.

Tolerances: one forward pass in fp32, cached against uncached, so only the shapes of the matmuls differ
(nothing amplifies the rounding). Measured gaps are at most 9e-8 on logits of about 0.3 (AVX-512 and AVX2
kernels); rtol = atol = 1e-5 is 100x that, and far below what a wrong position or mask does (1e-2 and more).
"""

import pytest
import torch

from card_megatron.config import ModelConfig
from card_megatron.inference.cache import KVCache

V = 96


@pytest.fixture(scope="module")
def single_process():
    from card_megatron.parallel.state import init_single_process

    init_single_process()


def _model(kind="causal", layers=2, groups=None, seed=5, untied=True):
    from card_megatron.model.gpt import CardGPT

    cfg = ModelConfig(
        num_layers=layers,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=groups,
        ffn_hidden_size=64,
        seq_length=32,
        untie_embeddings_and_output_weights=untied,
    )
    return CardGPT(cfg, kind, vocab_size=V, seed=seed).eval()


def _ids(b, s, seed=0):
    return torch.randint(5, V, (b, s), generator=torch.Generator().manual_seed(seed))


def _reference_mask(lengths, s, total, block, valid):
    """mask[b, q, k] straight from the rule: k // block <= p // block (and k < lengths + valid, or k == p)."""
    out = torch.zeros(len(lengths), s, total, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        for q in range(s):
            p = n + q
            for k in range(total):
                ok = k // block <= p // block
                if valid is not None:
                    ok = (ok and k < n + int(valid[b])) or k == p
                out[b, q, k] = ok
    return out


@pytest.mark.parametrize("block", [1, 3, 64])
@pytest.mark.parametrize("with_valid", [False, True])
def test_attention_rule_matches_loop_reference(block, with_valid):
    cache = KVCache.empty(3, 64, 2, 4, torch.float32, "cpu", block=block)
    cache.lengths = torch.tensor([0, 6, 3])
    cache.valid = torch.tensor([2, 5, 1]) if with_valid else None
    s = 5
    pos, mask = cache.plan(s)
    total = int(cache.lengths.max()) + s
    assert torch.equal(pos, cache.lengths[:, None] + torch.arange(s))
    assert torch.equal(mask[:, 0], _reference_mask(cache.lengths, s, total, block, cache.valid))


def test_overflow_is_an_error():
    cache = KVCache.empty(1, 4, 1, 2, torch.float32, "cpu")
    cache.lengths = torch.tensor([3])
    with pytest.raises(ValueError, match="overflow"):
        cache.plan(2)


@pytest.mark.parametrize(
    "groups,lean,untied", [(None, False, True), (2, False, True), (None, True, False), (2, True, True)]
)
def test_cached_logits_equal_uncached_ragged(single_process, groups, lean, untied):
    """Ragged prompts fed in uneven chunks through the cache give the full-forward logits (of
    Megatron's modules), through the model's forward and through the lean path (inference/lean.py)."""
    from card_megatron.inference.cache import ModelCache

    model = _model(groups=groups, untied=untied)
    lengths = [5, 11, 1, 8]
    seqs = [_ids(1, n, seed=n)[0] for n in lengths]
    ref = [model(s[None], torch.arange(len(s))[None])[:, 0] for s in seqs]  # [n, V] each
    chunks = [[3, 2], [4, 4, 3], [1], [1, 6, 1]]  # per sequence, fed one chunk per forward
    got = [[] for _ in seqs]
    with torch.inference_mode(), ModelCache(model, len(seqs), 40, lean=lean) as cache:
        for step in range(3):
            sizes = [c[step] if step < len(c) else 0 for c in chunks]
            S = max(max(sizes), 1)
            ids = torch.full((len(seqs), S), 7)  # garbage right padding
            for b, n in enumerate(sizes):
                start = int(cache.lengths[b])
                ids[b, :n] = seqs[b][start : start + n]
            logits = cache.forward(ids)
            for b, n in enumerate(sizes):
                got[b].append(logits[b, :n])
            cache.advance(torch.tensor(sizes))
    for b in range(len(seqs)):
        torch.testing.assert_close(torch.cat(got[b]), ref[b], rtol=1e-5, atol=1e-5)
    assert all(a.kv_cache is None for a in model.core_attentions())


def test_gather_select_and_pad_values_do_not_matter(single_process):
    from card_megatron.inference.cache import ModelCache

    model = _model()
    ids = _ids(3, 6)
    ref = model(ids, torch.arange(6)[None].expand(3, 6)).transpose(0, 1)  # [3, 6, V]
    with torch.no_grad(), ModelCache(model, 3, 16) as cache:
        first = cache.forward(torch.cat([ids[:, :4], torch.full((3, 2), 9)], 1), gather=torch.tensor([[3], [1], [0]]))
        torch.testing.assert_close(first[:, 0], ref[torch.arange(3), torch.tensor([3, 1, 0])], rtol=1e-5, atol=1e-5)
        cache.advance(torch.tensor([4, 4, 4]))
        cache.select(torch.tensor([2, 0]))  # drop sequence 1, reorder
        rest = cache.forward(ids[[2, 0], 4:])
    torch.testing.assert_close(rest, ref[[2, 0], 4:], rtol=1e-5, atol=1e-5)


def test_full_attention_with_hidden_padding(single_process):
    """MDLM canvases of different lengths in one batch equal each canvas alone."""
    from card_megatron.inference.cache import ModelCache

    model = _model("full")
    a, b = _ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0]
    batch = torch.stack([a, torch.cat([b, torch.full((3,), 11)])])
    with torch.no_grad(), ModelCache(model, 2, 7, block=7) as cache:
        got = cache.forward(batch, valid=torch.tensor([7, 4]))
    torch.testing.assert_close(got[0], model(a[None], torch.arange(7)[None])[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :4], model(b[None], torch.arange(4)[None])[:, 0], rtol=1e-5, atol=1e-5)


def test_block_cache_matches_bd3lm_training_mask(single_process):
    """Block-by-block with the clean-half rule reproduces the noised-half logits of the 2L BD3LM pass."""
    from card_megatron.inference.cache import ModelCache
    from card_megatron.objectives import block_diffusion_attention_mask

    L, bs, mask_id = 12, 4, 4
    model = _model("block")
    x0 = _ids(2, L, seed=3)
    keep = torch.rand(2, L, generator=torch.Generator().manual_seed(4)) < 0.5
    xt = torch.where(keep, x0, torch.full_like(x0, mask_id))
    pos = torch.arange(L).repeat(2)[None].expand(2, 2 * L)
    full = model(torch.cat([xt, x0], 1), pos, block_diffusion_attention_mask(L, bs)).transpose(0, 1)[:, :L]
    got = []
    with torch.no_grad(), ModelCache(model, 2, 2 * L, block=bs) as cache:
        for blk in range(L // bs):
            noised = xt[:, blk * bs : (blk + 1) * bs]
            clean = x0[:, (blk - 1) * bs : blk * bs] if blk else x0[:, :0]
            logits = cache.forward(torch.cat([clean, noised], 1))
            got.append(logits[:, clean.shape[1] :])
            cache.advance(torch.full((2,), clean.shape[1]))
            if blk:
                assert int(cache.lengths[0]) == blk * bs
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-5, atol=1e-5)
