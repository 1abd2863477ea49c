"""lm-eval-harness model adapter: ``lm_eval --model card_megatron --model_args checkpoint=RUN``.

Registered as ``card_megatron`` when this module is imported; ``tools/run_lm_eval.py`` imports it
and runs lm-eval's own command line (lm-eval has no plugin discovery for models), and
``lm_eval.simple_evaluate(model=CardMegatronLM(checkpoint=...), ...)`` works from Python.

* ``loglikelihood`` (multiple-choice tasks) and ``loglikelihood_rolling`` (perplexity tasks):
  exact log-probabilities of causal checkpoints (ARM, CARD), from clean left context, the
  document-boundary token (eos) first as in training; a context longer than
  ``model.seq_length`` keeps its last tokens (rolling windows use lm-eval's own
  ``get_rolling_token_windows``), and a continuation longer than ``seq_length`` is scored with
  rolling windows of ``seq_length`` tokens (never cut). MDLM has no exact likelihood: it gets the conditional ELBO
  (a lower bound on log p(continuation | context)), a Monte-Carlo estimate over ``mc_samples``
  stratified noise levels t, each continuation token masked with probability t (the context
  stays clean), ``sum over masked tokens of log p / t``, averaged; ``is_greedy`` is whether the
  argmax with the whole continuation masked is the continuation; a continuation longer than
  ``seq_length`` is refused (ValueError). BD3LM is refused (its block
  structure has no conditional estimate here; ``tools/evaluate.py`` reports its bound).
* ``generate_until``: our decoders (:func:`card_megatron.inference.generate.generate`), CARD's
  parallel decoder by default for CARD checkpoints (``decoding``, ``threshold``, ``window``
  model args), greedy unless the task asks for sampling; the text is cut at the first
  ``until`` string. eos + prompt + ``max_gen_toks`` must fit ``seq_length``: the prompt keeps its
  last tokens (cut from the left, as lm-eval's HF backend does) and at least half the context,
  the generation is shortened when it would leave less; both are logged as warnings.

Model args: ``checkpoint`` (required), ``decoding`` (card | ar | mdlm | bd3lm), ``threshold``,
``window``, ``max_gen_toks`` (default 256), ``mc_samples`` (MDLM, default 128), ``seed``, ``device``,
``ema``; the batch size is lm-eval's ``--batch_size``. An unknown key (``treshold=0.5``) or a bad
value (``threshold=abc``, ``window=-1``, a missing checkpoint) raises :class:`ModelArgsError`, one
line per problem, before anything is loaded (the checkpoint last); ``tools/run_lm_eval.py`` prints
it without a traceback.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections import defaultdict
from typing import Any, Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from card_megatron.inference.causal import CausalDecodeConfig
from card_megatron.objectives import objective_traits
from card_megatron.objectives.traits import MASK_KIND_TEXT

logger = logging.getLogger(__name__)
# The model args a user may give (--model_args), and the keys lm-eval itself passes to the constructor.
MODEL_ARGS = ("checkpoint", "decoding", "threshold", "window", "max_gen_toks", "mc_samples", "seed", "device", "ema")
LM_EVAL_ARGS = ("batch_size", "max_batch_size")


class ModelArgsError(ValueError):
    """Bad ``--model_args`` of the card_megatron model: one line per problem (no traceback needed)."""


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _parse_int(value: Any, minimum: int) -> Optional[int]:
    """``value`` as an int >= ``minimum`` (lm-eval hands over ints, or text it could not type), else None."""
    if isinstance(value, bool) or isinstance(value, float):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"[+-]?\d+", value):
            return None
    number = int(value)
    return number if number >= minimum else None


def _parse_float(value: Any) -> Optional[float]:
    """``value`` as a finite float > 0, else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def check_model_args(
    decoding: Any = None,
    threshold: Any = None,
    window: Any = None,
    batch_size: Any = 8,
    max_gen_toks: Any = 256,
    ema: Any = False,
    mc_samples: Any = 128,
    seed: Any = 0,
    unknown: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The model args parsed and checked (all of them: the checkpoint is checked when it is loaded);
    raises :class:`ModelArgsError` listing every problem, one per line."""
    from card_megatron.inference.generate import DECODINGS

    problems = []
    for key in sorted(unknown or {}):
        close = difflib.get_close_matches(key, MODEL_ARGS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"unknown model arg {key}={unknown[key]}{hint}; valid ones: {', '.join(MODEL_ARGS)}")
    out: dict[str, Any] = {}
    if decoding is not None and decoding not in DECODINGS:
        problems.append(f"model arg decoding={decoding} is not one of {', '.join(DECODINGS)}")
    out["decoding"] = decoding
    for key, value, parse, need in (
        ("threshold", threshold, _parse_float, "a number > 0 (tau; > 1 means one token per step)"),
        ("window", window, lambda v: _parse_int(v, 1), "an integer >= 1"),
        ("max_gen_toks", max_gen_toks, lambda v: _parse_int(v, 1), "an integer >= 1"),
        ("mc_samples", mc_samples, lambda v: _parse_int(v, 1), "an integer >= 1"),
        ("seed", seed, lambda v: _parse_int(v, 0), "an integer >= 0"),
        ("batch_size", batch_size, lambda v: 8 if str(v).startswith("auto") else _parse_int(v, 1), "an integer >= 1"),
    ):
        if value is None and key in ("threshold", "window"):
            out[key] = None  # the decoder's own default (CausalDecodeConfig)
            continue
        parsed = parse(value)
        if parsed is None:
            problems.append(f"model arg {key}={value} must be {need}")
        out[key] = parsed
    if str(ema).lower() not in ("true", "false", "1", "0", "yes", "no"):
        problems.append(f"model arg ema={ema} must be true or false")
    out["ema"] = _as_bool(ema)
    if problems:
        raise ModelArgsError("\n".join(problems))
    return out


def check_model_arg_dict(model_args: dict[str, Any]) -> None:
    """``--model_args`` as lm-eval parsed them, checked before lm-eval indexes its tasks (which takes
    minutes on a loaded machine): :class:`ModelArgsError` listing every problem, a missing
    ``checkpoint`` or one that is not found included."""
    from card_megatron.rundir import resolve_export_dir

    values = {k: v for k, v in model_args.items() if k in MODEL_ARGS and k not in ("checkpoint", "device")}
    unknown = {k: v for k, v in model_args.items() if k not in MODEL_ARGS + LM_EVAL_ARGS}
    problems = []
    try:
        check_model_args(**values, unknown=unknown)
    except ModelArgsError as e:
        problems += str(e).splitlines()
    if "checkpoint" not in model_args:
        problems.append("model arg checkpoint is missing (checkpoint=a run directory, a checkpoint or an export)")
    else:
        try:
            resolve_export_dir(str(model_args["checkpoint"]))
        except (ValueError, FileNotFoundError) as e:
            problems.append(f"model arg checkpoint={model_args['checkpoint']}: {e}")
    if problems:
        raise ModelArgsError("\n".join(problems))


@register_model("card_megatron")
class CardMegatronLM(TemplateLM):
    """A card_megatron checkpoint as an lm-eval-harness ``LM`` (see the module docstring)."""

    def __init__(
        self,
        checkpoint: str,
        decoding: Optional[str] = None,
        threshold: Optional[float] = None,
        window: Optional[int] = None,
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        device: Optional[str] = None,
        ema: bool | str = False,
        mc_samples: int = 128,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from card_megatron.inference.generate import resolve_decoding
        from card_megatron.inference.loading import load_model

        unknown = {k: v for k, v in kwargs.items() if k not in LM_EVAL_ARGS}
        args = check_model_args(decoding, threshold, window, batch_size, max_gen_toks, ema, mc_samples, seed, unknown)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device %s requested (lm-eval's default) but CUDA is not available: using the CPU", device)
            device = "cpu"
        try:
            self.loaded = load_model(str(checkpoint), device=device, ema=args["ema"])
        except (ValueError, FileNotFoundError) as e:
            raise ModelArgsError(f"model arg checkpoint={checkpoint}: {e}") from None
        self.objective = self.loaded.config.objective.name
        self.traits = objective_traits(self.objective)  # what lm-eval can do with it
        if decoding is not None:
            try:
                resolve_decoding(self.objective, decoding)
            except ValueError as e:
                raise ModelArgsError(f"model arg decoding={decoding}: {e}") from None
        self.decoding = decoding
        # The decoder's defaults live in CausalDecodeConfig only; model_args override them.
        self.causal = CausalDecodeConfig(**{k: args[k] for k in ("window", "threshold") if args[k] is not None})
        self.batch_size = args["batch_size"]
        self.max_gen_toks = args["max_gen_toks"]
        self.mc_samples = args["mc_samples"]
        self.seed = args["seed"]
        self.max_length = self.loaded.config.model.seq_length
        self.tok = self.loaded.tokenizer

    # -- tokenization (TemplateLM) ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eos_id  # the document boundary every training document follows

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split of context and continuation, the context preceded by the document boundary
        (lm-eval itself adds it only to an empty context)."""
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        return [self.prefix_token_id] + context_enc, continuation_enc

    # -- scoring ---------------------------------------------------------------------
    def _require_loglikelihood(self, what: str) -> None:
        if self.traits.lm_eval_loglikelihood == "refused":
            raise NotImplementedError(
                f"{what}: this {self.objective} checkpoint has {MASK_KIND_TEXT[self.traits.mask_kind]} attention and "
                "no exact or conditional likelihood here; score it with tools/evaluate.py (an upper bound), or "
                "evaluate generate_until tasks"
            )

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""
        self._require_loglikelihood("loglikelihood")
        if self.traits.lm_eval_loglikelihood == "bound":
            return [self._masked_diffusion_loglikelihood(list(ctx), list(cont)) for _, ctx, cont in requests]
        pieces = [self._rolling_pieces(list(ctx), list(cont)) for _, ctx, cont in requests]
        flat = [(None, ctx, cont) for p in pieces for ctx, cont in p]
        scores = self._score_fitting(flat)
        results: list[tuple[float, bool]] = []
        for p in pieces:
            mine, scores = scores[: len(p)], scores[len(p) :]
            results.append((sum(s for s, _ in mine), all(g for _, g in mine)))
        return results

    def _rolling_pieces(self, context: list[int], continuation: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) pairs that each fit one window of ``seq_length`` inputs.

        A continuation of at most L tokens is one piece (its context keeps its last tokens). A longer
        one is scored with rolling windows, as ``loglikelihood_rolling`` scores a document: chunks of
        L tokens, each read by the L inputs that end just before its last token, so every token is
        scored from at least one token of left context and the sum is log p(continuation | context).
        """
        if not continuation:
            raise ValueError("lm-eval request with an empty continuation")
        if not context:
            raise ValueError("lm-eval request with an empty context (lm-eval gives at least the prefix token)")
        L = self.max_length
        if len(continuation) <= L:
            return [(context, continuation)]
        logger.info(
            "loglikelihood: a continuation of %d tokens exceeds seq_length %d; scored with rolling windows",
            len(continuation),
            L,
        )
        whole, start = context + continuation, len(context)
        return [(whole[:a], whole[a : min(a + L, len(whole))]) for a in range(start, len(whole), L)]

    def _score_fitting(self, requests) -> list[tuple[float, bool]]:
        """:meth:`_loglikelihood_tokens` for (context, continuation) pairs whose continuation fits L."""
        model, dev, L = self.loaded.model, self.loaded.device, self.max_length
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            seqs, conts = [], []
            for _, context, continuation in batch:
                assert 0 < len(continuation) <= L, "split by _rolling_pieces"
                whole = (list(context) + list(continuation))[-(L + 1) :]
                seqs.append(whole[:-1])
                conts.append(list(continuation))  # whole holds it all: len(continuation) <= L
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), self.tok.eos_id, dtype=torch.long)
            for i, s in enumerate(seqs):  # right padding: causal attention never sees it
                ids[i, : len(s)] = torch.tensor(s)
            pos = torch.arange(width).expand_as(ids)
            logits = model(ids.to(dev), pos.to(dev)).transpose(0, 1).double()  # [B, S, V]
            logp = torch.log_softmax(logits, dim=-1)
            for i, (s, cont) in enumerate(zip(seqs, conts)):
                rows = logp[i, len(s) - len(cont) : len(s)]
                target = torch.tensor(cont, device=rows.device)
                total = float(rows.gather(1, target[:, None]).sum())
                greedy = bool((rows.argmax(dim=-1) == target).all())
                results.append((total, greedy))
        return results

    @torch.no_grad()
    def _masked_diffusion_loglikelihood(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """MDLM's conditional ELBO of ``continuation`` given ``context`` (module docstring); the
        model reads the last ``seq_length`` tokens (no shift), continuation last."""
        if not continuation:
            raise ValueError("lm-eval request with an empty continuation")
        if len(continuation) > self.max_length:
            raise ValueError(
                f"loglikelihood: the continuation is {len(continuation)} tokens, longer than this MDLM "
                f"checkpoint's model.seq_length ({self.max_length}); its conditional ELBO needs the whole "
                "continuation in one window (no rolling estimate here): use a shorter continuation"
            )
        whole = (context + continuation)[-self.max_length :]
        n_cont = len(continuation)
        n, dev, mask_id = self.mc_samples, self.loaded.device, self.tok.mask_id
        gen = torch.Generator().manual_seed(self.seed)
        t = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # stratified noise levels
        is_masked = torch.rand(n, n_cont, dtype=torch.float64, generator=gen) < t[:, None]
        x0 = torch.tensor(whole, dtype=torch.long)
        xt = x0.repeat(n + 1, 1)
        tail = xt[:, len(whole) - n_cont :]
        tail[:n][is_masked] = mask_id
        tail[n] = mask_id  # the greedy check: the whole continuation masked
        targets = x0[len(whole) - n_cont :].to(dev)
        logp_rows = []
        for start in range(0, n + 1, self.batch_size):
            ids = xt[start : start + self.batch_size].to(dev)
            logits = self.loaded.model(ids, torch.arange(len(whole), device=dev).expand_as(ids)).transpose(0, 1)
            logits = logits[:, len(whole) - n_cont :].double()
            logits[..., mask_id] = float("-inf")  # SUBS, as in training
            logp = torch.log_softmax(logits, dim=-1)
            logp_rows.append(logp)
        logp = torch.cat(logp_rows)  # [n + 1, n_cont, V]
        token_logp = logp[:n].gather(-1, targets.expand(n, n_cont)[..., None])[..., 0]
        bound = float(((token_logp * is_masked.to(dev)).sum(1) / t.to(dev)).mean())
        greedy = bool((logp[n].argmax(-1) == targets).all())
        return bound, greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) from rolling windows of ``seq_length`` tokens (lm-eval's windowing)."""
        self._require_loglikelihood("loglikelihood_rolling")
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out

    # -- generation ------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations from our decoders, cut at the first ``until`` string."""
        if not self.traits.lm_eval_generation:
            raise NotImplementedError(f"generate_until: the lm-eval adapter does not generate from {self.objective}")
        from card_megatron.inference.generate import GenerationConfig, generate
        from card_megatron.inference.sampling import SamplingConfig

        groups: dict[str, list[int]] = defaultdict(list)
        args = [r.args for r in requests]
        for i, (_, gen_kwargs) in enumerate(args):
            groups[repr(sorted(gen_kwargs.items()))].append(i)
        out: list[Optional[str]] = [None] * len(args)
        for indices in groups.values():
            kw = dict(args[indices[0]][1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            sample = _as_bool(kw.pop("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
            samp = (
                SamplingConfig(
                    temperature=float(kw.get("temperature", 1.0)),
                    top_p=float(kw.get("top_p", 1.0)),
                    top_k=int(kw.get("top_k", 0) or 0),
                )
                if sample
                else SamplingConfig(greedy=True)
            )
            prompts, max_new = self._fit_prompts([args[i][0] for i in indices], max_new)
            cfg = GenerationConfig(
                decoding=self.decoding,
                max_new_tokens=max_new,
                batch_size=self.batch_size,
                sampling=samp,
                causal=self.causal,
            )
            gens, _ = generate(self.loaded, prompts, cfg)
            for i, g in zip(indices, gens):
                text = g.text
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out[i] = text
        return out  # type: ignore[return-value]

    def _fit_prompts(self, prompts: list[str], max_new: int) -> tuple[list[str], int]:
        """Prompts and a generation length that fit ``seq_length``: eos + prompt + max_new <= L.

        As lm-eval's HF backend does, the prompt is kept and cut from the left (its last tokens stay)
        to leave room for generation. When the requested ``max_gen_toks`` would leave a long prompt
        less than half the context, generation is shortened instead (to L - 1 - L // 2 at least), so
        the default 256 never leaves the decoder an empty prompt at L = 128. Warns whenever a prompt
        is cut or the generation shortened. Returns (prompts, max_new).
        """
        L = self.max_length
        lengths = [len(self.tok.encode(p)) for p in prompts]
        keep = min(max(lengths, default=0), L // 2)  # prompt tokens guaranteed to stay
        fitted_new = max(1, min(max_new, L - 1 - keep))
        if fitted_new < max_new:
            logger.warning(
                "generate_until: max_gen_toks %d shortened to %d so that the prompt (up to %d tokens) keeps "
                "at least %d tokens of the %d-token context (model.seq_length)",
                max_new, fitted_new, max(lengths, default=0), keep, L,
            )  # fmt: skip
        room = L - 1 - fitted_new
        out = []
        for prompt, n in zip(prompts, lengths):
            if n <= room:
                out.append(prompt)
                continue
            ids = self.tok.encode(prompt)
            cut = n - room
            text = self.tok.decode(ids[cut:])
            while len(self.tok.encode(text)) > room:  # re-encoding the cut text may merge differently
                cut += 1
                text = self.tok.decode(ids[cut:])
            logger.warning(
                "generate_until: a %d-token prompt was cut from the left to its last %d tokens to leave room "
                "for %d new tokens in the %d-token context (model.seq_length)",
                n, n - cut, fitted_new, L,
            )  # fmt: skip
            out.append(text)
        return out, fitted_new
