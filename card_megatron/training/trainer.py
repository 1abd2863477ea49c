"""The training loop: one objective, one model, DeepSpeed for ZeRO, pipelining and checkpoints.

Nothing here is objective-specific: the objective turns clean samples into model
inputs and loss inputs, and turns per-token NLL into the loss.

Each engine has its own step and validation methods, chosen once when the engine is built
(torchtitan's ``forward_backward_step`` / ``pp_forward_backward_step``): the DeepSpeed
engine (pipeline size 1: :meth:`Trainer._engine_step`, :meth:`Trainer._engine_validation_nll`)
and DeepSpeed's pipeline engine (:meth:`Trainer._pipeline_step`,
:meth:`Trainer._pipeline_validation_nll`). :meth:`Trainer.train_step` around them sets the
learning rate, updates the EMA and applies the non-finite-loss policy (one place:
:meth:`Trainer._nonfinite_micro_batch`, :meth:`Trainer._count_step`). Process groups come
from ``self.info`` (``parallel/state.py``), never from Megatron's globals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import resource
import signal
import time
from typing import Callable, ContextManager, Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist
import yaml
from deepspeed.runtime.utils import clip_grad_norm_

from card_megatron.config import Config, ConfigError, config_to_dict, resume_changes, save_config, validate
from card_megatron.data import MicroBatchSampler, build_datasets, collate
from card_megatron.data.dataset import data_identity, data_identity_changes
from card_megatron.lock import ExclusiveLock, LockHeldError
from card_megatron.model.compile import compile_layers, use_compiled_layers
from card_megatron.model.gpt import CardGPT, no_attention_mask, padded_vocab_size, per_token_nll, per_token_top1_logprob
from card_megatron.model.pipeline import build_pipeline_model
from card_megatron.model.sharded_export import ShardPart, local_pieces
from card_megatron.objectives import LossInputs, build_objective
from card_megatron.parallel.deepspeed_glue import MegatronMPU, deepspeed_config, resolve_dtype
from card_megatron.parallel.state import ParallelInfo, init_distributed
from card_megatron.rundir import latest_checkpoint
from card_megatron.tokenizers import load_tokenizer
from card_megatron.training import checkpoint as ckpt
from card_megatron.training import diagnostics
from card_megatron.training.ema import EMA
from card_megatron.training.init_from import InitWeights, freeze_first_layers, read_init_weights
from card_megatron.training.metrics import MetricsWriter, format_step, model_flops_per_token, peak_flops
from card_megatron.training.schedule import learning_rate

log = logging.getLogger("card_megatron")

RUN_LOCK = "run.lock"  # held by rank 0 for the whole run: one trainer per run directory


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """Builds everything from a Config and trains. ``Trainer(cfg).train()``."""

    def __init__(self, cfg: Config, info: Optional[ParallelInfo] = None):
        self.cfg = cfg
        self.info = info or init_distributed(cfg.parallel)
        validate(cfg, self.info.world_size)
        self.is_rank0 = self.info.rank == 0
        self.run_dir = cfg.train.run_dir
        if self.is_rank0:
            os.makedirs(self.run_dir, exist_ok=True)
        self._run_lock = self._lock_run_dir()
        try:
            self._build()
        except BaseException:
            if self._run_lock is not None:
                self._run_lock.release()
            raise

    def _build(self) -> None:
        """Everything after the run directory is locked: model, engine, EMA, data, resume, metrics."""
        cfg = self.cfg
        self._stop_requested = False
        self._stop_flag: Optional[bool] = None  # the stop request, when the last step read it
        self._install_signal_handlers()
        latest = latest_checkpoint(self.run_dir)
        self._init_weights: Optional[InitWeights] = None
        self._resumed_vocab: Optional[int] = None  # a run begun with init_from keeps its checkpoint's rows
        if latest:
            self._check_resume(latest)  # before anything is built: a changed layout fails here, not in DeepSpeed
            if cfg.train.init_from:
                self._resumed_vocab = ckpt.saved_meta(latest).get("vocab_size")
        elif cfg.train.init_from:
            self._init_weights = read_init_weights(cfg)  # refuses a different architecture or tokenizer
        self.tokenizer = load_tokenizer(cfg.data.tokenizer_model)
        self._build_objective_and_model()
        if self._init_weights is not None:  # before DeepSpeed copies the weights into its optimizer state
            self._load_init_weights()
        self.num_trainable = freeze_first_layers(self.model, cfg.model.num_layers, cfg.optim.freeze_layers)
        self._build_engine()
        self.ema = self._build_ema()
        self._build_data()

        self.step = 0
        self.consumed_samples = 0
        self._train_stream: Optional[Iterator[dict]] = None  # opened at consumed_samples on first use
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.resumed_from: Optional[str] = None
        if latest:
            self._resume(latest)
        if self.is_rank0:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self.metrics = MetricsWriter(self.run_dir, cfg.logging, self.is_rank0, config_to_dict(cfg))
        info = self.info
        self._log_line(
            f"{cfg.objective.name} | {self.num_params / 1e6:.2f}M parameters | backend {info.backend} "
            f"| world {info.world_size} = tp {info.tp_size} x pp {info.pp_size} "
            f"x dp {info.dp_size} | zero {cfg.parallel.zero_stage} | precision {self.precision} | device {info.device}"
            f" | accumulation {self.accumulation}"
            + (f" | first {cfg.optim.freeze_layers} layers frozen" if cfg.optim.freeze_layers else "")
        )

    # ------------------------------------------------------------------ construction

    def _lock_run_dir(self) -> Optional[ExclusiveLock]:
        """Rank 0 holds ``{run_dir}/run.lock`` for the whole run; a second trainer on the same run
        directory is refused (every rank raises LockHeldError, rank 0's message names the holder)."""
        lock, refused = None, ""
        if self.is_rank0:
            try:
                lock = ExclusiveLock(
                    os.path.join(self.run_dir, RUN_LOCK),
                    0.0,
                    "Another trainer is using this train.run_dir: wait for it to end, stop it, "
                    "or give this run another train.run_dir.",
                ).acquire()
            except LockHeldError as e:
                refused = str(e)
        if self._rank_flags(bool(refused))[0]:
            raise LockHeldError(refused or f"{os.path.join(self.run_dir, RUN_LOCK)} is held by another trainer")
        return lock

    def _build_objective_and_model(self) -> None:
        cfg, info = self.cfg, self.info
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        if vocab < self.tokenizer.vocab_size:
            raise ValueError(
                f"model.vocab_size ({vocab}) is smaller than the tokenizer's ({self.tokenizer.vocab_size})"
            )
        self.vocab_size = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, info.tp_size)
        if self._init_weights is not None:  # the checkpoint's rows, whatever the padding rule would give
            self.vocab_size = self._init_weights.vocab_rows(self.tokenizer, cfg.model.vocab_size, info.tp_size)
        elif self._resumed_vocab:
            self.vocab_size = self._resumed_vocab
        self.vocab_start = info.tp_rank * (self.vocab_size // info.tp_size)
        self.objective = build_objective(
            cfg.objective, cfg.model.seq_length, self.tokenizer.mask_id, self.tokenizer.vocab_size
        )
        self.precision = resolve_dtype(cfg.train.precision, info.device.type == "cuda")
        if info.pp_size == 1:
            self.model = CardGPT(
                cfg.model,
                self.objective.mask_kind,
                self.vocab_size,
                info.tp_size,
                seed=cfg.train.seed,
                params_dtype=torch.float32,
                tp_group=info.tp_group,
            )
        else:
            self.model = build_pipeline_model(
                cfg.model,
                self.objective.mask_kind,
                self.vocab_size,
                info.tp_size,
                info.pp_size,
                info.dp_size,
                cfg.train.seed,
                self._pipeline_loss,
                torch.float32,
                tp_group=info.tp_group,
            )
        self.num_params = self._count_parameters()
        if use_compiled_layers(cfg.model.compile_layers, info.device.type == "cuda"):
            compile_layers(self.model)

    def _load_init_weights(self) -> None:
        """Copies train.init_from's weights into this rank's shard of the model (any TP/PP layout)."""
        init, info = self._init_weights, self.info
        init.load_into(self.model, self.cfg.model.num_layers, info.tp_rank, info.tp_size)
        self._log_line(f"initialised from {init.path} (step {init.step} of its run); step 0, a fresh optimizer")
        self._init_weights = dataclasses.replace(init, state={})  # the copy is in the model now

    def _count_parameters(self) -> int:
        """Parameters of the whole model (tensor-parallel shards counted once, all pipeline stages)."""
        local = sum(
            p.numel() * (self.info.tp_size if getattr(p, "tensor_model_parallel", False) else 1)
            for p in self.model.parameters()
        )
        total = torch.tensor([local], dtype=torch.float64, device=self.info.device)
        if self.info.pp_size > 1:
            dist.all_reduce(total, group=self.info.pp_group)
        return int(total.item())

    def _build_engine(self) -> None:
        """The DeepSpeed engine (or pipeline engine), and the step and validation methods of that engine."""
        cfg, info = self.cfg, self.info
        decay, no_decay = [], []
        for p in self.model.parameters():
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
        self.ds_config = deepspeed_config(
            cfg.train, cfg.optim, cfg.parallel.zero_stage, info.dp_size, info.device.type == "cuda"
        )
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            config=self.ds_config,
            mpu=MegatronMPU(info) if info.pp_size == 1 else None,
        )
        ckpt.install_safe_io(self.engine, cfg.train.trust_checkpoint)
        pipelined = info.pp_size > 1
        # (micro-batches, whether the step is logged) -> (loss, metrics, whether a loss was non-finite, grad norm)
        self._forward_backward_step: Callable[[Iterator[dict], bool], tuple[float, dict, bool, Optional[float]]] = (
            self._pipeline_step if pipelined else self._engine_step
        )
        self._validation_nll_of_engine: Callable[[], float] = (
            self._pipeline_validation_nll if pipelined else self._engine_validation_nll
        )

    def _build_ema(self) -> Optional[EMA]:
        decay = self.cfg.optim.ema_decay
        if decay == 0.0:
            return None
        zero3 = self.optimizer if self.cfg.parallel.zero_stage == 3 else None
        return EMA(list(self.model.named_parameters()), decay, zero3_optimizer=zero3, warmup=self.cfg.optim.ema_warmup)

    def _ema_files(self) -> tuple[str, set[str]]:
        """This rank's EMA file name and the names of all the files this layout writes: one per
        (tensor, pipeline) rank, and per data-parallel rank only under ZeRO-3 (the EMA is replicated
        over data parallelism otherwise, so the run can resume on another data-parallel size)."""
        info, partitioned = self.info, self.cfg.parallel.zero_stage == 3
        mine = ckpt.ema_file_name(info.tp_rank, info.pp_rank, info.dp_rank if partitioned else 0)
        return mine, {
            ckpt.ema_file_name(t, p, d)
            for t in range(info.tp_size)
            for p in range(info.pp_size)
            for d in (range(info.dp_size) if partitioned else [0])
        }

    def ema_weights(self) -> ContextManager[None]:
        """Inside, the model holds the EMA weights (the trained ones come back on exit); a no-op
        without EMA (optim.ema_decay=0). Collective under ZeRO-3: every rank must enter it."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def _build_data(self) -> None:
        cfg = self.cfg
        t = cfg.train
        # eval_iters global batches, whatever the layout: the same validation set for every run.
        self.valid_samples = t.eval_iters * t.global_batch_size
        self.datasets = build_datasets(
            cfg.data,
            cfg.model.seq_length,
            t.seed,
            {"train": t.train_iters * t.global_batch_size, "valid": self.valid_samples, "test": 0},
            tokenizer=self.tokenizer,
            valid_seed=cfg.data.valid_seed,
        )

    # ------------------------------------------------------------------ batches

    def _micro_batches(self, split: str, start: int, count: Optional[int] = None) -> Iterator[dict]:
        """This rank's micro-batches of ``split`` from global sample ``start`` (``count`` of them,
        or until the split ends)."""
        t, info = self.cfg.train, self.info
        dataset = self.datasets[split]
        sampler = MicroBatchSampler(len(dataset), start, t.micro_batch_size, info.dp_rank, info.dp_size)
        if self.cfg.data.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.cfg.data.num_workers
            )
            it = iter(loader)
        else:
            it = (collate([dataset[i] for i in ids]) for ids in sampler)
        for batch in itertools.islice(it, count):
            yield {k: v.to(info.device) for k, v in batch.items()}

    def _prepare(self, batch: dict):
        return self.objective.prepare(batch["tokens"], batch["noise_seeds"], batch["sample_ids"])

    def _pipeline_item(self, model_inputs, loss_inputs):
        mask = model_inputs.attention_mask
        mask = mask.long() if mask is not None else no_attention_mask(self.info.device)
        suppress = torch.tensor(1 if loss_inputs.suppress_mask_logit else 0, device=self.info.device)
        return (
            (model_inputs.input_ids, model_inputs.position_ids, mask),
            (loss_inputs.targets, loss_inputs.weights, loss_inputs.normaliser.reshape(1).float(), suppress),
        )

    def _nll(self, logits, loss_inputs):
        suppress = self.tokenizer.mask_id if loss_inputs.suppress_mask_logit else None
        return per_token_nll(logits, loss_inputs.targets, suppress, self.vocab_start, self.info.tp_group)

    def _pipeline_loss(self, logits, labels):
        targets, weights, normaliser, suppress = labels
        li = LossInputs(
            targets=targets,
            weights=weights,
            normaliser=normaliser.reshape(()),
            suppress_mask_logit=bool(suppress.item()),
            is_masked=None,
        )
        loss, _ = self.objective.loss(self._nll(logits, li), li)
        return loss

    # ------------------------------------------------------------------ steps

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _zero_loss(self) -> torch.Tensor:
        """A finite loss whose gradient is zero everywhere (stands in for a non-finite micro-batch)."""
        return sum((p.reshape(-1)[:1] * 0.0).sum() for p in self.model.parameters() if p.requires_grad)

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns the step's metrics (on every rank).

        Only a logged step (``train.log_interval``) reads its loss, metrics and gradient norm to the
        host; the others return them as None and sync with the device only for the non-finite-loss
        policy (one flag per micro-batch; none with ``train.max_nonfinite_steps=0``).
        """
        cfg = self.cfg
        lr = learning_rate(self.step, cfg.optim, cfg.train.train_iters)
        self._set_lr(lr)
        if self._train_stream is None:  # one stream (and one DataLoader) for the whole run
            self._train_stream = self._micro_batches("train", self.consumed_samples)
        batches = itertools.islice(self._train_stream, self.accumulation)
        step_logged = self._is_logged(self.step + 1)
        loss_value, metrics, bad, grad_norm = self._forward_backward_step(batches, step_logged)
        if self.ema is not None and not bad and self.engine.was_step_applied():
            self.ema.update()  # skipped steps (non-finite loss, fp16 overflow) leave the EMA alone
        self.step += 1
        self.consumed_samples += cfg.train.global_batch_size
        self._count_step(bad)
        metrics.update({"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None})
        return metrics

    def _is_logged(self, step: int) -> bool:
        """Whether ``step`` (counted from 1) writes a metrics line: the only steps that read scalars."""
        t = self.cfg.train
        return step % t.log_interval == 0 or step == t.train_iters

    def _rank_flags(self, *flags: torch.Tensor | bool) -> list[bool]:
        """Each flag (a bool tensor or bool) OR-ed over all ranks, with one all-reduce and one host read."""
        t = torch.stack([torch.as_tensor(f, device=self.info.device).reshape(()) for f in flags]).to(torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [v > 0 for v in t.tolist()]

    def _engine_step(
        self, batches: Iterator[dict], step_logged: bool
    ) -> tuple[Optional[float], dict, bool, Optional[float]]:
        """Forward and backward of each micro-batch through the DeepSpeed engine, then its optimizer step.

        Returns (loss: mean over micro-batches and data-parallel ranks, NaN when a micro-batch had a
        non-finite loss; metrics; whether one had; the gradient norm before clipping). Loss, metrics
        and gradient norm are read only when ``step_logged`` (None and {} otherwise). The non-finite
        check (``train.max_nonfinite_steps`` > 0) reads one flag per micro-batch before its backward,
        together, on the last one, with the stop request (:meth:`_should_stop`).
        """
        cfg = self.cfg
        check = cfg.train.max_nonfinite_steps > 0
        metrics: dict = {}
        bad = False
        grad_norm = None
        context = None  # per-corruption sums of this step (CARD, logged steps only)
        total = torch.zeros((), dtype=torch.float64, device=self.info.device)  # sum of the finite losses
        for m, batch in enumerate(batches):
            last = m == self.accumulation - 1
            model_inputs, loss_inputs = self._prepare(batch)
            logits = self.engine(model_inputs.input_ids, model_inputs.position_ids, model_inputs.attention_mask)
            top1 = self._top1_logprob(logits, loss_inputs) if step_logged and self._diagnose else None
            nll = self._nll(logits, loss_inputs)
            loss, micro_metrics = self.objective.loss(nll, loss_inputs)
            micro_bad = False
            if check:
                stop_asked = self._stop_asked_here() if last else False
                micro_bad, stop = self._rank_flags(~torch.isfinite(loss.detach()), stop_asked)
                if last:
                    self._stop_flag = stop
            if micro_bad:
                bad = True
                self.engine.backward(self._nonfinite_micro_batch())
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
                    self._set_lr(0.0)  # parameters stay unchanged: the step is skipped
                if cfg.parallel.zero_stage == 0 and step_logged:
                    grad_norm = self._grad_norm()
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

    def _pipeline_step(self, batches: Iterator[dict], step_logged: bool) -> tuple[float, dict, bool, Optional[float]]:
        """The whole step through DeepSpeed's pipeline engine (``train_batch``); same returns as
        :meth:`_engine_step` (no per-micro-batch metrics; the gradient norm comes from the engine)."""
        items = (self._pipeline_item(*self._prepare(b)) for b in batches)
        loss_value = float(self.engine.train_batch(data_iter=items))  # the pipeline engine reads it anyway
        self._stop_flag = self._should_stop()
        # Under pipeline parallelism the pipeline engine owns the step: whether a non-finite
        # loss skips the update is DeepSpeed's decision (ZeRO-1 in fp32/fp16 skips on an
        # invalid gradient norm). It is counted here all the same.
        return loss_value, {}, not math.isfinite(loss_value), self.engine.get_global_grad_norm()

    # ------------------------------------------------------------------ the non-finite-loss policy

    def _nonfinite_micro_batch(self) -> torch.Tensor:
        """What a micro-batch with a non-finite loss backpropagates: a zero loss (the step is then
        skipped with learning rate 0). Under ZeRO-3 a step cannot be skipped safely: raises."""
        if self.cfg.parallel.zero_stage == 3:
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1}; under ZeRO-3 a step cannot be skipped safely"
            )
        return self._zero_loss()

    def _count_step(self, bad: bool) -> None:
        """Counts a step whose loss was non-finite (``bad``) and stops the run after
        train.max_nonfinite_steps of them in a row; a finite step resets the count."""
        if not bad or self.cfg.train.max_nonfinite_steps == 0:  # 0: no check
            self.consecutive_nonfinite = 0
            return
        self.skipped_steps += 1
        self.consecutive_nonfinite += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.step, self.consecutive_nonfinite)
        limit = self.cfg.train.max_nonfinite_steps
        if self.consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss (train.max_nonfinite_steps="
                f"{limit}); stopping. Lower optim.lr or check the data."
            )

    @property
    def _diagnose(self) -> bool:
        """Per-corruption metrics apply to CARD (masked inputs, causal: ``traits.mask_diagnostics``) outside
        the pipeline engine."""
        return self.cfg.logging.corruption_metrics and self.objective.traits.mask_diagnostics and self.info.pp_size == 1

    def _top1_logprob(self, logits, loss_inputs):
        suppress = self.tokenizer.mask_id if loss_inputs.suppress_mask_logit else None
        return per_token_top1_logprob(logits, suppress, self.vocab_start, self.info.tp_group)

    @torch.no_grad()
    def _validation_diagnostics(self) -> dict:
        """Per-corruption metrics of a corrupted pass and the mask probe, over the validation batches."""
        K = self.cfg.logging.probe_window
        context, probe = None, None
        self.engine.eval()
        for batch in self._micro_batches("valid", 0, self.cfg.train.eval_iters * self.accumulation):
            mi, li = self._prepare(batch)  # noise from the validation seeds: the same every time
            logits = self.engine(mi.input_ids, mi.position_ids, mi.attention_mask)
            top1 = self._top1_logprob(logits, li)  # before the NLL, which overwrites the logits
            sums = diagnostics.context_sums(self._nll(logits, li), top1, li.is_masked)
            context = sums if context is None else context + sums
            lg = self.cfg.logging
            for cut in range(lg.probe_cuts if K else 0):
                ids, pos, targets, gather = diagnostics.probe_batch(
                    batch["tokens"], batch["sample_ids"], K, self.tokenizer.mask_id, cut, lg.probe_cuts,
                    lg.probe_min_prefix,
                )  # fmt: skip
                logits = self.engine(ids, pos, None)
                li = LossInputs(targets=targets, weights=None, normaliser=None, suppress_mask_logit=False)
                top1 = self._top1_logprob(logits, li)
                sums = diagnostics.probe_sums(self._nll(logits, li), top1, gather)
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

    def _grad_norm(self) -> float:
        """Global gradient norm before clipping (DeepSpeed reports it only under ZeRO)."""
        # max_norm=inf: measure only (tensor-parallel shards counted once, replicas once).
        return float(clip_grad_norm_(list(self.model.parameters()), max_norm=float("inf"), mpu=MegatronMPU(self.info)))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        """Validation perplexity: exact for ARM/CARD, an upper bound (ELBO) for MDLM/BD3LM.

        Returns val_nll, val_ppl, val_ppl_is_bound, and with train.eval_ema also ema_val_nll and
        ema_val_ppl (the same validation with the EMA weights).
        """
        nll = self._validation_nll()
        ev = {"val_nll": nll, "val_ppl": math.exp(min(nll, 50.0)), "val_ppl_is_bound": self.objective.is_bound}
        if self._diagnose:
            ev.update(self._validation_diagnostics())
        if self.cfg.train.eval_ema:
            with self.ema.swapped():
                ema_nll = self._validation_nll()
            ev.update({"ema_val_nll": ema_nll, "ema_val_ppl": math.exp(min(ema_nll, 50.0))})
        return ev

    @torch.no_grad()
    def _validation_nll(self) -> float:
        """Mean validation NLL per token over the whole validation set (every rank gets it)."""
        self.engine.eval()
        nll = self._validation_nll_of_engine()
        self.engine.train()
        return nll

    def _engine_validation_nll(self) -> float:
        """:meth:`_validation_nll` through the DeepSpeed engine: NLL sums reduced over data parallelism."""
        iters = self.cfg.train.eval_iters * self.accumulation  # micro-batches of this rank
        total, count = 0.0, 0.0
        for batch in self._micro_batches("valid", 0, iters):
            for mi, li in self.objective.eval_passes(batch["tokens"], batch["noise_seeds"], batch["sample_ids"]):
                logits = self.engine(mi.input_ids, mi.position_ids, mi.attention_mask)
                s, c = self.objective.nll_terms(self._nll(logits, li), li)
                total += float(s)
                count += float(c)
        t = torch.tensor([total, count], dtype=torch.float64, device=self.info.device)
        dist.all_reduce(t, group=self.info.dp_group)
        return float(t[0] / t[1])

    def _pipeline_validation_nll(self) -> float:
        """:meth:`_validation_nll` through the pipeline engine: the mean of its per-pass losses."""
        iters = self.cfg.train.eval_iters * self.accumulation
        losses = []
        for batch in self._micro_batches("valid", 0, iters):
            passes = self.objective.eval_passes(batch["tokens"], batch["noise_seeds"], batch["sample_ids"])
            items = iter([self._pipeline_item(mi, li) for mi, li in passes])
            for _ in passes:
                losses.append(float(self.engine.eval_batch(items, num_micro_batches=1)))
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------ checkpoints

    def _client_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
            "data_parallel_size": self.info.dp_size,
            "vocab_size": self.vocab_size,
            "rng": ckpt.rng_state(),
        }

    def save(self) -> str:
        info, t = self.info, self.cfg.train
        due = ckpt.export_due(self.step, t.train_iters, t.save_interval, t.export_interval)
        export = self._export_part() if due else None
        ema_state, ema_file = None, None
        if self.ema is not None:
            ema_file, _ = self._ema_files()
            if self.cfg.parallel.zero_stage == 3 or info.dp_rank == 0:
                ema_state = self.ema.state_dict()
        path = ckpt.save_checkpoint(
            self.engine,
            self.run_dir,
            self.step,
            self._client_state(),
            config_yaml=yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False),
            tokenizer_model=self.cfg.data.tokenizer_model,
            export=export,
            keep_last=self.cfg.train.keep_last_checkpoints,
            rank=info.rank,
            ema_state=ema_state,
            ema_file=ema_file,
            meta_extra={
                "resolved": self._resolved_settings(),
                "tokenizer_sha256": self.tokenizer.sha256,
                "data": data_identity(self.cfg.data.data_path),
            },
        )
        if self.is_rank0:
            log.info("saved checkpoint %s", path)
        return path

    def _export_part(self) -> ShardPart:
        """This rank's part of the export: its slice of the canonical weights (and EMA), nothing gathered
        across tensor or pipeline ranks; data-parallel rank 0 writes it. Collective under ZeRO-3."""
        info = self.info
        zero3 = self.cfg.parallel.zero_stage == 3
        part = ShardPart(info.tp_rank, info.pp_rank, info.tp_size, info.pp_size, writes=info.dp_rank == 0)
        if not (part.writes or zero3):
            return part
        named = list(self.model.named_parameters())
        layers = self.cfg.model.num_layers
        if self.ema is not None:
            with self.ema.swapped():  # the EMA's pieces are taken exactly as the weights'
                part.ema, _ = local_pieces(named, layers, info.tp_rank, info.tp_size, zero3=zero3, copy=True)
        part.weights, part.pieces = local_pieces(named, layers, info.tp_rank, info.tp_size, zero3=zero3)
        if not part.writes:
            part.weights, part.ema, part.pieces = {}, None, {}
        return part

    def _resolved_settings(self) -> dict[str, str]:
        """What the settings that resolve by machine became here (a resume compares them, not ``auto``)."""
        return {
            "train.precision": resolve_dtype(self.cfg.train.precision, self.info.device.type == "cuda"),
            "parallel.distributed_backend": self.info.backend,
        }

    def _check_resume(self, path: str) -> None:
        """Raises ConfigError listing what this run changes that a resume of ``path`` may not: the config
        (config.RESUMABLE says what may change; settings such as ``auto`` compare by what they resolve
        to), the tokenizer's sha256 and the data's identity (the same paths holding other files), and an
        EMA dropped without train.drop_ema."""
        saved, meta = ckpt.saved_config(path), ckpt.saved_meta(path)
        changes = (
            resume_changes(
                saved,
                self.cfg,
                meta.get("data_parallel_size"),
                self.info.dp_size,
                meta.get("resolved"),
                self._resolved_settings(),
            )  # fmt: skip
            if saved is not None
            else []
        )
        # Files that cannot be read are left to the builders below, which name them; the config's own
        # changes (another data_path, say) are listed first.
        if "tokenizer_sha256" in meta and os.path.isfile(self.cfg.data.tokenizer_model):
            now = load_tokenizer(self.cfg.data.tokenizer_model).sha256
            if now != meta["tokenizer_sha256"]:
                changes.append(
                    f"the tokenizer {self.cfg.data.tokenizer_model}: sha256 {meta['tokenizer_sha256'][:16]}... -> "
                    f"{now[:16]}... (another file under the same path)"
                )
        if "data" in meta:
            with contextlib.suppress(ValueError):
                changes += data_identity_changes(meta["data"], data_identity(self.cfg.data.data_path))
        if self.cfg.optim.ema_decay == 0.0 and ckpt.has_ema(path) and not self.cfg.train.drop_ema:
            changes.append(
                "optim.ema_decay: the checkpoint holds an EMA of the weights and optim.ema_decay is 0, which "
                "would drop it: set optim.ema_decay to continue it, or train.drop_ema=true to drop it"
            )
        if changes:
            raise ConfigError(
                f"cannot resume {path} with this config; it changes what a resume may not change:\n  - "
                + "\n  - ".join(changes)
                + f"\nRestore these values, or start a new run with another train.run_dir (now {self.run_dir}). "
                "docs/design.md 'Resuming' says what may change."
            )

    def _resume(self, path: str) -> None:
        state = ckpt.load_checkpoint(self.engine, path)
        self.step = state["step"]
        self.consumed_samples = state["consumed_samples"]
        self.skipped_steps = state.get("skipped_steps", 0)
        ckpt.set_rng_state(state["rng"])
        self.resumed_from = path
        if self.is_rank0:
            log.info("resumed from %s at step %d (%d samples consumed)", path, self.step, self.consumed_samples)
        self._resume_ema(path)

    def _resume_ema(self, path: str) -> None:
        if self.ema is None:
            if ckpt.has_ema(path):  # _check_resume refused this unless train.drop_ema
                self._log_line(
                    f"{path} holds an EMA, but optim.ema_decay is 0 and train.drop_ema is true: the EMA is "
                    "dropped and later checkpoints have none"
                )
            return
        if self.cfg.train.drop_ema:
            self._log_line(f"train.drop_ema has no effect: optim.ema_decay is {self.ema.decay}, the EMA is kept")
        ema_file, layout_files = self._ema_files()
        saved = ckpt.load_ema_state(path, ema_file, layout_files)
        if saved is None:
            self.ema.reset()
            self._log_line(
                f"{path} has no EMA: the EMA (decay {self.ema.decay}) starts from the weights of step {self.step}"
            )
            return
        self.ema.load_state_dict(saved, os.path.join(path, ema_file))
        if saved["decay"] != self.ema.decay:
            self._log_line(f"the EMA saved with decay {saved['decay']} continues with optim.ema_decay={self.ema.decay}")

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_requested = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    def _stop_asked_here(self) -> bool:
        """Whether this rank was asked to stop (a signal, or the stop file); no collective."""
        return self._stop_requested or ckpt.stop_file_exists(self.run_dir)

    def _should_stop(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it)."""
        return self._rank_flags(self._stop_asked_here())[0]

    def _stop_after_step(self, logged: bool) -> bool:
        """Whether to stop after this step. The step's own flag read carries the stop request when it
        made one (the non-finite check, the pipeline engine); otherwise it is read at logged steps only,
        so that other steps never wait for the host."""
        stop, self._stop_flag = self._stop_flag, None
        if stop is None and logged:
            stop = self._should_stop()
        return bool(stop)

    # ------------------------------------------------------------------ loop

    def _log_line(self, text: str) -> None:
        if self.is_rank0:
            log.info(text)

    def train(self) -> dict:
        """Runs until train.train_iters, train.exit_interval, or a stop request; returns a summary."""
        cfg, t = self.cfg, self.cfg.train
        summary: dict = {"start_step": self.step}
        if self.step >= t.train_iters:  # a finished run started again (a rerun, a requeue): save nothing
            self._log_line(
                f"{self.resumed_from} is at step {self.step}, train.train_iters is {t.train_iters}: the run "
                "is finished, nothing to do (raise train.train_iters to train on)"
            )
            summary.update(
                {"end_step": self.step, "stopped_by": "finished_before", "skipped_steps": self.skipped_steps}
            )
            if self.is_rank0 and not ckpt.is_marked_finished(self.run_dir):  # killed between its last save and it
                ckpt.mark_finished(self.run_dir, self.step)
            self.close()
            return summary
        if self.is_rank0:
            ckpt.clear_end_markers(self.run_dir)
        if self.step == 0 or t.eval_interval:
            ev = self.evaluate()
            summary["initial_eval"] = ev
            self._log_eval(ev)
        tokens_per_step = t.global_batch_size * cfg.model.seq_length * self.objective.sequence_length_multiplier
        flops_per_token = model_flops_per_token(
            self.num_params,
            cfg.model.num_layers,
            cfg.model.hidden_size,
            cfg.model.seq_length * self.objective.sequence_length_multiplier,
        )
        peak = peak_flops(torch.cuda.get_device_name()) if self.info.device.type == "cuda" else None
        steps_this_run = 0
        stopped_by = None
        window_start, window_steps = time.perf_counter(), 0
        while self.step < t.train_iters:
            metrics = self.train_step()
            steps_this_run += 1
            window_steps += 1
            logged = self._is_logged(self.step)
            if logged:
                elapsed = time.perf_counter() - window_start
                tps = tokens_per_step * window_steps / max(elapsed, 1e-9)
                record = {
                    "step": self.step,
                    **metrics,
                    "tokens_per_sec": tps,
                    "consumed_samples": self.consumed_samples,
                    "skipped_steps": self.skipped_steps,
                    "memory_gb": _memory_gb(self.info.device),
                }
                if peak:
                    record["mfu"] = tps * flops_per_token / (peak * self.info.world_size)
                self._log_line(format_step(record))
                self.metrics.write(record)
                window_start, window_steps = time.perf_counter(), 0
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.train_iters:
                self._log_eval(self.evaluate())
            if self._stop_after_step(logged):
                stopped_by = "signal"
                break
            if t.exit_interval and steps_this_run >= t.exit_interval and self.step < t.train_iters:
                stopped_by = "exit_interval"
                break
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.train_iters:
                self.save()
        self.save()
        if stopped_by is None:
            ev = self.evaluate()
            summary["final_eval"] = ev
            self._log_eval(ev)
        if self.is_rank0:
            if stopped_by == "signal":
                ckpt.mark_preempted(self.run_dir, self.step)
            elif stopped_by is None:
                ckpt.mark_finished(self.run_dir, self.step)
        dist.barrier()
        summary.update({"end_step": self.step, "stopped_by": stopped_by, "skipped_steps": self.skipped_steps})
        self.close()
        return summary

    def close(self) -> None:
        """Closes the metrics files and releases the run directory (``train()`` ends with it; a Trainer
        used without ``train()`` holds the run directory until this is called)."""
        self.metrics.close()
        dist.barrier()  # every rank is done with the run directory before the lock goes
        if self._run_lock is not None:
            self._run_lock.release()

    def _log_eval(self, ev: dict) -> None:
        bound = "<= " if ev["val_ppl_is_bound"] else ""
        line = f"step {self.step:>7d} | validation nll {ev['val_nll']:.4f} | perplexity {bound}{ev['val_ppl']:.2f}"
        ks = sorted(int(k[len("probe_acc_k") :]) for k in ev if k.startswith("probe_acc_k"))
        if ks:  # what the parallel decoder can use: right / confident after k masks
            line += " | probe k: acc/conf " + " ".join(
                f"{k}:{ev[f'probe_acc_k{k}']:.2f}/{ev[f'probe_conf_k{k}']:.2f}" for k in ks
            )
        if "ema_val_nll" in ev:
            line += f" | EMA nll {ev['ema_val_nll']:.4f} | EMA perplexity {bound}{ev['ema_val_ppl']:.2f}"
        self._log_line(line)
        self.metrics.write({"step": self.step, **ev}, filename="eval.jsonl")


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
