"""Decoding settings measured side by side: speed, forward passes and quality in one table.

Used by ``tools/benchmark_generate.py`` and the study (``apps/study``). Every
setting generates from the same prompts and seeds; the settings run round-robin in one
process so that load changes hit all alike, and ratios (speed-up over the first
setting, normally AR with its KV cache) are comparable while absolute numbers are not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from card_megatron.inference import quality
from card_megatron.inference.generate import GenerationConfig, generate


@dataclass
class Setting:
    """One decoding configuration of one loaded model; ``extra`` is copied into its row."""

    name: str
    loaded: object  # LoadedModel
    cfg: GenerationConfig
    extra: dict = field(default_factory=dict)


def _timed(loaded, prompts, cfg):
    cpu = time.process_time()
    gens, totals = generate(loaded, prompts, cfg)
    totals["cpu_seconds"] = time.process_time() - cpu
    return gens, totals


def run_sweep(
    settings: Sequence[Setting], prompts: Sequence[str], judge=None, repeats: int = 1, warmup: bool = True
) -> tuple[list[dict], list[list]]:
    """Generates with every setting ``repeats`` times (the fastest wall clock and CPU time count).

    ``judge``: a LoadedModel (normally the ARM) scoring each setting's text. Returns one
    row per setting ({setting, decoding, tokens_per_forward, tokens_per_second, speedup,
    cpu_speedup, same_as_first (fraction of sequences whose tokens equal the first
    setting's), judge_ppl, entropy, repetition_4gram, ...} plus ``extra``) and the
    generations of each setting.
    """
    if warmup:
        for s in settings:
            generate(s.loaded, prompts[:1], s.cfg)  # allocator, kernels
    best: list[Optional[tuple]] = [None] * len(settings)
    for _ in range(repeats):
        for i, s in enumerate(settings):
            gens, totals = _timed(s.loaded, prompts, s.cfg)
            if best[i] is None:
                best[i] = (gens, totals)
            else:
                prev = best[i][1]
                prev["seconds"] = min(prev["seconds"], totals["seconds"])
                prev["cpu_seconds"] = min(prev["cpu_seconds"], totals["cpu_seconds"])
    rows: list[dict] = []
    first_tokens = [g.token_ids for g in best[0][0]]
    for s, (gens, totals) in zip(settings, best):
        nll = quality.judge_generations(judge, gens, s.loaded.tokenizer, retokenize=True) if judge else None
        row = {
            "setting": s.name,
            "decoding": totals["decoding"],
            **s.extra,
            "tokens_per_forward": totals["new_tokens"] / max(totals["forward_passes"], 1),
            "tokens_per_second": totals["new_tokens"] / max(totals["seconds"], 1e-9),
            "tokens_per_cpu_second": totals["new_tokens"] / max(totals["cpu_seconds"], 1e-9),
            "new_tokens": totals["new_tokens"],
            "forward_passes": totals["forward_passes"],
            "model_calls": totals["model_calls"],
            "seconds": totals["seconds"],
            "cpu_seconds": totals["cpu_seconds"],
            "same_as_first": sum(g.token_ids == f for g, f in zip(gens, first_tokens)) / max(len(gens), 1),
            **quality.summarise([g.token_ids for g in gens], nll),
        }
        row["speedup"] = row["tokens_per_second"] / rows[0]["tokens_per_second"] if rows else 1.0
        row["cpu_speedup"] = row["tokens_per_cpu_second"] / rows[0]["tokens_per_cpu_second"] if rows else 1.0
        rows.append(row)
    return rows, [b[0] for b in best]
