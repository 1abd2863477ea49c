"""The end of `make demo`: perplexity and mask probe before/after, then CARD (threshold and lossless
verify) against AR decoding.

  python tools/demo_report.py RUN_DIR [--prompts N] [--threshold TAU] [--window K]   # python -m apps.demo.report

Prompts are held-out documents of the run's corpus cut after their first period (for the
synthetic copy corpus: the string the rest of the document repeats).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass

from card_megatron import cli
from card_megatron.cli import at_least, option, positive

DESCRIPTION = __doc__.split("\n\n")[0]


@dataclass
class DemoReportOptions:
    """``python -m apps.demo.report``'s options (``tools/demo_report.py``, the end of ``make demo``)."""

    run_dir: str = option(positional=True)
    """The demo's run directory."""
    prompts: int = option(8, range=at_least(1))
    """Held-out prompts to decode."""
    threshold: float = option(0.9, range=positive())
    """CARD's tau."""
    window: int = option(8, range=at_least(1))
    """CARD's window K."""
    max_new_tokens: int = option(48, range=at_least(1))
    """New tokens per prompt at most."""


def run(args: DemoReportOptions) -> int:
    """Prints perplexity and mask probe before/after, then CARD (threshold and verify) against AR."""
    from apps.study.decoding import copy_prompts, sweep
    from apps.study.plans import DecodeSpec, decode_families
    from card_megatron.inference.loading import load_model

    evals = [json.loads(line) for line in open(os.path.join(args.run_dir, "eval.jsonl")) if line.strip()]
    first, last = evals[0], evals[-1]
    bound = "<= " if last["val_ppl_is_bound"] else ""
    print(
        f"== validation perplexity: {bound}{first['val_ppl']:.1f} at step {first['step']} -> "
        f"{bound}{last['val_ppl']:.2f} at step {last['step']}"
    )
    ks = sorted(int(k[len("probe_conf_k") :]) for k in last if k.startswith("probe_conf_k"))
    if ks:
        print(
            "== mask probe (clean prefix + k [MASK]): P(top-1 > 0.9) for k = "
            + " ".join(f"{k}:{last[f'probe_conf_k{k}']:.2f}" for k in ks)
        )
    with contextlib.redirect_stdout(io.StringIO()):
        model = load_model(args.run_dir)
    cfg = model.config
    spec = DecodeSpec(
        num_prompts=0,
        prompt_tokens=0,
        max_new_tokens=args.max_new_tokens,
        thresholds=(args.threshold,),
        windows=(args.window,),
        copy_prompts=args.prompts,
        families=decode_families(),  # threshold decoding, then verify mode
    )
    prompts = copy_prompts(cfg.data.data_path, cfg.data.split, model.tokenizer, spec)
    if not prompts:
        print("no held-out prompt with a period: nothing to decode")
        return 0
    rows = sweep(model, None, prompts, spec, greedy=True)
    ar, card, verify = rows
    print(f"== {len(prompts)} held-out prompts, greedy, {args.max_new_tokens} new tokens at most, KV cache:")
    print(f"   AR:   {ar['tokens_per_forward']:.2f} tokens per forward pass")
    print(
        f"   CARD: {card['tokens_per_forward']:.2f} tokens per forward pass (tau {args.threshold:g}, K {args.window}), "
        f"{card['speedup']:.2f}x AR's tokens/s; same text as AR for {card['same_as_first']:.0%} of the prompts"
    )
    print(
        f"   CARD verify (lossless): {verify['tokens_per_forward']:.2f} tokens per forward pass (K {args.window}), "
        f"{verify['speedup']:.2f}x AR's tokens/s; same text as AR for {verify['same_as_first']:.0%} of the prompts"
    )
    from card_megatron.inference.causal import CausalDecodeConfig
    from card_megatron.inference.generate import GenerationConfig, generate
    from card_megatron.inference.sampling import SamplingConfig

    gens, _ = generate(
        model,
        prompts[:1],
        GenerationConfig(
            decoding="card",
            causal=CausalDecodeConfig(window=args.window, threshold=args.threshold),
            max_new_tokens=args.max_new_tokens,
            sampling=SamplingConfig(greedy=True),
        ),
    )
    g = gens[0]
    print(
        f"== a sample: {g.prompt!r} -> {g.text!r}\n   ({len(g.token_ids)} tokens in {g.num_forward_passes} "
        f"forward passes: {g.tokens_per_forward:.2f} tokens per forward)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_tool(DemoReportOptions, run, argv, description=DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
