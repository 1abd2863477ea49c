"""The run directory as a live trainer holds it: its lock, its ``config.yaml``, the markers that say how
the run ended, and the requests to stop (SIGUSR1/SIGTERM, the stop file).

In ``{run_dir}``: ``run.lock`` (:data:`RUN_LOCK`, held by rank 0 for the whole run: a second trainer on
the same directory is refused), ``config.yaml`` (the resolved config), ``finished`` or ``preempted`` (the
step, written by rank 0 when a run ends) and ``SAVE_AND_EXIT`` (:data:`STOP_FILE`, touched by
``slurm/pretrain.sh`` when SLURM signals the batch shell: save at the next step and exit). Checkpoints
are ``checkpoint.py``'s; where things are, for readers, is ``card_megatron/rundir.py``'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Optional

from card_megatron.config import Config, save_config
from card_megatron.fileio import atomic_write
from card_megatron.lock import ExclusiveLock, LockHeldError
from card_megatron.parallel.state import ParallelInfo, any_rank

RUN_LOCK = "run.lock"  # held by rank 0 for the whole run: one trainer per run directory
STOP_FILE = "SAVE_AND_EXIT"  # touched by slurm/pretrain.sh when SLURM signals the batch shell
FINISHED, PREEMPTED = "finished", "preempted"  # how a run ended; each holds the step


class RunDirectory:
    """``train.run_dir`` of a live run (every rank builds one; rank 0 writes). Construction locks it
    (collective: every rank raises LockHeldError when it is held, rank 0's message names the holder)
    and installs the SIGUSR1/SIGTERM handlers that ask the run to stop; :meth:`release` unlocks it."""

    def __init__(self, path: str, info: ParallelInfo):
        self.path, self.info = path, info
        self.is_rank0 = info.rank == 0
        if self.is_rank0:
            os.makedirs(path, exist_ok=True)
        self._lock = self._acquire()
        self.stop_requested = False  # set by the signal handlers
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _acquire(self) -> Optional[ExclusiveLock]:
        lock, refused = None, ""
        if self.is_rank0:
            try:
                lock = ExclusiveLock(
                    os.path.join(self.path, RUN_LOCK),
                    0.0,
                    "Another trainer is using this train.run_dir: wait for it to end, stop it, "
                    "or give this run another train.run_dir.",
                ).acquire()
            except LockHeldError as e:
                refused = str(e)
        if any_rank(self.info.device, bool(refused))[0]:
            raise LockHeldError(refused or f"{os.path.join(self.path, RUN_LOCK)} is held by another trainer")
        return lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def save_config(self, cfg: Config) -> None:
        """Writes ``config.yaml`` (rank 0)."""
        if self.is_rank0:
            save_config(cfg, os.path.join(self.path, "config.yaml"))

    # ------------------------------------------------------------------ stop requests

    def stop_asked_here(self) -> bool:
        """Whether this rank was asked to stop (a signal, or the stop file); no collective."""
        return self.stop_requested or os.path.exists(os.path.join(self.path, STOP_FILE))

    def should_stop(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it)."""
        return any_rank(self.info.device, self.stop_asked_here())[0]

    # ------------------------------------------------------------------ markers (rank 0 writes them)

    def is_marked_finished(self) -> bool:
        return os.path.exists(os.path.join(self.path, FINISHED))

    def mark_finished(self, step: int) -> None:
        """Writes ``finished`` (the run reached train.train_iters at ``step``); rank 0 only."""
        if self.is_rank0:
            atomic_write(os.path.join(self.path, FINISHED), str(step))

    def mark_preempted(self, step: int) -> None:
        """Writes ``preempted`` (stopped by a signal or the stop file after saving ``step``) and removes
        the stop file, which has been obeyed; rank 0 only."""
        if self.is_rank0:
            atomic_write(os.path.join(self.path, PREEMPTED), str(step))
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.path, STOP_FILE))

    def clear_end_markers(self) -> None:
        """Removes ``finished`` and ``preempted`` when a run (re)starts training; rank 0 only."""
        if self.is_rank0:
            for name in (FINISHED, PREEMPTED):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.path, name))
