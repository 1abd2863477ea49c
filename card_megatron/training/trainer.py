"""The training loop: one objective, one model, DeepSpeed for ZeRO, pipelining and checkpoints.

Nothing here is objective-specific: the objective turns clean samples into model inputs and loss
inputs, and turns per-token NLL into the loss. The :class:`Trainer` builds the model and hands each
job to one component:

* ``run_directory.RunDirectory``: the lock, ``config.yaml``, the end markers, stop requests;
* ``step.StepRunner``: the engine and its step method (DeepSpeed engine or pipeline engine), the
  non-finite-loss policy;
* ``batches.Batches``: the datasets and each rank's micro-batches;
* ``validation.Validator``: validation perplexity with CARD's diagnostics;
* ``ema.RunEMA``: the weight EMA, its files and its resume;
* ``checkpoint_contents``: what a checkpoint holds and whether a run may resume one
  (``checkpoint.py`` writes the directory).

:meth:`Trainer.train_step` sets the learning rate, runs the step, updates the EMA and counts
non-finite steps; :meth:`Trainer.train` is the loop (logging, validation, saving, stopping).
Process groups come from ``self.info`` (``parallel/state.py``), never from Megatron's globals.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from typing import ContextManager, Optional

import torch
import torch.distributed as dist

from card_megatron.config import Config, config_to_dict, validate
from card_megatron.model.compile import compile_layers, use_compiled_layers
from card_megatron.model.gpt import CardGPT, padded_vocab_size
from card_megatron.model.pipeline import build_pipeline_model
from card_megatron.objectives import build_objective
from card_megatron.parallel.deepspeed_glue import resolve_dtype
from card_megatron.parallel.state import ParallelInfo, init_distributed
from card_megatron.rundir import latest_checkpoint
from card_megatron.tokenizers import load_tokenizer
from card_megatron.training import checkpoint as ckpt
from card_megatron.training.batches import Batches
from card_megatron.training.checkpoint_contents import Checkpoints, check_resume
from card_megatron.training.ema import EMA, RunEMA
from card_megatron.training.init_from import InitWeights, freeze_first_layers, read_init_weights
from card_megatron.training.metrics import MetricsWriter, format_step, model_flops_per_token, peak_flops
from card_megatron.training.run_directory import RunDirectory
from card_megatron.training.safe_io import install_safe_io, load_checkpoint
from card_megatron.training.schedule import learning_rate
from card_megatron.training.step import Losses, NonFiniteLossError, StepRunner, build_engine
from card_megatron.training.validation import Validator, format_eval

__all__ = ["NonFiniteLossError", "Trainer"]

log = logging.getLogger("card_megatron")


class Trainer:
    """Builds everything from a Config and trains. ``Trainer(cfg).train()``."""

    def __init__(self, cfg: Config, info: Optional[ParallelInfo] = None):
        self.cfg = cfg
        self.info = info or init_distributed(cfg.parallel)
        validate(cfg, self.info.world_size)
        self.is_rank0 = self.info.rank == 0
        self.run_dir = cfg.train.run_dir
        self.directory = RunDirectory(self.run_dir, self.info)  # locked until close()
        try:
            self._build()
        except BaseException:
            self.directory.release()
            raise

    def _build(self) -> None:
        """Everything after the run directory is locked: model, engine, EMA, data, resume, metrics."""
        cfg, info = self.cfg, self.info
        latest = latest_checkpoint(self.run_dir)
        init: Optional[InitWeights] = None
        resumed_vocab: Optional[int] = None  # a run begun with init_from keeps its checkpoint's rows
        if latest:
            check_resume(latest, cfg, info)  # before anything is built: a changed layout fails here, not in DeepSpeed
            if cfg.train.init_from:
                resumed_vocab = ckpt.saved_meta(latest).get("vocab_size")
        elif cfg.train.init_from:
            init = read_init_weights(cfg)  # refuses a different architecture or tokenizer
        self.tokenizer = load_tokenizer(cfg.data.tokenizer_model)
        self._build_objective_and_model(init, resumed_vocab)
        if init is not None:  # before DeepSpeed copies the weights into its optimizer state
            init.load_into(self.model, cfg.model.num_layers, info.tp_rank, info.tp_size)  # its own slices only
            self._log_line(f"initialised from {init.path} (step {init.step} of its run); step 0, a fresh optimizer")
            init = dataclasses.replace(init, state={})  # the copy is in the model now
        self.num_trainable = freeze_first_layers(self.model, cfg.model.num_layers, cfg.optim.freeze_layers)
        self.engine, self.optimizer, self.ds_config = build_engine(self.model, cfg, info)
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        install_safe_io(self.engine, cfg.train.trust_checkpoint)
        self.steps = StepRunner(cfg, info, self.engine, self.optimizer, self.losses, self.directory.stop_asked_here)
        self.ema_run = RunEMA(
            list(self.model.named_parameters()), cfg.optim, cfg.parallel.zero_stage, self.optimizer, info
        )
        self.batches = Batches(cfg, info, self.tokenizer)
        self.validator = Validator(
            cfg, info, self.engine, self.losses, self.batches, self.ema_run.weights, self.steps.diagnose
        )
        self.checkpoints = Checkpoints(cfg, info, self.engine, self.tokenizer, self.ema_run)

        self.step = 0
        self.consumed_samples = 0
        self.resumed_from: Optional[str] = None
        if latest:
            self._resume(latest)
        self.directory.save_config(cfg)
        self.metrics = MetricsWriter(self.run_dir, cfg.logging, self.is_rank0, config_to_dict(cfg))
        self._log_line(
            f"{cfg.objective.name} | {self.num_params / 1e6:.2f}M parameters | backend {info.backend} "
            f"| world {info.world_size} = tp {info.tp_size} x pp {info.pp_size} "
            f"x dp {info.dp_size} | zero {cfg.parallel.zero_stage} | precision {self.precision} | device {info.device}"
            f" | accumulation {self.accumulation}"
            + (f" | first {cfg.optim.freeze_layers} layers frozen" if cfg.optim.freeze_layers else "")
        )

    def _build_objective_and_model(self, init: Optional[InitWeights], resumed_vocab: Optional[int]) -> None:
        cfg, info = self.cfg, self.info
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        if vocab < self.tokenizer.vocab_size:
            raise ValueError(
                f"model.vocab_size ({vocab}) is smaller than the tokenizer's ({self.tokenizer.vocab_size})"
            )
        self.vocab_size = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, info.tp_size)
        if init is not None:  # the checkpoint's rows, whatever the padding rule would give
            self.vocab_size = init.vocab_rows(self.tokenizer, cfg.model.vocab_size, info.tp_size)
        elif resumed_vocab:
            self.vocab_size = resumed_vocab
        self.objective = build_objective(
            cfg.objective, cfg.model.seq_length, self.tokenizer.mask_id, self.tokenizer.vocab_size
        )
        vocab_start = info.tp_rank * (self.vocab_size // info.tp_size)
        self.losses = Losses(self.objective, self.tokenizer.mask_id, vocab_start, info)
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
                self.losses.pipeline_loss,
                torch.float32,
                tp_group=info.tp_group,
            )
        self.num_params = self._count_parameters()
        if use_compiled_layers(cfg.model.compile_layers, info.device.type == "cuda"):
            compile_layers(self.model)

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

    # ------------------------------------------------------------------ the components' state, as before

    @property
    def ema(self) -> Optional[EMA]:
        """The EMA of the weights; None with optim.ema_decay=0."""
        return self.ema_run.ema

    def ema_weights(self) -> ContextManager[None]:
        """Inside, the model holds the EMA weights (the trained ones come back on exit); a no-op
        without EMA (optim.ema_decay=0). Collective under ZeRO-3: every rank must enter it."""
        return self.ema_run.weights()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite loss, over the whole run."""
        return self.steps.skipped_steps

    def evaluate(self) -> dict:
        """Validation perplexity and diagnostics (``validation.Validator.evaluate``)."""
        return self.validator.evaluate()

    # ------------------------------------------------------------------ steps

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns the step's metrics (on every rank).

        Only a logged step (``train.log_interval``) reads its loss, metrics and gradient norm to the
        host; the others return them as None and sync with the device only for the non-finite-loss
        policy (one flag per micro-batch; none with ``train.max_nonfinite_steps=0``).
        """
        cfg = self.cfg
        lr = learning_rate(self.step, cfg.optim, cfg.train.train_iters)
        self.steps.set_lr(lr)
        batches = self.batches.next_train(self.consumed_samples, self.accumulation)
        loss_value, metrics, bad, grad_norm = self.steps.run(batches, self._is_logged(self.step + 1), self.step + 1)
        if self.ema is not None and not bad and self.engine.was_step_applied():
            self.ema_run.update()  # skipped steps (non-finite loss, fp16 overflow) leave the EMA alone
        self.step += 1
        self.consumed_samples += cfg.train.global_batch_size
        self.steps.count_step(bad, self.step)
        metrics.update({"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None})
        return metrics

    def _is_logged(self, step: int) -> bool:
        """Whether ``step`` (counted from 1) writes a metrics line: the only steps that read scalars."""
        t = self.cfg.train
        return step % t.log_interval == 0 or step == t.train_iters

    def _stop_after_step(self, logged: bool) -> bool:
        """Whether to stop after this step. The step's own flag read carries the stop request when it
        made one (the non-finite check, the pipeline engine); otherwise it is read at logged steps only,
        so that other steps never wait for the host."""
        stop, self.steps.stop_flag = self.steps.stop_flag, None
        if stop is None and logged:
            stop = self.directory.should_stop()
        return bool(stop)

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
        """Saves a checkpoint of this step (collective); returns its directory."""
        path = self.checkpoints.save(self.step, self._client_state())
        if self.is_rank0:
            log.info("saved checkpoint %s", path)
        return path

    def _resume(self, path: str) -> None:
        state = load_checkpoint(self.engine, path)
        self.step = state["step"]
        self.consumed_samples = state["consumed_samples"]
        self.steps.skipped_steps = state.get("skipped_steps", 0)
        ckpt.set_rng_state(state["rng"])
        self.resumed_from = path
        if self.is_rank0:
            log.info("resumed from %s at step %d (%d samples consumed)", path, self.step, self.consumed_samples)
        for line in self.ema_run.resume(path, self.step, self.cfg.train.drop_ema):
            self._log_line(line)

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
            if not self.directory.is_marked_finished():  # killed between its last save and it
                self.directory.mark_finished(self.step)
            self.close()
            return summary
        self.directory.clear_end_markers()
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
        if stopped_by == "signal":
            self.directory.mark_preempted(self.step)
        elif stopped_by is None:
            self.directory.mark_finished(self.step)
        dist.barrier()
        summary.update({"end_step": self.step, "stopped_by": stopped_by, "skipped_steps": self.skipped_steps})
        self.close()
        return summary

    def close(self) -> None:
        """Closes the metrics files and releases the run directory (``train()`` ends with it; a Trainer
        used without ``train()`` holds the run directory until this is called)."""
        self.metrics.close()
        dist.barrier()  # every rank is done with the run directory before the lock goes
        self.directory.release()

    def _log_eval(self, ev: dict) -> None:
        self._log_line(format_eval(self.step, ev))
        self.metrics.write({"step": self.step, **ev}, filename="eval.jsonl")


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
