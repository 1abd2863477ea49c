"""The study's decoding measurements: CARD's parallel decoding against AR with its KV cache.

* ``main``: the main-corpus CARD model, prompts cut from held-out documents, AR and
  every (tau, K), greedy and sampled, judged by the study's ARM model.
* ``curve``: the same greedy sweep (largest K) at several checkpoints of that run, so
  tokens per forward at equal quality can be read against training tokens.
* ``copy``: the synthetic-corpus CARD model, prompted with a document's first string
  and its period, greedy: tokens per forward and whether the text equals greedy AR's.
* ``variants``: every CARD run of the main corpus (each seed of full CARD, the ablations and the
  sweeps), greedy AR and verify mode only: tokens per forward at output identical to AR, per
  variant (:func:`verify_rows`).

The rows of a sweep come from the plan's decoding families (``plans.DecodeFamily``): threshold
decoding at every (K, tau), forced commits (labelled), and verify mode when the decoder has it.
Two headline numbers, neither of which repetitive text can game:

* :func:`best_identical`: the most tokens per forward among greedy rows whose output is identical
  to greedy AR on every prompt (verify mode by construction; threshold rows where it happened);
* :func:`best_within`: for *sampled* threshold decoding, the most tokens per forward whose judge
  perplexity stays within ``tolerance`` of sampled AR; the table shows repetition (repeated 4-grams)
  and entropy beside it. Greedy rows are not ranked by judge perplexity: greedy AR text is highly
  repetitive and a row that repeats more can score a lower judge perplexity.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from apps.study.plans import THRESHOLD, DecodeSpec
from card_megatron.rundir import has_export


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


def _settings(model, spec: DecodeSpec, base: dict, windows, thresholds, max_new_tokens: int) -> list:
    from card_megatron.inference.causal import CausalDecodeConfig
    from card_megatron.inference.generate import GenerationConfig
    from card_megatron.inference.sweep import Setting

    settings = []
    for family in spec.families:
        for K in windows:
            taus = family.thresholds or thresholds
            for tau in taus:
                max_steps = per_block = None
                if family.forced_tokens_per_pass:
                    per_block = max(1, K // family.forced_tokens_per_pass)
                    max_steps = per_block * -(-max_new_tokens // K)
                name = f"{family.name} K={K}" + (f" tau={tau:g}" if len(taus) > 1 or family.thresholds is None else "")
                if max_steps:
                    name += f" ({per_block} passes/block)"
                causal = CausalDecodeConfig(
                    window=K, threshold=tau, commit_policy=family.commit_policy, max_steps=max_steps
                )
                extra = {
                    "window": K,
                    "threshold": tau,
                    "family": family.name,
                    "forced": max_steps is not None,
                    "max_steps": max_steps,
                }
                settings.append(Setting(name, model, GenerationConfig(decoding="card", causal=causal, **base), extra))
    return settings


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
) -> list[dict]:
    """AR, then every decoding family of the plan at every (K, tau): one row each (see
    ``inference/sweep.run_sweep``; rows carry ``family``, ``forced``, ``window``, ``threshold``)."""
    from card_megatron.inference.generate import GenerationConfig
    from card_megatron.inference.sampling import SamplingConfig
    from card_megatron.inference.sweep import Setting, run_sweep

    samp = SamplingConfig(greedy=greedy, temperature=spec.temperature, top_p=spec.top_p, seed=seed)
    new = max_new_tokens or spec.max_new_tokens
    base = dict(max_new_tokens=new, batch_size=len(prompts), sampling=samp)
    ar = {"window": 1, "threshold": None, "family": "ar", "forced": False, "max_steps": None}
    settings = [Setting("ar", model, GenerationConfig(decoding="ar", **base), ar)]
    settings += _settings(model, spec, base, windows or spec.windows, thresholds or spec.thresholds, new)
    rows, _ = run_sweep(settings, prompts, judge, repeats=1)
    for r in rows:
        r["mode"] = "greedy" if greedy else f"sampled (T={spec.temperature:g}, top-p={spec.top_p:g})"
    return rows


def verify_rows(model, prompts: list[str], spec: DecodeSpec) -> list[dict]:
    """Greedy AR, then verify mode at every K of the plan: the lossless tokens per forward of one model
    (its rows' ``same_as_first`` say whether the output equalled AR's; it must, by construction)."""
    families = tuple(f for f in spec.families if f.commit_policy == "verify")
    if not families:
        return []
    return sweep(model, None, prompts, dataclasses.replace(spec, families=families), greedy=True)


def sampled_ar_spread(model, judge, prompts: list[str], spec: DecodeSpec, seeds) -> list[dict]:
    """Sampled AR with each seed in ``seeds``: the judge perplexity one sampling seed moves by, which
    is the noise floor of the "within 5% of sampled AR" rule on these prompts."""
    from card_megatron.inference.generate import GenerationConfig
    from card_megatron.inference.sampling import SamplingConfig
    from card_megatron.inference.sweep import Setting, run_sweep

    settings = []
    for seed in seeds:
        samp = SamplingConfig(greedy=False, temperature=spec.temperature, top_p=spec.top_p, seed=seed)
        new, batch = spec.max_new_tokens, len(prompts)
        cfg = GenerationConfig(decoding="ar", max_new_tokens=new, batch_size=batch, sampling=samp)
        settings.append(Setting(f"ar seed={seed}", model, cfg, {"seed": seed}))
    rows, _ = run_sweep(settings, prompts, judge, repeats=1)
    return [{k: r.get(k) for k in ("setting", "seed", "judge_ppl", "entropy", "repetition_4gram")} for r in rows]


def best_within(rows: list[dict], tolerance: float = 0.05) -> Optional[dict]:
    """The threshold-decoding row (not forced) with the most tokens per forward whose judge perplexity
    is within ``tolerance`` of the AR row's (the AR row if none; None without a judge)."""
    ar = rows[0]
    if ar.get("judge_ppl") is None:
        return None
    ok = [
        r
        for r in rows[1:]
        if r.get("family", THRESHOLD.name) == THRESHOLD.name
        and not r.get("forced")
        and r["judge_ppl"] <= ar["judge_ppl"] * (1 + tolerance)
    ]
    return max(ok, key=lambda r: (r["tokens_per_forward"], r["threshold"]), default=ar)


def best_identical(rows: list[dict]) -> dict:
    """The row (not forced) with the most tokens per forward whose output equals the first row's (AR)
    on every prompt: the lossless number of a greedy sweep (the AR row itself if none)."""
    ok = [r for r in rows[1:] if not r.get("forced") and r["same_as_first"] == 1.0]
    return max(ok, key=lambda r: r["tokens_per_forward"], default=rows[0])


def checkpoints_of(run_dir: str) -> list[str]:
    """The complete checkpoints of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_") and has_export(os.path.join(root, d, "export")))
    return [os.path.join(root, d) for d in steps]
