"""Verify mode (``--commit-policy verify``): greedy output equals AR's token for token, the sampled
output distribution equals AR sampling's, and the cached decoder equals a no-cache reference."""

import dataclasses

import pytest
import torch

from card_megatron import noise
from card_megatron.config import ModelConfig
from card_megatron.inference import sampling
from card_megatron.inference.causal import CausalDecodeConfig, SpecialTokenIds, decode_causal

V = 96
SPECIAL = SpecialTokenIds(eos=3, mask=4, pad=0)
GREEDY = sampling.SamplingConfig(greedy=True)
PROMPTS = [[3, 17, 40, 8, 9, 55], [3], [3, 60, 61], [3, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
SEQ = 64


@pytest.fixture(scope="module")
def single_process():
    from card_megatron.parallel.state import init_single_process

    init_single_process()


def _banned():
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[SPECIAL.mask, SPECIAL.pad, 2]] = True
    banned[90:] = True
    return banned


def _random_model(seed=11, sharpen=30.0):
    from card_megatron.model.gpt import CardGPT

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=SEQ)
    model = CardGPT(cfg, "causal", vocab_size=V, seed=seed).eval()
    with torch.no_grad():
        model.output.output_layer.weight.mul_(sharpen)
    return model


def _periodic_batch(gen, batch, length):
    """Documents [eos, pattern, pattern, ...]: a random pattern of 1 or 2 tokens repeated."""
    rows = []
    for _ in range(batch):
        period = int(torch.randint(1, 3, (1,), generator=gen))
        pattern = torch.randint(10, 40, (period,), generator=gen)
        rows.append(torch.cat([torch.tensor([SPECIAL.eos]), pattern.repeat(length)[: length - 1]]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def trained(single_process):
    """A 2-layer model trained in-process for 200 steps with a CARD-style loss (masked tail inputs,
    clean shifted targets) on periodic sequences: behind masks it continues a repeated token
    confidently (period 2 it has not learnt in 200 steps), so drafts are often right."""
    from card_megatron.model.gpt import CardGPT

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=SEQ)
    model = CardGPT(cfg, "causal", vocab_size=V, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    L = 24
    for _ in range(200):
        x0 = _periodic_batch(gen, 16, L + 1)
        t = torch.rand(16, 1, generator=gen)
        start = (L * (1 - 1.5 * t)).clamp(min=4).long()
        tail = torch.arange(L)[None, :] >= start
        xt = torch.where(tail & (torch.rand(16, L, generator=gen) < t), SPECIAL.mask, x0[:, :L])
        logits = model(xt, torch.arange(L)[None].expand(16, L))  # [L, B, V]
        loss = torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), x0[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _decode(model, prompts, max_new, cfg, samp=GREEDY, special=SPECIAL, seq_ids=None):
    seeds = sampling.sequence_seeds(samp.seed, torch.tensor(seq_ids or list(range(len(prompts)))))
    with torch.inference_mode():
        return decode_causal(model, prompts, max_new, special, _banned(), samp, seeds, cfg)[0]


def _reference_verify(model, prompt, max_new, window, samp, seq_id, special=SPECIAL):
    """Verify decoding written from the docstring of ``inference/verify.py`` without a KV cache: every
    pass is one plain causal forward over [committed, drafts, masks]. Returns (new tokens, passes,
    tokens committed by each pass)."""
    banned = _banned()
    seed = sampling.sequence_seeds(samp.seed, torch.tensor([seq_id]))

    def u(counter):
        return noise.uniform(seed, torch.tensor([counter]))[0, 0]

    text, drafts, qs = list(prompt), [], []
    limit = len(prompt) + max_new
    per_pass = []
    while True:
        n = len(text)
        drafts, qs = drafts[: limit - n - 1], qs[: limit - n - 1]
        D = len(drafts)
        M = min(window - 1, limit - n - D - 1)
        inputs = text + drafts + [special.mask] * M
        with torch.no_grad():
            logits = model(torch.tensor([inputs]), torch.arange(len(inputs))[None])[:, 0]
        scaled, _ = sampling.scaled_logits(logits[n - 1 : n + D + M], banned, samp)
        a = 0
        while a < D:
            if samp.is_greedy:
                ok = int(scaled[a].argmax()) == drafts[a]
            else:
                p = sampling.sampled_distribution(scaled[a], samp)
                ok = float(u(sampling.ACCEPT_STREAM + n + a) * qs[a][drafts[a]]) < float(p[drafts[a]])
            if not ok:
                break
            a += 1
        if samp.is_greedy:
            token = int(scaled[a].argmax())
        elif a < D:
            residual = (sampling.sampled_distribution(scaled[a], samp) - qs[a]).clamp(min=0)
            token = int(sampling.inverse_cdf(residual, u(sampling.TOKEN_STREAM + n + a)[None])[0])
        else:
            token = int(sampling.draw_from_logits(scaled[a][None], u(sampling.TOKEN_STREAM + n + a)[None], samp)[0])
        new = drafts[:a] + [token]
        if a == D:
            rows = scaled[D + 1 : D + 1 + M]
            if samp.is_greedy:
                drafts, qs = rows.argmax(-1).tolist(), []
            else:
                qs = list(sampling.sampled_distribution(rows, samp))
                drafts = [
                    int(
                        sampling.inverse_cdf(
                            q, u(sampling.DRAFT_STREAM + len(per_pass) * sampling.STEP_STRIDE + pos)[None]
                        )
                    )
                    for q, pos in zip(qs, range(n + D + 1, n + D + 1 + M))
                ]
        else:
            drafts, qs = [], []
        text += new
        per_pass.append(new)
        out = text[len(prompt) :]
        if special.eos in new:
            return out[: out.index(special.eos) + 1], len(per_pass), per_pass
        if len(text) >= limit:
            return out, len(per_pass), per_pass


def _ar(model, prompts, max_new, samp=GREEDY, special=SPECIAL):
    return _decode(model, prompts, max_new, CausalDecodeConfig(window=1), samp, special)


def test_verify_greedy_equals_ar_for_every_window(single_process, trained):
    """K = 1..16 on a ragged batch, random and trained models: the same tokens as AR; on the trained
    model several tokens per forward (the drafts are accepted)."""
    for model, name in ((_random_model(), "random"), (trained, "trained")):
        ar = _ar(model, PROMPTS, 20)
        for K in range(1, 17):
            outs = _decode(model, PROMPTS, 20, CausalDecodeConfig(window=K, commit_policy="verify"))
            assert [o.token_ids for o in outs] == [o.token_ids for o in ar], (name, K)
            assert all(o.num_forward_passes >= -(-len(o.token_ids) // K) for o in outs)
            if K == 1:
                assert all(o.num_forward_passes == len(o.token_ids) for o in outs)
        if name == "trained":
            repeated = [[3, 21, 21, 21], [3, 30, 30], [3, 12]]
            ar = _ar(model, repeated, 20)
            outs = _decode(model, repeated, 20, CausalDecodeConfig(window=8, commit_policy="verify"))
            assert [o.token_ids for o in outs] == [o.token_ids for o in ar]
            assert sum(len(o.token_ids) for o in outs) > 3 * sum(o.num_forward_passes for o in outs)


def test_verify_equals_no_cache_reference(single_process, trained):
    """Tokens and forward passes of the cached batched decoder equal the no-cache reference, greedy and
    sampled (temperature, top-k, top-p), for several windows; prompts end near the context limit."""
    long_prompt = [3] + [10 + (i % 3) for i in range(SEQ - 9)]  # len + max_new = SEQ
    prompts = PROMPTS + [long_prompt]
    samp = sampling.SamplingConfig(temperature=1.2, top_k=12, top_p=0.95, seed=4)
    partial = 0
    for model in (_random_model(), trained):
        for s in (GREEDY, samp):
            for K in (2, 5, 8):
                outs = _decode(model, prompts, 8, CausalDecodeConfig(window=K, commit_policy="verify"), s)
                for i, (prompt, out) in enumerate(zip(prompts, outs)):
                    tokens, passes, per_pass = _reference_verify(model, prompt, 8, K, s, i)
                    assert (out.token_ids, out.num_forward_passes) == (tokens, passes), (K, s, i)
                    partial += any(1 < len(c) < K for c in per_pass)
    assert partial > 0  # some pass accepted drafts but not all of them


def test_eos_inside_accepted_drafts(single_process, trained):
    """An eos that arrives as an accepted draft (not the last token of its pass) stops decoding there,
    as AR does."""
    K = 8
    free = _decode(trained, PROMPTS, 20, CausalDecodeConfig(window=K, commit_policy="verify"))
    hit = 0
    for i, prompt in enumerate(PROMPTS):
        _, _, per_pass = _reference_verify(trained, prompt, 20, K, GREEDY, i)
        for chunk in per_pass:
            if len(chunk) > 2:  # chunk[:-1] were accepted drafts
                eos = chunk[1]
                special = SpecialTokenIds(eos=eos, mask=SPECIAL.mask, pad=SPECIAL.pad)
                ar = _ar(trained, [prompt], 20, special=special)[0]
                out = _decode(
                    trained, [prompt], 20, CausalDecodeConfig(window=K, commit_policy="verify"), special=special
                )
                assert out[0].token_ids == ar.token_ids and out[0].stopped == "eos"
                assert len(out[0].token_ids) < len(free[i].token_ids)
                hit += 1
                break
    assert hit > 0


def _continuation_probs(model, prompt, length, samp):
    """Exact AR probabilities of every continuation of ``length`` tokens: {tuple: probability}."""
    out = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, prob in out.items():
            ids = list(prompt) + list(seq)
            with torch.no_grad():
                logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])[-1, 0]
            scaled, _ = sampling.scaled_logits(logits, _banned(), samp)
            p = sampling.sampled_distribution(scaled, samp)
            for tok in torch.nonzero(p > 0).flatten().tolist():
                nxt[seq + (tok,)] = prob * float(p[tok])
        out = nxt
    return out


def test_verify_sampling_distribution_equals_ar(single_process, trained):
    """Three-token continuations, top-k 3 (27 possible outcomes), 6000 samples each for AR and verify
    (K = 4): both pass a chi-square test against the exact AR probabilities (fixed seeds; bound =
    the 0.999 quantile of chi-square with 26 degrees of freedom, 54.05), and verify's passes
    rejected some drafts, accepted others."""
    model = trained
    samp = sampling.SamplingConfig(temperature=2.0, top_k=3, seed=7)
    prompt = [3, 21, 21]
    exact = _continuation_probs(model, prompt, 3, samp)
    assert len(exact) == 27
    n = 6000
    chi = {}
    for name, cfg in (
        ("ar", CausalDecodeConfig(window=1)),
        ("verify", CausalDecodeConfig(window=4, commit_policy="verify")),
    ):
        outs = _decode(model, [prompt] * n, 3, cfg, samp)
        counts = {}
        for o in outs:
            counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
        assert set(counts) <= set(exact)
        chi[name] = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in exact.items())
        if name == "verify":
            passes = [o.num_forward_passes for o in outs]
            assert 2 in passes and 3 in passes  # drafts accepted (2 passes) and rejected (3)
    assert chi["ar"] < 54.05 and chi["verify"] < 54.05, chi


def test_verify_refuses_max_steps():
    with pytest.raises(ValueError, match="--max-steps .* verify"):
        CausalDecodeConfig(commit_policy="verify", max_steps=3)


# AR, threshold CARD and verify: the three causal decoders that the alternative paths must reproduce
AR_THRESHOLD_VERIFY = (
    CausalDecodeConfig(window=1),
    CausalDecodeConfig(window=4, threshold=0.6),
    CausalDecodeConfig(window=6, commit_policy="verify"),
)


def test_lean_path_equals_megatron_modules(single_process, trained):
    """The lean forward (inference/lean.py, the default) and Megatron's modules decode the same tokens
    in the same passes: AR, threshold CARD and verify, greedy and sampled, on a ragged batch."""
    samp = sampling.SamplingConfig(temperature=1.0, top_k=20, seed=1)
    for cfg in AR_THRESHOLD_VERIFY:
        for s in (GREEDY, samp):
            lean = _decode(trained, PROMPTS, 12, cfg, s)
            ref = _decode(trained, PROMPTS, 12, dataclasses.replace(cfg, lean=False), s)
            assert [(o.token_ids, o.num_forward_passes) for o in lean] == [
                (o.token_ids, o.num_forward_passes) for o in ref
            ]


def test_static_shapes_equal_dynamic(single_process, trained):
    """Static shapes (``cuda_graphs=True``: on the CPU the static-shape path runs eagerly; whole-capacity
    attention, passes padded to 2K - 1 positions, finished rows kept) and the dynamic path decode the same
    tokens in the same passes: AR, threshold CARD (prefix policy) and verify, greedy and sampled, random
    and trained models, a ragged batch with a prompt that ends at the context limit, and an eos inside a
    window (the 4th token of sequence 0 made the eos id; other sequences stop at eos or at the length)."""
    long_prompt = [3] + [10 + (i % 3) for i in range(SEQ - 13)]  # len + max_new = SEQ
    prompts = PROMPTS + [long_prompt]
    samp = sampling.SamplingConfig(temperature=1.0, top_k=20, seed=2)
    length_stops = 0
    for model in (_random_model(), trained):
        for cfg in AR_THRESHOLD_VERIFY:
            for s in (GREEDY, samp):
                free = _decode(model, prompts, 12, cfg, s)
                eos = SpecialTokenIds(eos=free[0].token_ids[3], mask=SPECIAL.mask, pad=SPECIAL.pad)
                ref = _decode(model, prompts, 12, cfg, s, special=eos)  # the other sequences stop at eos or length
                got = _decode(model, prompts, 12, dataclasses.replace(cfg, cuda_graphs=True), s, special=eos)
                assert [(o.token_ids, o.num_forward_passes, o.stopped) for o in got] == [
                    (o.token_ids, o.num_forward_passes, o.stopped) for o in ref
                ], (cfg, s)
                assert ref[0].stopped == "eos" and len(ref[0].token_ids) <= 4
                length_stops += any(o.stopped == "length" for o in ref)
    assert length_stops == 12
