"""The engine step: the DeepSpeed engine (or pipeline engine) built once, its forward-backward-step
method, and the non-finite-loss policy.

Each engine has its own step method, chosen once when the engine is built (torchtitan's
``forward_backward_step`` / ``pp_forward_backward_step``): :meth:`StepRunner.engine_step` (the
DeepSpeed engine, pipeline size 1: per micro-batch forward, NLL, loss, backward) and
:meth:`StepRunner.pipeline_step` (DeepSpeed's pipeline engine: ``train_batch``). The non-finite-loss
policy lives in two methods: :meth:`StepRunner.nonfinite_micro_batch` (a zero loss is backpropagated
and the step skipped with learning rate 0; under ZeRO-3 it stops) and :meth:`StepRunner.count_step`
(skipped steps counted; ``train.max_nonfinite_steps`` in a row stop the run). :class:`Losses` turns
logits into per-token NLL and top-1 log-probabilities (the step and validation share it).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import clip_grad_norm_

from card_megatron.config import Config
from card_megatron.model.gpt import no_attention_mask, per_token_nll, per_token_top1_logprob
from card_megatron.objectives import LossInputs
from card_megatron.parallel.deepspeed_glue import MegatronMPU, deepspeed_config
from card_megatron.parallel.state import ParallelInfo, any_rank
from card_megatron.training import diagnostics

log = logging.getLogger("card_megatron")

# (loss: mean over micro-batches and data-parallel ranks, NaN after a non-finite one; metrics;
# whether a micro-batch had a non-finite loss; the gradient norm before clipping)
StepResult = tuple[Optional[float], dict, bool, Optional[float]]


class NonFiniteLossError(RuntimeError):
    pass


class Losses:
    """Objective inputs and per-token NLL from this rank's vocabulary shard of the logits.

    ``prepare(batch)`` -> (ModelInputs, LossInputs); ``nll(logits [B, S, V/tp], loss_inputs)`` -> [B, S];
    ``top1_logprob`` likewise (read it *before* the NLL, which overwrites fp32 logits in place)."""

    def __init__(self, objective, mask_id: int, vocab_start: int, info: ParallelInfo):
        self.objective, self.mask_id, self.vocab_start, self.info = objective, mask_id, vocab_start, info

    def prepare(self, batch: dict):
        return self.objective.prepare(batch["tokens"], batch["noise_seeds"], batch["sample_ids"])

    def nll(self, logits, loss_inputs):
        suppress = self.mask_id if loss_inputs.suppress_mask_logit else None
        return per_token_nll(logits, loss_inputs.targets, suppress, self.vocab_start, self.info.tp_group)

    def top1_logprob(self, logits, loss_inputs):
        suppress = self.mask_id if loss_inputs.suppress_mask_logit else None
        return per_token_top1_logprob(logits, suppress, self.vocab_start, self.info.tp_group)

    def pipeline_item(self, model_inputs, loss_inputs):
        """One micro-batch as the pipeline engine takes it: (inputs, labels), tensors only."""
        mask = model_inputs.attention_mask
        mask = mask.long() if mask is not None else no_attention_mask(self.info.device)
        suppress = torch.tensor(1 if loss_inputs.suppress_mask_logit else 0, device=self.info.device)
        return (
            (model_inputs.input_ids, model_inputs.position_ids, mask),
            (loss_inputs.targets, loss_inputs.weights, loss_inputs.normaliser.reshape(1).float(), suppress),
        )

    def pipeline_loss(self, logits, labels):
        """The loss function of the pipeline's last stage (labels from :meth:`pipeline_item`)."""
        targets, weights, normaliser, suppress = labels
        li = LossInputs(
            targets=targets,
            weights=weights,
            normaliser=normaliser.reshape(()),
            suppress_mask_logit=bool(suppress.item()),
            is_masked=None,
        )
        loss, _ = self.objective.loss(self.nll(logits, li), li)
        return loss


def build_engine(model: torch.nn.Module, cfg: Config, info: ParallelInfo):
    """AdamW over the trainable parameters (matrices decay, the rest not) and the DeepSpeed engine
    (pipeline engine with pipeline size > 1); returns (engine, optimizer, DeepSpeed config)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # optim.freeze_layers: frozen layers get no optimizer state
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
        eps=cfg.optim.adam_eps,
        fused=True,  # one kernel per step, on CPUs too (the for-loop AdamW cost 2-3x the time on the CPU)
    )
    ds_config = deepspeed_config(
        cfg.train, cfg.optim, cfg.parallel.zero_stage, info.dp_size, info.device.type == "cuda"
    )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config,
        mpu=MegatronMPU(info) if info.pp_size == 1 else None,
    )
    return engine, optimizer, ds_config


class StepRunner:
    """One optimizer step of the engine over its micro-batches, and the non-finite-loss policy.

    ``stop_asked_here()`` says whether this rank was asked to stop; a step that reads flags from
    the device anyway carries it along and leaves the answer in :attr:`stop_flag` (else None)."""

    def __init__(self, cfg: Config, info: ParallelInfo, engine, optimizer, losses: Losses, stop_asked_here):
        self.cfg, self.info, self.engine, self.optimizer, self.losses = cfg, info, engine, optimizer, losses
        self.model = engine.module
        self.accumulation: int = engine.gradient_accumulation_steps()
        self.stop_asked_here: Callable[[], bool] = stop_asked_here
        self.stop_flag: Optional[bool] = None
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        # (micro-batches, whether the step is logged, the step's number) -> StepResult
        self.run: Callable[[Iterator[dict], bool, int], StepResult] = (
            self.pipeline_step if info.pp_size > 1 else self.engine_step
        )

    @property
    def diagnose(self) -> bool:
        """Per-corruption metrics apply to CARD (masked inputs, causal: ``traits.mask_diagnostics``) outside
        the pipeline engine."""
        return (
            self.cfg.logging.corruption_metrics
            and self.losses.objective.traits.mask_diagnostics
            and self.info.pp_size == 1
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def engine_step(self, batches: Iterator[dict], step_logged: bool, step: int) -> StepResult:
        """Forward and backward of each micro-batch through the DeepSpeed engine, then its optimizer step.

        Loss, metrics and gradient norm are read only when ``step_logged`` (None and {} otherwise). The
        non-finite check (``train.max_nonfinite_steps`` > 0) reads one flag per micro-batch before its
        backward, together, on the last one, with the stop request. ``step`` is the step about to end.
        """
        cfg, losses = self.cfg, self.losses
        check = cfg.train.max_nonfinite_steps > 0
        metrics: dict = {}
        bad = False
        grad_norm = None
        context = None  # per-corruption sums of this step (CARD, logged steps only)
        total = torch.zeros((), dtype=torch.float64, device=self.info.device)  # sum of the finite losses
        for m, batch in enumerate(batches):
            last = m == self.accumulation - 1
            model_inputs, loss_inputs = losses.prepare(batch)
            logits = self.engine(model_inputs.input_ids, model_inputs.position_ids, model_inputs.attention_mask)
            top1 = losses.top1_logprob(logits, loss_inputs) if step_logged and self.diagnose else None
            nll = losses.nll(logits, loss_inputs)
            loss, micro_metrics = losses.objective.loss(nll, loss_inputs)
            micro_bad = False
            if check:
                stop_asked = self.stop_asked_here() if last else False
                micro_bad, stop = any_rank(self.info.device, ~torch.isfinite(loss.detach()), stop_asked)
                if last:
                    self.stop_flag = stop
            if micro_bad:
                bad = True
                self.engine.backward(self.nonfinite_micro_batch(step))
            else:
                total += loss.detach()
                if top1 is not None:
                    sums = diagnostics.context_sums(nll, top1, loss_inputs.is_masked)
                    context = sums if context is None else context + sums
                self.engine.backward(loss)
                if step_logged:
                    for k, v in micro_metrics.items():
                        metrics[k] = metrics.get(k, 0.0) + v.detach() / self.accumulation
            if last:
                if bad:
                    self.set_lr(0.0)  # parameters stay unchanged: the step is skipped
                if cfg.parallel.zero_stage == 0 and step_logged:
                    grad_norm = self.grad_norm()
            self.engine.step()
        if not step_logged:
            return None, {}, bad, None
        if cfg.parallel.zero_stage > 0:
            grad_norm = self.engine.get_global_grad_norm()
        metrics = {k: float(v) for k, v in metrics.items()}
        # Mean over micro-batches, then over data-parallel ranks.
        t = total / self.accumulation
        dist.all_reduce(t, group=self.info.dp_group)
        loss_value = float(t.item()) / self.info.dp_size if not bad else float("nan")
        if context is not None:
            dist.all_reduce(context, group=self.info.dp_group)
            metrics.update(diagnostics.context_metrics(context))
        return loss_value, metrics, bad, grad_norm

    def pipeline_step(self, batches: Iterator[dict], step_logged: bool, step: int) -> StepResult:
        """The whole step through DeepSpeed's pipeline engine (``train_batch``); same returns as
        :meth:`engine_step` (no per-micro-batch metrics; the gradient norm comes from the engine)."""
        items = (self.losses.pipeline_item(*self.losses.prepare(b)) for b in batches)
        loss_value = float(self.engine.train_batch(data_iter=items))  # the pipeline engine reads it anyway
        self.stop_flag = any_rank(self.info.device, self.stop_asked_here())[0]
        # Under pipeline parallelism the pipeline engine owns the step: whether a non-finite
        # loss skips the update is DeepSpeed's decision (ZeRO-1 in fp32/fp16 skips on an
        # invalid gradient norm). It is counted here all the same.
        return loss_value, {}, not math.isfinite(loss_value), self.engine.get_global_grad_norm()

    # ------------------------------------------------------------------ the non-finite-loss policy

    def nonfinite_micro_batch(self, step: int) -> torch.Tensor:
        """What a micro-batch with a non-finite loss backpropagates: a finite loss whose gradient is zero
        everywhere (the step is then skipped with learning rate 0). Under ZeRO-3 a step cannot be
        skipped safely: raises."""
        if self.cfg.parallel.zero_stage == 3:
            raise NonFiniteLossError(f"non-finite loss at step {step}; under ZeRO-3 a step cannot be skipped safely")
        return sum((p.reshape(-1)[:1] * 0.0).sum() for p in self.model.parameters() if p.requires_grad)

    def count_step(self, bad: bool, step: int) -> None:
        """Counts a step whose loss was non-finite (``bad``) and stops the run after
        train.max_nonfinite_steps of them in a row; a finite step resets the count."""
        if not bad or self.cfg.train.max_nonfinite_steps == 0:  # 0: no check
            self.consecutive_nonfinite = 0
            return
        self.skipped_steps += 1
        self.consecutive_nonfinite += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", step, self.consecutive_nonfinite)
        limit = self.cfg.train.max_nonfinite_steps
        if self.consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss (train.max_nonfinite_steps="
                f"{limit}); stopping. Lower optim.lr or check the data."
            )

    def grad_norm(self) -> float:
        """Global gradient norm before clipping (DeepSpeed reports it only under ZeRO)."""
        # max_norm=inf: measure only (tensor-parallel shards counted once, replicas once).
        return float(clip_grad_norm_(list(self.model.parameters()), max_norm=float("inf"), mpu=MegatronMPU(self.info)))
