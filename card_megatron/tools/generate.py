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
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from card_megatron import cli
from card_megatron.cli import at_least, option, positive
from card_megatron.inference.causal import CausalDecodeConfig, CommitPolicy
from card_megatron.inference.generate import Decoding, GenerationConfig
from card_megatron.inference.sampling import SamplingConfig

DESCRIPTION = __doc__.split("\n\n")[0]
MODEL, DECODING = "model and prompts", "decoding"
SAMPLING = "sampling (probabilities in float64; [MASK], pad, bos and padded-vocabulary ids are never sampled)"
OUTPUT = "output and quality"

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


@dataclass
class GenerateOptions:
    """``python -m card_megatron.tools.generate``'s options (``card-generate``, ``tools/generate.py``); the
    library's defaults (``CausalDecodeConfig``, ``GenerationConfig``, ``SamplingConfig``) are the flags'."""

    checkpoint: str = option(metavar="PATH", group=MODEL)
    """A run directory (its newest checkpoint with an export), a checkpoint directory, or an export
    (export/, or its model.index.json; an older export's model.pt); any TP/PP/ZeRO layout."""
    ema: bool = option(False, group=MODEL)
    """Use the checkpoint's EMA weights (runs trained with optim.ema_decay > 0; an error otherwise).
    --judge always uses its checkpoint's trained weights."""
    prompt: list[str] = option(default_factory=list, metavar="TEXT", group=MODEL)
    """A prompt (repeatable); with no --prompt/--input-file: unconditional."""
    input_file: Optional[str] = option(None, metavar="FILE", group=MODEL)
    """Prompts: .jsonl/.json/.ndjson with a 'prompt' or 'text' key per line, else plain text with one
    prompt per line."""
    num_samples: int = option(1, metavar="N", range=at_least(1), group=MODEL)
    """Sequences per prompt (unconditional: N sequences)."""
    max_new_tokens: int = option(GenerationConfig.max_new_tokens, metavar="N", range=at_least(1), group=MODEL)
    """Stop a sequence after N new tokens (or at eos)."""
    max_context: Optional[int] = option(None, metavar="N", range=at_least(1), group=MODEL)
    """Refuse prompts whose tokens + max-new-tokens exceed N (default: model.seq_length)."""
    batch_size: int = option(GenerationConfig.batch_size, metavar="B", range=at_least(1), group=MODEL)
    """Sequences decoded together."""
    device: Optional[str] = option(None, group=MODEL)
    """cpu, cuda or cuda:N (default: cuda when available, else cpu)."""
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", group=MODEL)
    """Weights and KV cache dtype (sampling is always float64)."""

    decoding: Optional[Decoding] = option(None, group=DECODING)
    """Decoder (default: the checkpoint objective's: card for CARD, ar for ARM, mdlm for MDLM, bd3lm for
    BD3LM)."""
    threshold: float = option(CausalDecodeConfig.threshold, metavar="TAU", range=positive(), group=DECODING)
    """card: commit window positions whose top-1 probability exceeds TAU (TAU > 1 means one token per
    forward, identical to ar)."""
    window: int = option(CausalDecodeConfig.window, metavar="K", range=at_least(1), group=DECODING)
    """card: positions predicted per forward pass (ar uses 1)."""
    commit_policy: CommitPolicy = option(CausalDecodeConfig.commit_policy, group=DECODING)
    """card: which confident positions may be committed, or verify for lossless drafting (see below)."""
    lean: bool = option(CausalDecodeConfig.lean, group=DECODING)
    """card/ar: run Megatron's modules instead of the inference-only forward (same tokens, slower)."""
    cuda_graphs: bool = option(CausalDecodeConfig.cuda_graphs, group=DECODING)
    """card/ar: static shapes and one captured CUDA graph per pass shape on a GPU; on a CPU the
    static-shape path runs eagerly (same tokens, slower; see below)."""
    max_steps: Optional[int] = option(CausalDecodeConfig.max_steps, metavar="N", range=at_least(1), group=DECODING)
    """card: forward passes per sequence; the N-th commits everything still undecided (default: no limit)."""
    steps: Optional[int] = option(None, metavar="N", range=at_least(1), group=DECODING)
    """mdlm: denoising steps over the canvas (default max-new-tokens); bd3lm: steps per block (default
    block size)."""

    greedy: bool = option(SamplingConfig.greedy, group=SAMPLING)
    """Take the most likely token (same as --temperature 0)."""
    temperature: float = option(SamplingConfig.temperature, range=at_least(0, " (0 = greedy)"), group=SAMPLING)
    """Softmax temperature (0 = greedy)."""
    top_k: int = option(SamplingConfig.top_k, range=at_least(0, " (0 = off)"), group=SAMPLING)
    """Sample among the K most likely tokens (0 = off)."""
    top_p: float = option(SamplingConfig.top_p, range=(0.0, 1.0, False, True, ""), group=SAMPLING)
    """Nucleus sampling mass (1.0 = off)."""
    seed: int = option(SamplingConfig.seed, group=SAMPLING)
    """Sampling seed; each sequence draws from (seed, its index, position), so a sequence samples the same
    tokens alone or in a batch."""

    output: Optional[str] = option(None, metavar="FILE", group=OUTPUT)
    """Write the JSON lines here (atomically) instead of stdout."""
    judge: Optional[str] = option(None, metavar="CHECKPOINT", group=OUTPUT)
    """Score the generated text with this causal checkpoint (normally the ARM baseline): generative
    perplexity of the new tokens given the prompt."""
    judge_retokenize: bool = option(False, group=OUTPUT)
    """Allow a judge with another tokenizer by re-encoding prompt and generated text with it (otherwise a
    tokenizer mismatch is an error)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from :class:`GenerateOptions`."""
    return cli.build_parser(GenerateOptions, description=DESCRIPTION, epilog=EPILOG)


def run(args: GenerateOptions) -> int:
    """Argument values in, library calls out (``card_megatron.inference.generate``)."""
    from card_megatron.inference.generate import collect_prompts, generate_from_checkpoint
    from card_megatron.inference.records import check_writable, write_jsonl

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
    import yaml

    return cli.run_tool(
        GenerateOptions,
        run,
        argv,
        description=DESCRIPTION,
        epilog=EPILOG,
        errors=(ValueError, FileNotFoundError, yaml.YAMLError),
        error_status=2,
        error_prefix="generate.py: error: ",
    )


if __name__ == "__main__":
    sys.exit(main())
