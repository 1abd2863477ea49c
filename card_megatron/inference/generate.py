"""Generation from a loaded checkpoint: choose the decoder, batch the prompts, time and count.

Decoders per training objective (its ``traits.decoders``): CARD -> ``card`` (dynamic
parallel decoding; ``ar`` also works, since a CARD model is an exact AR model on clean
text), ARM -> ``ar``, MDLM -> ``mdlm``, BD3LM -> ``bd3lm``. Other combinations are
refused (an ARM never saw [MASK]; MDLM/BD3LM are not causal).

Every prompt is preceded by the document-boundary token: the training stream is
documents each followed by eos (no bos ever occurs), so eos is what precedes the start
of a document. An empty prompt is therefore unconditional generation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, get_args

import torch

from card_megatron.inference import sampling
from card_megatron.inference.causal import CausalDecodeConfig, SpecialTokenIds, decode_causal
from card_megatron.inference.diffusion import decode_bd3lm, decode_mdlm
from card_megatron.objectives import objective_names, objective_traits

log = logging.getLogger(__name__)

Decoding = Literal["card", "ar", "mdlm", "bd3lm"]
DECODINGS = get_args(Decoding)  # which fit a checkpoint: its objective's traits.decoders


@dataclass
class GenerationConfig:
    """What to generate and how. ``None`` fields take the per-decoding defaults (see :func:`generate`).

    causal: CARD decoding's window K, threshold tau, commit policy and step limit (``ar`` uses
    the same with window 1); steps: MDLM (total) / BD3LM (per block); max_context: the longest
    prompt + max_new_tokens accepted (default model.seq_length).
    """

    decoding: Optional[Decoding] = None
    max_new_tokens: int = 64
    batch_size: int = 8
    sampling: sampling.SamplingConfig = field(default_factory=sampling.SamplingConfig)
    causal: CausalDecodeConfig = field(default_factory=CausalDecodeConfig)
    steps: Optional[int] = None
    max_context: Optional[int] = None

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be >= 1")


@dataclass
class Generation:
    """One generated sequence (``token_ids``: new tokens, eos included when it stopped there;
    ``prompt_ids``: the prompt's tokens; ``prompt_token_ids``: what the model was given, the
    document-boundary token first, so that another tool can replay the prompt exactly)."""

    index: int
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    stopped: str
    num_forward_passes: int
    seconds: float
    prompt_token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(self.num_forward_passes, 1)

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "prompt": self.prompt,
            "prompt_token_ids": self.prompt_token_ids,
            "text": self.text,
            "token_ids": self.token_ids,
            "num_new_tokens": len(self.token_ids),
            "stopped": self.stopped,
            "num_forward_passes": self.num_forward_passes,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "seconds": round(self.seconds, 4),
        }


def resolve_decoding(objective: str, decoding: Optional[str]) -> str:
    """The decoder for a checkpoint trained with ``objective``; ValueError for a nonsensical choice."""
    if objective not in objective_names():
        raise ValueError(
            f"checkpoint objective {objective!r} is unknown (expected one of {', '.join(objective_names())})"
        )
    traits = objective_traits(objective)
    if decoding is None:
        return traits.default_decoder
    if decoding not in DECODINGS:
        raise ValueError(f"--decoding {decoding!r} is unknown (choose one of {', '.join(DECODINGS)})")
    if decoding not in traits.decoders:
        raise ValueError(f"--decoding {decoding} does not fit this {objective} checkpoint: {traits.decoder_note}")
    return decoding


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, preceded by the document-boundary token (eos)."""
    return [[tokenizer.eos_id] + tokenizer.encode(p) for p in prompts]


def check_lengths(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, max_context: int) -> None:
    """ValueError naming the first prompt whose length + max_new_tokens exceeds max_context."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > max_context:
            raise ValueError(
                f"prompt {i} is {len(ids)} tokens (with the document-boundary token); with --max-new-tokens "
                f"{max_new_tokens} that is {len(ids) + max_new_tokens} > --max-context {max_context}"
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    loaded, prompts: Sequence[str], cfg: GenerationConfig, sequence_ids: Optional[Sequence[int]] = None
) -> tuple[list[Generation], dict]:
    """Generates a continuation of every prompt with ``loaded`` (a :class:`LoadedModel`).

    sequence_ids: one id per prompt for the sampling seeds (default 0..n-1). Returns the
    generations (input order) and run totals {"decoding", "new_tokens", "forward_passes",
    "model_calls", "seconds"}.
    """
    tokenizer, model, mcfg = loaded.tokenizer, loaded.model, loaded.config
    decoding = resolve_decoding(mcfg.objective.name, cfg.decoding)
    max_context = cfg.max_context or mcfg.model.seq_length
    if max_context > mcfg.model.seq_length:
        log.warning(
            "--max-context %d exceeds the training context %d: RoPE extrapolates, quality may drop",
            max_context,
            mcfg.model.seq_length,
        )
    prompt_ids = encode_prompts(tokenizer, prompts)
    check_lengths(prompt_ids, cfg.max_new_tokens, max_context)
    ids = list(range(len(prompts))) if sequence_ids is None else list(sequence_ids)
    special = SpecialTokenIds(eos=tokenizer.eos_id, mask=tokenizer.mask_id, pad=tokenizer.pad_id)
    banned = sampling.banned_token_mask(loaded.vocab_size, tokenizer, loaded.device)
    causal_cfg = dataclasses.replace(cfg.causal, window=1) if decoding == "ar" else cfg.causal
    results: list[Generation] = []
    totals = {"decoding": decoding, "new_tokens": 0, "forward_passes": 0, "model_calls": 0, "seconds": 0.0}
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompt_ids[start : start + cfg.batch_size]
        seeds = sampling.sequence_seeds(cfg.sampling.seed, torch.tensor(ids[start : start + len(batch)]))
        _sync(loaded.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if decoding in ("card", "ar"):
                outs, calls = decode_causal(
                    model, batch, cfg.max_new_tokens, special, banned, cfg.sampling, seeds, causal_cfg
                )
            elif decoding == "mdlm":
                outs, calls = decode_mdlm(
                    model,
                    batch,
                    cfg.max_new_tokens,
                    special,
                    banned,
                    cfg.sampling,
                    seeds,
                    cfg.steps or cfg.max_new_tokens,
                )
            else:
                block = mcfg.objective.block_size
                outs, calls = decode_bd3lm(
                    model, batch, cfg.max_new_tokens, special, banned, cfg.sampling, seeds, block, cfg.steps or block
                )
        _sync(loaded.device)
        seconds = time.perf_counter() - t0
        for k, out in enumerate(outs):
            i = start + k
            results.append(
                Generation(
                    index=ids[i],
                    prompt=prompts[i],
                    prompt_ids=prompt_ids[i][1:],
                    token_ids=out.token_ids,
                    text=tokenizer.decode(out.token_ids),
                    stopped=out.stopped,
                    num_forward_passes=out.num_forward_passes,
                    seconds=seconds,
                    prompt_token_ids=list(prompt_ids[i]),
                )
            )
            totals["new_tokens"] += len(out.token_ids)
            totals["forward_passes"] += out.num_forward_passes
        totals["model_calls"] += calls
        totals["seconds"] += seconds
    return results, totals


# --------------------------------------------------------------------------- from a checkpoint (tools/generate.py)


def collect_prompts(prompts: Sequence[str], input_file: Optional[str], num_samples: int) -> list[str]:
    """The prompts given, then those of ``input_file`` (``records.read_prompts``), each repeated
    ``num_samples`` times; no prompt at all means one unconditional prompt ("")."""
    from card_megatron.inference.records import read_prompts

    if num_samples < 1:
        raise ValueError(f"--num-samples ({num_samples}) must be >= 1")
    collected = list(prompts) + (read_prompts(input_file) if input_file else [])
    return [p for p in (collected or [""]) for _ in range(num_samples)]


def generation_records(
    generations: Sequence[Generation], judge_nll: Optional[Sequence[tuple[float, int]]] = None
) -> list[dict]:
    """The JSON object of each generation (the one place it is built): :meth:`Generation.to_json`,
    ``judge_nll`` (mean judge NLL per new token, with a judge), ``entropy`` and ``repetition_4gram``."""
    from card_megatron.inference import quality

    records = [g.to_json() for g in generations]
    if judge_nll is not None:
        for record, (total, count) in zip(records, judge_nll):
            record["judge_nll"] = round(total / count, 5) if count else None
    for record, g in zip(records, generations):
        record["entropy"] = round(quality.unigram_entropy(g.token_ids), 5)
        record["repetition_4gram"] = round(quality.repetition_rate(g.token_ids), 5)
    return records


@dataclass
class CheckpointGeneration:
    """What :func:`generate_from_checkpoint` returns: the JSON records (input order), the quality
    summary (``quality.summarise``), the run totals of :func:`generate`, the config it ran with
    (``decoding`` resolved), the loaded model and the judge's path (None without a judge)."""

    records: list[dict]
    summary: dict
    totals: dict
    cfg: GenerationConfig
    loaded: object
    judge_path: Optional[str]

    def summary_lines(self) -> list[str]:
        """Two human-readable lines: speed (tokens/s, tokens per forward) and quality."""
        t, cfg, loaded = self.totals, self.cfg, self.loaded
        seconds = max(t["seconds"], 1e-9)
        block = loaded.config.objective.block_size
        detail = {
            "card": f"verify (lossless), K {cfg.causal.window}"
            if cfg.causal.commit_policy == "verify"
            else f"tau {cfg.causal.threshold}, K {cfg.causal.window}, {cfg.causal.commit_policy}",
            "ar": "KV cache",
            "mdlm": f"steps {cfg.steps or cfg.max_new_tokens}",
            "bd3lm": f"block {block}, steps/block {cfg.steps or block}",
        }[cfg.decoding]
        graphs = ""
        if cfg.causal.cuda_graphs and cfg.decoding in ("card", "ar"):
            graphs = "; CUDA graphs" if loaded.device.type == "cuda" else "; static shapes (eager: no CUDA)"
        speed = (
            f"{len(self.records)} sequences, {t['new_tokens']} new tokens in {t['seconds']:.2f} s: "
            f"{t['new_tokens'] / seconds:.1f} tokens/s, "
            f"{t['new_tokens'] / max(t['forward_passes'], 1):.2f} tokens per forward "
            f"({t['forward_passes']} forward passes over the sequences, {t['model_calls']} batched model calls; "
            f"decoding {cfg.decoding}: {detail}; device {loaded.device}{'; EMA weights' if loaded.ema else ''}"
            f"{graphs})"
        )
        s = self.summary
        quality_line = f"quality: unigram entropy {s['entropy']:.3f} nats, repeated 4-grams {s['repetition_4gram']:.3f}"
        if self.judge_path is not None:
            quality_line += (
                f", judge perplexity {s['judge_ppl']:.2f} over {s['judge_tokens']} tokens ({self.judge_path})"
            )
        return [speed, quality_line]


def _warn_unused_settings(cfg: GenerationConfig, decoding: str) -> None:
    """Warns naming each decoding setting that differs from its default and has no effect here."""
    if decoding != "card":
        default = CausalDecodeConfig()
        for f in dataclasses.fields(CausalDecodeConfig):
            if decoding == "ar" and f.name in ("lean", "cuda_graphs"):
                continue  # AR runs through the same decoder (K = 1)
            if getattr(cfg.causal, f.name) != getattr(default, f.name):
                log.warning("--%s has no effect with --decoding %s", f.name.replace("_", "-"), decoding)
    if decoding in ("card", "ar") and cfg.steps is not None:
        log.warning("--steps has no effect with --decoding %s", decoding)


def generate_from_checkpoint(
    checkpoint: str,
    prompts: Sequence[str],
    cfg: GenerationConfig,
    *,
    device: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    ema: bool = False,
    judge: Optional[str] = None,
    judge_retokenize: bool = False,
) -> CheckpointGeneration:
    """Loads ``checkpoint`` (a run directory, checkpoint or export; its EMA weights with ``ema``),
    generates a continuation of every prompt and scores it (with ``judge``, a causal checkpoint:
    the judge's NLL of the new tokens; a judge with another tokenizer is refused before generating
    unless ``judge_retokenize``). Raises ValueError/FileNotFoundError naming what is wrong."""
    from card_megatron.inference import quality
    from card_megatron.inference.loading import load_model

    loaded = load_model(checkpoint, device=device, dtype=dtype, ema=ema)
    decoding = resolve_decoding(loaded.config.objective.name, cfg.decoding)
    cfg = dataclasses.replace(cfg, decoding=decoding)
    _warn_unused_settings(cfg, decoding)
    judge_model = load_model(judge, device=device, dtype=dtype) if judge else None
    if (
        judge_model is not None
        and not judge_retokenize
        and not quality.same_tokenizer(loaded.tokenizer, judge_model.tokenizer)
    ):
        quality.judge_generations(judge_model, [], loaded.tokenizer)  # raises the mismatch error before generating
    generations, totals = generate(loaded, prompts, cfg)
    nll = None
    if judge_model is not None:
        nll = quality.judge_generations(judge_model, generations, loaded.tokenizer, retokenize=judge_retokenize)
    summary = quality.summarise([g.token_ids for g in generations], nll)
    return CheckpointGeneration(
        records=generation_records(generations, nll),
        summary=summary,
        totals=totals,
        cfg=cfg,
        loaded=loaded,
        judge_path=judge_model.path if judge_model else None,
    )
