"""Quality of generated text: judge (generative) perplexity, unigram entropy, repetition.

Fewer forward passes are only worth it at equal quality, so every generation run can
be scored by a *judge*, normally the ARM baseline: its negative log-likelihood of the
generated tokens given the prompt (generative perplexity = exp(total NLL / total
tokens)). Low perplexity alone rewards degenerate repetitive text, so the unigram
entropy of each sample and the fraction of repeated 4-grams are reported beside it.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch


def judge_nll(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    vocab_size: int,
    batch_size: int = 8,
) -> list[tuple[float, int]]:
    """Per sequence (sum of NLL in nats, number of tokens) of ``continuations`` given ``contexts``.

    The judge must be a causal model (mask kind ``causal``); contexts need >= 1 token.
    Log-probabilities are normalised over the ids < ``vocab_size`` (the tokenizer's
    vocabulary; padded-vocab ids are excluded). One full forward per batch, right padded
    (causal attention keeps the padding invisible to real positions).
    """
    if getattr(model, "mask_kind", "causal") != "causal":
        raise ValueError(f"the judge must be a causal model (ARM or CARD), not mask kind {model.mask_kind!r}")
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = []
    for start in range(0, len(contexts), batch_size):
        ctx, cont = contexts[start : start + batch_size], continuations[start : start + batch_size]
        seqs = [list(c) + list(x) for c, x in zip(ctx, cont)]
        if any(len(c) < 1 for c in ctx):
            raise ValueError("judge_nll: every context needs at least one token")
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        positions = torch.arange(width, device=device)[None, :].expand(len(seqs), width)
        with torch.no_grad():
            logits = model(ids, positions).transpose(0, 1)[..., :vocab_size]  # [B, W, V]
        logp = torch.log_softmax(logits.double(), dim=-1)
        for b, (c, x) in enumerate(zip(ctx, cont)):
            if len(x) == 0:
                results.append((0.0, 0))
                continue
            pred_pos = torch.arange(len(c) - 1, len(c) - 1 + len(x), device=device)
            target = torch.tensor(list(x), dtype=torch.long, device=device)
            results.append((float(-logp[b, pred_pos, target].sum()), len(x)))
    return results


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample; 0 for an empty sample."""
    if not tokens:
        return 0.0
    counts = Counter(tokens)
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in counts.values())


def repetition_rate(tokens: Sequence[int], n: int = 4) -> float:
    """Fraction of the n-grams of one sample that repeat an earlier n-gram of it (0 if none exist)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def summarise(token_lists: Sequence[Sequence[int]], nll: Sequence[tuple[float, int]] | None = None) -> dict:
    """Corpus-level quality: mean unigram entropy and repetition over samples, judge perplexity.

    Returns {"entropy", "repetition_4gram", and with ``nll``: "judge_nll", "judge_ppl", "judge_tokens"}.
    """
    samples = [list(t) for t in token_lists]
    out = {
        "entropy": sum(unigram_entropy(t) for t in samples) / max(len(samples), 1),
        "repetition_4gram": sum(repetition_rate(t) for t in samples) / max(len(samples), 1),
    }
    if nll is not None:
        total = sum(x for x, _ in nll)
        count = sum(c for _, c in nll)
        out["judge_tokens"] = count
        out["judge_nll"] = total / count if count else float("nan")
        out["judge_ppl"] = math.exp(min(total / count, 50.0)) if count else float("nan")
    return out


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids (same SentencePiece model and reserved ids)."""
    ids = ("vocab_size", "pad_id", "bos_id", "eos_id", "mask_id")
    return a.serialized() == b.serialized() and all(getattr(a, k) == getattr(b, k) for k in ids)


def judge_generations(
    judge, generations: Sequence, tokenizer, retokenize: bool = False, batch_size: int = 8
) -> list[tuple[float, int]]:
    """(NLL sum, tokens) per generation under ``judge`` (a LoadedModel), given its prompt.

    With the generator's tokenizer the judge scores exactly the generated ids (eos
    included when generation stopped there) after [eos] + prompt ids. A judge with another
    tokenizer is refused unless ``retokenize``: then prompt and generated text are
    re-encoded with the judge's tokenizer (an eos is appended when generation stopped at
    eos); perplexities per token are then not comparable with same-tokenizer numbers.
    """
    jt = judge.tokenizer
    if same_tokenizer(tokenizer, jt):
        contexts = [[jt.eos_id] + list(g.prompt_ids) for g in generations]
        continuations = [list(g.token_ids) for g in generations]
    elif retokenize:
        contexts = [[jt.eos_id] + jt.encode(g.prompt) for g in generations]
        continuations = [jt.encode(g.text) + ([jt.eos_id] if g.stopped == "eos" else []) for g in generations]
    else:
        raise ValueError(
            f"tokenizer mismatch: the judge ({judge.path}) uses {jt.source} but the model uses {tokenizer.source}; "
            "pass --judge-retokenize to re-encode the generated text with the judge's tokenizer"
        )
    return judge_nll(judge.model, contexts, continuations, jt.vocab_size, batch_size)
