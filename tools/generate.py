#!/usr/bin/env python
"""Generate text from a card_megatron checkpoint (CARD, ARM, MDLM or BD3LM), on CPU or one GPU.

  python tools/generate.py --checkpoint runs/demo --prompt "The default value of" --max-new-tokens 48
  python tools/generate.py --checkpoint runs/demo --input-file prompts.jsonl --threshold 0.7 \\
      --judge runs/demo-arm --output samples.jsonl

Prints one JSON object per generated sequence (stdout, or --output) and a summary on
stderr: tokens/s, tokens per forward pass and, with --judge, the judge's perplexity of
the generated text, its unigram entropy and the fraction of repeated 4-grams.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EPILOG = """\
decoders (default chosen by the checkpoint's objective):
  card   CARD dynamic parallel decoding with an exact KV cache: each forward pass reads the
         committed tokens not yet cached plus K-1 [MASK] positions and predicts a window of K
         positions (the output at position j predicts j+1); the window positions whose top-1
         probability exceeds --threshold are committed (always at least the leftmost).
  ar     one token per forward pass with the KV cache (for CARD and ARM checkpoints).
  mdlm   MDLM ancestral sampling over a [prompt, max-new-tokens masks] canvas (--steps steps;
         a step that unmasks nothing skips the next forward pass).
  bd3lm  BD3LM block by block (--steps steps per block) with an exact KV cache of clean blocks.

commit policy (card): 'prefix' (default) commits only the contiguous confident run from the left
  of the window, so every committed token is immediately part of the exact clean prefix and goes
  into the KV cache on the next pass, and no token is committed while a position before it is
  still undecided (the order autoregressive decoding would have used). 'any' also commits
  confident positions after an undecided one; they are re-read as clean inputs inside the window
  until the prefix reaches them. Both are lossy below tau = 1. 'verify' is lossless: the K-1
  positions after the committed text are drafted at [MASK] inputs, the next pass reads the drafts
  as inputs and verifies them (greedy: the longest run equal to the AR argmax, then one more token;
  sampling: the speculative-sampling rule), so the greedy output equals --decoding ar token for
  token and the sampled output has AR sampling's distribution; --threshold is not used.

lean path: the causal decoders run the model through an inference-only forward on the same
  weights (card_megatron/inference/lean.py); --no-lean runs Megatron's modules instead (the
  reference; same tokens, slower).

CUDA graphs (--cuda-graphs, card/ar): static shapes (attention over the whole preallocated KV
  cache, each pass padded to a fixed width, finished sequences kept in the batch and ignored) and,
  on a GPU, one CUDA graph captured per pass shape and replayed (the first pass of a shape runs
  eagerly, so a one-off prefill is never captured). The same tokens as without (tested on CPU, up
  to floating-point ties); on a CPU the static-shape path runs eagerly, which is slower.

prompts: every prompt is preceded by the document-boundary token (eos; the training stream never
  contains bos), so no prompt means unconditional generation. --max-context defaults to the
  training context (model.seq_length): RoPE can extrapolate beyond it, but quality is untested,
  so longer contexts must be asked for explicitly.

exit status: 0 on success, 2 for bad input (missing or corrupt checkpoint, tokenizer mismatch,
  prompt too long, bad flag values, an --output that cannot be written: checked before generating),
  with a one-line message."""


def build_parser() -> argparse.ArgumentParser:
    from card_megatron.inference.causal import COMMIT_POLICIES, CausalDecodeConfig
    from card_megatron.inference.generate import DECODINGS, GenerationConfig

    # the library's defaults are the flags' defaults
    causal, gen, samp = CausalDecodeConfig(), GenerationConfig(), GenerationConfig().sampling
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("model and prompts")
    g.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a run directory (its newest checkpoint with an export), a checkpoint directory, or an export "
        "(export/, or its model.index.json; an older export's model.pt); any TP/PP/ZeRO layout",
    )
    g.add_argument(
        "--ema",
        action="store_true",
        help="use the checkpoint's EMA weights (runs trained with optim.ema_decay > 0; an error "
        "otherwise). --judge always uses its checkpoint's trained weights",
    )
    g.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a prompt (repeatable); with no --prompt/--input-file: unconditional",
    )
    g.add_argument(
        "--input-file",
        metavar="FILE",
        help="prompts: .jsonl/.json/.ndjson with a 'prompt' or 'text' key per line, else plain text "
        "with one prompt per line",
    )
    g.add_argument(
        "--num-samples",
        type=int,
        default=1,
        metavar="N",
        help="sequences per prompt (unconditional: N sequences; default 1)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=gen.max_new_tokens,
        metavar="N",
        help="stop a sequence after N new tokens (or at eos; default %(default)s)",
    )
    g.add_argument(
        "--max-context",
        type=int,
        metavar="N",
        help="refuse prompts whose tokens + max-new-tokens exceed N (default: model.seq_length)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=gen.batch_size,
        metavar="B",
        help="sequences decoded together (default %(default)s)",
    )
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights and KV cache dtype (default float32; sampling is always float64)",
    )

    g = p.add_argument_group("decoding")
    g.add_argument(
        "--decoding",
        choices=DECODINGS,
        help="decoder (default: card for CARD, ar for ARM, mdlm for MDLM, bd3lm for BD3LM checkpoints)",
    )
    g.add_argument(
        "--threshold",
        type=float,
        default=causal.threshold,
        metavar="TAU",
        help="card: commit window positions whose top-1 probability exceeds TAU (> 0; TAU > 1 means "
        "one token per forward, identical to ar; default %(default)s)",
    )
    g.add_argument(
        "--window",
        type=int,
        default=causal.window,
        metavar="K",
        help="card: positions predicted per forward pass (default %(default)s; ar uses 1)",
    )
    g.add_argument(
        "--commit-policy",
        choices=COMMIT_POLICIES,
        default=causal.commit_policy,
        help="card: which confident positions may be committed, or verify for lossless drafting "
        "(default %(default)s; see below)",
    )
    g.add_argument(
        "--no-lean",
        dest="lean",
        action="store_false",
        help="card/ar: run Megatron's modules instead of the inference-only forward (same tokens, slower)",
    )
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="card/ar: static shapes and one captured CUDA graph per pass shape on a GPU; on a CPU the "
        "static-shape path runs eagerly (same tokens, slower; see below)",
    )
    g.add_argument(
        "--max-steps",
        type=int,
        default=causal.max_steps,
        metavar="N",
        help="card: forward passes per sequence; the N-th commits everything still undecided (default: no limit)",
    )
    g.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="mdlm: denoising steps over the canvas (default max-new-tokens); bd3lm: steps per block "
        "(default block size)",
    )

    g = p.add_argument_group(
        "sampling (probabilities in float64; [MASK], pad, bos and padded-vocabulary ids are never sampled)"
    )
    g.add_argument("--greedy", action="store_true", help="take the most likely token (same as --temperature 0)")
    g.add_argument(
        "--temperature",
        type=float,
        default=samp.temperature,
        help="softmax temperature (default %(default)s; 0 = greedy)",
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=samp.top_k,
        help="sample among the K most likely tokens (default %(default)s; 0 = off)",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=samp.top_p,
        help="nucleus sampling mass in (0, 1] (default %(default)s; 1.0 = off)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=samp.seed,
        help="sampling seed; each sequence draws from (seed, its index, position), so a sequence samples "
        "the same tokens alone or in a batch (default %(default)s)",
    )

    g = p.add_argument_group("output and quality")
    g.add_argument("--output", metavar="FILE", help="write the JSON lines here (atomically) instead of stdout")
    g.add_argument(
        "--judge",
        metavar="CHECKPOINT",
        help="score the generated text with this causal checkpoint (normally the ARM baseline): "
        "generative perplexity of the new tokens given the prompt",
    )
    g.add_argument(
        "--judge-retokenize",
        action="store_true",
        help="allow a judge with another tokenizer by re-encoding prompt and generated text with it "
        "(otherwise a tokenizer mismatch is an error)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Argument values in, library calls out (``card_megatron.inference.generate``)."""
    import torch

    from card_megatron.inference.causal import CausalDecodeConfig
    from card_megatron.inference.generate import GenerationConfig, collect_prompts, generate_from_checkpoint
    from card_megatron.inference.records import check_writable, write_jsonl
    from card_megatron.inference.sampling import SamplingConfig

    cfg = GenerationConfig(
        decoding=args.decoding,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        sampling=SamplingConfig(
            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
        ),
        causal=CausalDecodeConfig(
            window=args.window,
            threshold=args.threshold,
            commit_policy=args.commit_policy,
            max_steps=args.max_steps,
            lean=args.lean,
            cuda_graphs=args.cuda_graphs,
        ),
        steps=args.steps,
        max_context=args.max_context,
    )
    if args.output:
        check_writable(args.output)  # before loading and generating, not after
    prompts = collect_prompts(args.prompt, args.input_file, args.num_samples)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints build notes on stdout; keep it JSON only
        result = generate_from_checkpoint(
            args.checkpoint,
            prompts,
            cfg,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            ema=args.ema,
            judge=args.judge,
            judge_retokenize=args.judge_retokenize,
        )
    if args.output:
        write_jsonl(args.output, result.records)
    else:
        for record in result.records:
            print(json.dumps(record, ensure_ascii=False))
        sys.stdout.flush()
    for line in result.summary_lines():
        print(line, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from card_megatron import quiet_warnings

    quiet_warnings.install()
    import yaml

    try:
        return run(args)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("generate.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
