"""The study's decoding measurements: CARD's parallel decoding against AR with its KV cache.

* ``main``: the main-corpus CARD model, prompts cut from held-out documents, AR and
  every (tau, K), greedy and sampled, judged by the study's ARM model.
* ``curve``: the same greedy sweep (largest K) at several checkpoints of that run, so
  tokens per forward at equal quality can be read against training tokens.
* ``copy``: the synthetic-corpus CARD model, prompted with a document's first string
  and its period, greedy: tokens per forward and whether the text equals greedy AR's.

The headline number of a sweep (:func:`best_within`) is the largest tokens per forward
among the CARD settings whose judge perplexity stays within ``tolerance`` of AR
decoding of the same model (the lowest threshold that keeps quality).
"""

from __future__ import annotations

import os
from typing import Optional

from card_megatron.study.plans import DecodeSpec


def held_out_documents(data_path: str, split: str, count: int) -> list[list[int]]:
    """``count`` documents spread evenly over the validation split of a shard (token ids, eos dropped)."""
    from card_megatron.data.index import split_document_ranges
    from card_megatron.data.shards import TokenShard

    shard = TokenShard(data_path)
    begin, end = split_document_ranges(split, len(shard))[1]
    if end <= begin:
        raise ValueError(f"{data_path}: the validation split ({split}) holds no document")
    step = max(1, (end - begin) // count)
    return [[int(t) for t in shard[i][:-1]] for i in range(begin, end, step)][:count]


def main_prompts(data_path: str, split: str, tokenizer, spec: DecodeSpec) -> list[str]:
    """The first ``prompt_tokens`` tokens of held-out documents, as text."""
    docs = held_out_documents(data_path, split, spec.num_prompts)
    return [tokenizer.decode(d[: spec.prompt_tokens]) for d in docs]


def copy_prompts(data_path: str, split: str, tokenizer, spec: DecodeSpec) -> list[str]:
    """A held-out synthetic document up to and including its first period (the string to copy)."""
    prompts = []
    for doc in held_out_documents(data_path, split, spec.copy_prompts):
        text = tokenizer.decode(doc)
        if "." in text:
            prompts.append(text[: text.index(".") + 1])
    return prompts


def sweep(
    model,
    judge,
    prompts: list[str],
    spec: DecodeSpec,
    greedy: bool,
    windows=None,
    thresholds=None,
    max_new_tokens: Optional[int] = None,
    seed: int = 0,
    verify: bool = False,
) -> list[dict]:
    """AR, then CARD at every (K, tau), then (``verify``) lossless verify decoding at every K: one row
    each (see ``inference/sweep.run_sweep``; verify rows have ``commit_policy`` "verify", threshold None)."""
    from card_megatron.inference.causal import CausalDecodeConfig
    from card_megatron.inference.generate import GenerationConfig
    from card_megatron.inference.sampling import SamplingConfig
    from card_megatron.inference.sweep import Setting, run_sweep

    samp = SamplingConfig(greedy=greedy, temperature=spec.temperature, top_p=spec.top_p, seed=seed)
    base = dict(max_new_tokens=max_new_tokens or spec.max_new_tokens, batch_size=len(prompts), sampling=samp)
    settings = [Setting("ar", model, GenerationConfig(decoding="ar", **base), {"window": 1, "threshold": None})]
    for K in windows or spec.windows:
        for tau in thresholds or spec.thresholds:
            settings.append(
                Setting(
                    f"card K={K} tau={tau:g}",
                    model,
                    GenerationConfig(decoding="card", causal=CausalDecodeConfig(window=K, threshold=tau), **base),
                    {"window": K, "threshold": tau},
                )
            )
    if verify:
        for K in windows or spec.windows:
            settings.append(
                Setting(
                    f"card K={K} verify",
                    model,
                    GenerationConfig(
                        decoding="card", causal=CausalDecodeConfig(window=K, commit_policy="verify"), **base
                    ),
                    {"window": K, "threshold": None, "commit_policy": "verify"},
                )
            )
    rows, _ = run_sweep(settings, prompts, judge, repeats=1)
    for r in rows:
        r["mode"] = "greedy" if greedy else f"sampled (T={spec.temperature:g}, top-p={spec.top_p:g})"
    return rows


def best_within(rows: list[dict], tolerance: float = 0.05) -> Optional[dict]:
    """The threshold-CARD row with the most tokens per forward whose judge perplexity is within
    ``tolerance`` of the AR row's (None without a judge; verify rows are exact, not candidates)."""
    ar = rows[0]
    if ar.get("judge_ppl") is None:
        return None
    ok = [
        r
        for r in rows[1:]
        if r.get("commit_policy") != "verify" and r["judge_ppl"] <= ar["judge_ppl"] * (1 + tolerance)
    ]
    return max(ok, key=lambda r: (r["tokens_per_forward"], r["threshold"]), default=ar)


def checkpoints_of(run_dir: str) -> list[str]:
    """The complete checkpoints of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = sorted(
        d
        for d in os.listdir(root)
        if d.startswith("step_") and os.path.exists(os.path.join(root, d, "export", "model.pt"))
    )
    return [os.path.join(root, d) for d in steps]
