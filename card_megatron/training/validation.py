"""Validation: the perplexity over the validation set (exact for ARM and CARD, an upper bound for MDLM
and BD3LM), the EMA's with ``train.eval_ema``, and CARD's diagnostics (per-corruption NLL and accuracy,
the mask probe; ``diagnostics.py`` holds the sums), and the validation line of the log.

Each engine has its own NLL method, chosen once (:meth:`Validator.engine_nll` through the DeepSpeed
engine, :meth:`Validator.pipeline_nll` through the pipeline engine's ``eval_batch``).
"""

from __future__ import annotations

import math
from typing import Callable, ContextManager

import torch
import torch.distributed as dist

from card_megatron.config import Config
from card_megatron.objectives import LossInputs
from card_megatron.parallel.state import ParallelInfo
from card_megatron.training import diagnostics
from card_megatron.training.batches import Batches
from card_megatron.training.step import Losses


class Validator:
    """Validates the model that ``engine`` trains on ``batches``' validation split.

    ``ema_weights()`` is a context in which the model holds the EMA weights; ``diagnose`` whether
    CARD's diagnostics apply (``StepRunner.diagnose``)."""

    def __init__(
        self,
        cfg: Config,
        info: ParallelInfo,
        engine,
        losses: Losses,
        batches: Batches,
        ema_weights: Callable[[], ContextManager[None]],
        diagnose: bool,
    ):
        self.cfg, self.info, self.engine, self.losses, self.batches = cfg, info, engine, losses, batches
        self.ema_weights, self.diagnose = ema_weights, diagnose
        self.micro_batches = cfg.train.eval_iters * engine.gradient_accumulation_steps()  # of this rank
        self.nll_of_engine: Callable[[], float] = self.pipeline_nll if info.pp_size > 1 else self.engine_nll

    def evaluate(self) -> dict:
        """Validation perplexity: exact for ARM/CARD, an upper bound (ELBO) for MDLM/BD3LM.

        Returns val_nll, val_ppl, val_ppl_is_bound, with CARD's diagnostics (``val_ctx*``, ``probe_*``),
        and with train.eval_ema also ema_val_nll and ema_val_ppl (the same validation with the EMA weights).
        """
        nll = self.validation_nll()
        ev = {"val_nll": nll, "val_ppl": math.exp(min(nll, 50.0)), "val_ppl_is_bound": self.losses.objective.is_bound}
        if self.diagnose:
            ev.update(self.diagnostics())
        if self.cfg.train.eval_ema:
            with self.ema_weights():
                ema_nll = self.validation_nll()
            ev.update({"ema_val_nll": ema_nll, "ema_val_ppl": math.exp(min(ema_nll, 50.0))})
        return ev

    @torch.no_grad()
    def validation_nll(self) -> float:
        """Mean validation NLL per token over the whole validation set (every rank gets it)."""
        self.engine.eval()
        nll = self.nll_of_engine()
        self.engine.train()
        return nll

    def engine_nll(self) -> float:
        """:meth:`validation_nll` through the DeepSpeed engine: NLL sums reduced over data parallelism."""
        objective = self.losses.objective
        total, count = 0.0, 0.0
        for batch in self.batches.micro_batches("valid", 0, self.micro_batches):
            for mi, li in objective.eval_passes(batch["tokens"], batch["noise_seeds"], batch["sample_ids"]):
                logits = self.engine(mi.input_ids, mi.position_ids, mi.attention_mask)
                s, c = objective.nll_terms(self.losses.nll(logits, li), li)
                total += float(s)
                count += float(c)
        t = torch.tensor([total, count], dtype=torch.float64, device=self.info.device)
        dist.all_reduce(t, group=self.info.dp_group)
        return float(t[0] / t[1])

    def pipeline_nll(self) -> float:
        """:meth:`validation_nll` through the pipeline engine: the mean of its per-pass losses."""
        losses = []
        for batch in self.batches.micro_batches("valid", 0, self.micro_batches):
            passes = self.losses.objective.eval_passes(batch["tokens"], batch["noise_seeds"], batch["sample_ids"])
            items = iter([self.losses.pipeline_item(mi, li) for mi, li in passes])
            for _ in passes:
                losses.append(float(self.engine.eval_batch(items, num_micro_batches=1)))
        return sum(losses) / len(losses)

    @torch.no_grad()
    def diagnostics(self) -> dict:
        """Per-corruption metrics of a corrupted pass and the mask probe, over the validation batches."""
        lg, losses = self.cfg.logging, self.losses
        K = lg.probe_window
        context, probe = None, None
        self.engine.eval()
        for batch in self.batches.micro_batches("valid", 0, self.micro_batches):
            mi, li = losses.prepare(batch)  # noise from the validation seeds: the same every time
            logits = self.engine(mi.input_ids, mi.position_ids, mi.attention_mask)
            top1 = losses.top1_logprob(logits, li)  # before the NLL, which overwrites the logits
            sums = diagnostics.context_sums(losses.nll(logits, li), top1, li.is_masked)
            context = sums if context is None else context + sums
            for cut in range(lg.probe_cuts if K else 0):
                ids, pos, targets, gather = diagnostics.probe_batch(
                    batch["tokens"], batch["sample_ids"], K, losses.mask_id, cut, lg.probe_cuts, lg.probe_min_prefix
                )
                logits = self.engine(ids, pos, None)
                li = LossInputs(targets=targets, weights=None, normaliser=None, suppress_mask_logit=False)
                top1 = losses.top1_logprob(logits, li)
                sums = diagnostics.probe_sums(losses.nll(logits, li), top1, gather)
                probe = sums if probe is None else probe + sums
        out: dict = {}
        for sums, to_metrics in (
            (context, lambda s: diagnostics.context_metrics(s, "val_")),
            (probe, diagnostics.probe_metrics),
        ):
            if sums is not None:
                dist.all_reduce(sums, group=self.info.dp_group)
                out.update(to_metrics(sums))
        self.engine.train()
        return out


def format_eval(step: int, ev: dict) -> str:
    """The validation line of the log (step, NLL, perplexity, the probe, the EMA's)."""
    bound = "<= " if ev["val_ppl_is_bound"] else ""
    line = f"step {step:>7d} | validation nll {ev['val_nll']:.4f} | perplexity {bound}{ev['val_ppl']:.2f}"
    ks = sorted(int(k[len("probe_acc_k") :]) for k in ev if k.startswith("probe_acc_k"))
    if ks:  # what the parallel decoder can use: right / confident after k masks
        line += " | probe k: acc/conf " + " ".join(
            f"{k}:{ev[f'probe_acc_k{k}']:.2f}/{ev[f'probe_conf_k{k}']:.2f}" for k in ks
        )
    if "ema_val_nll" in ev:
        line += f" | EMA nll {ev['ema_val_nll']:.4f} | EMA perplexity {bound}{ev['ema_val_ppl']:.2f}"
    return line
