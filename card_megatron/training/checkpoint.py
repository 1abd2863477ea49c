"""The run directory's checkpoints and markers: DeepSpeed engine state plus everything needed to
continue exactly, and the files that say how a run ended or that it should stop.

Markers in ``{run_dir}`` (:func:`mark_finished`, :func:`mark_preempted`, :func:`clear_end_markers`,
:func:`stop_file_exists`): ``finished`` or ``preempted`` (the step, written by rank 0 when a run
ends) and ``SAVE_AND_EXIT`` (:data:`STOP_FILE`, touched by ``slurm/pretrain.sh`` when SLURM
signals the batch shell: save at the next step and exit).

Layout of ``{run_dir}/checkpoints``::

    step_00000100/            DeepSpeed engine checkpoint (model, optimizer, ZeRO shards)
        client state            consumed samples, step, RNG states (inside DeepSpeed's files)
        config.yaml             the resolved config (a resume compares it: config.resume_changes)
        meta.json               step, consumed samples, data-parallel size
        tokenizer.model         the tokenizer the run used
        export/                 canonical weights, loadable under any layout (model/sharded_export.py):
                                one safetensors shard per (tensor, pipeline) rank, written in parallel
                                by data-parallel rank 0 of each, no gathering (with an EMA, the EMA
                                weights sharded alike), config.yaml, tokenizer.model, and the index
                                model.index.json, written last; only at the saves that
                                ``train.export_interval`` picks (:func:`export_due`)
        ema_tp*_pp*_dp*.pt      with an EMA: the fp32 EMA of one rank's local parameters, one file
                                per (tensor, pipeline) rank; per data-parallel rank only under ZeRO-3
        meta.json               step, consumed samples, vocabulary rows and the manifest (every
                                file's size), written last
    latest                    names the newest *complete* checkpoint

``latest`` is replaced atomically only after every rank has finished writing, so a job
killed mid-save resumes from the previous checkpoint; a save never writes into the
directory ``latest`` names (a step already saved is not saved again). On resume, a
checkpoint whose files disagree with its manifest (truncated, missing; an empty or
dangling ``latest``) is named in a warning and the newest complete one is used instead
(``card_megatron/rundir.py``, which every reader of a run directory uses). Only the last N are kept.

Loading runs no code from the files: every file is read with ``torch.load(weights_only=True)``
(DeepSpeed's own loader, ``TorchCheckpointEngine.load``, uses ``weights_only=False``; it is
replaced by :class:`SafeCheckpointEngine`), the RNG states are stored as tensors and numbers,
and only DeepSpeed's plain state classes are allowlisted. ``train.trust_checkpoint=true``
loads with ``weights_only=False`` (checkpoints from elsewhere that hold other objects). Whatever
loads is checked before DeepSpeed uses it (:func:`check_structure`: depth, sharing, types, dense
tensors; :func:`check_layout`: every tensor's shape and dtype against :func:`expected_layout` of
the live engine) and refused naming the file and the key.

A write that fails during a save is raised on every rank as one :class:`CheckpointSaveError`
naming the file ("No space left on device while writing ..." for a full disk) and saying that the
previous checkpoint stays intact; the unfinished directory is removed. ``meta.json`` also records
what a resume compares beyond the config: the resolved precision and backend, the tokenizer's
sha256 and the data's identity (``data.dataset.data_identity``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from card_megatron.config import Config, config_from_dict
from card_megatron.fileio import atomic_open, atomic_write
from card_megatron.model.sharded_export import ShardPart, shard_file, write_index, write_shards
from card_megatron.rundir import (
    EXPORT_INDEX,
    checkpoint_problem,
    checkpoints_dir,
    has_export,
    is_checkpoint_tag,
    tag_for,
)
from card_megatron.training.checkpoint_checks import (  # noqa: F401 (re-exported: the checks of safe_load)
    MAX_DEPTH,
    CheckpointContentError,
    check_layout,
    check_structure,
    check_tensor,
    expected_layout,
)

log = logging.getLogger(__name__)

_EMA_FILE = re.compile(r"^ema_tp\d+_pp\d+_dp\d+\.pt$")


STOP_FILE = "SAVE_AND_EXIT"  # touched by slurm/pretrain.sh when SLURM signals the batch shell
FINISHED, PREEMPTED = "finished", "preempted"  # how a run ended; each holds the step


def mark_finished(run_dir: str, step: int) -> None:
    """Writes ``{run_dir}/finished`` (the run reached train.train_iters at ``step``); rank 0 only."""
    atomic_write(os.path.join(run_dir, FINISHED), str(step))


def mark_preempted(run_dir: str, step: int) -> None:
    """Writes ``{run_dir}/preempted`` (stopped by a signal or the stop file after saving ``step``) and
    removes the stop file, which has been obeyed; rank 0 only."""
    atomic_write(os.path.join(run_dir, PREEMPTED), str(step))
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, STOP_FILE))


def is_marked_finished(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, FINISHED))


def clear_end_markers(run_dir: str) -> None:
    """Removes ``finished`` and ``preempted`` when a run (re)starts training; rank 0 only."""
    for name in (FINISHED, PREEMPTED):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))


def stop_file_exists(run_dir: str) -> bool:
    """Whether ``{run_dir}/SAVE_AND_EXIT`` asks the run to save and exit."""
    return os.path.exists(os.path.join(run_dir, STOP_FILE))


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, numbers and tuples (``weights_only=True`` loads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # checkpoints saved before the RNG states were tensors (loaded with train.trust_checkpoint)
        np.random.set_state(n)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def ema_file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """The file of one rank's EMA state in a checkpoint directory (dp_rank 0 unless ZeRO-3)."""
    return f"ema_tp{tp_rank:02d}_pp{pp_rank:03d}_dp{dp_rank:05d}.pt"


def save_checkpoint(
    engine,
    run_dir: str,
    step: int,
    client_state: dict,
    *,
    config_yaml: str,
    tokenizer_model: str,
    export: Optional[ShardPart],
    keep_last: int,
    rank: int,
    ema_state: Optional[dict] = None,
    ema_file: Optional[str] = None,
    meta_extra: Optional[dict] = None,
) -> str:
    """Saves a checkpoint collectively (every rank calls it); returns its directory.

    ``export`` is this rank's part of the export (its pieces of the canonical weights and EMA,
    :func:`model.sharded_export.local_pieces`; empty on data-parallel ranks other than 0), or None
    on every rank when this save writes no export. Each rank writes its shards; after a barrier
    rank 0 writes the index, last. ``ema_state``
    is the EMA state that this rank writes to ``ema_file`` (None on ranks that write none).
    ``meta_extra`` goes into ``meta.json`` as well (the resolved precision and backend, the tokenizer's
    sha256 and the data's fingerprints: a resume compares them). A failed write raises
    :class:`CheckpointSaveError` on every rank, naming the file; ``latest`` then still names the
    previous checkpoint, and the unfinished directory is removed.
    """
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    path = os.path.join(root, tag)
    pointer = os.path.join(root, "latest")
    previous = open(pointer).read().strip() if os.path.exists(pointer) else ""
    if previous == tag and checkpoint_problem(path) is None:
        if rank == 0:
            log.info("step %d is already saved in %s: not saving it again", step, path)
        return path  # every rank decides alike: latest was written before the last barrier

    def write_files() -> None:
        """Writes every file of the checkpoint (collective). A failed write on any rank is raised on
        every rank (:func:`_agree_on_failure`), after the collectives it would have skipped."""
        failure = getattr(engine, "_card_save_failure", None) or _SaveFailure()
        failure.file, failure.error = None, None
        engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        failed: Optional[tuple[str, BaseException]] = (failure.file, failure.error) if failure.error else None
        export_dir = os.path.join(path, "export")
        if failed is None:
            file = ""
            try:
                if ema_state is not None:
                    file = os.path.join(path, ema_file)
                    with atomic_open(file, "wb") as f:
                        torch.save(ema_state, f)
                if export is not None:
                    file = os.path.join(export_dir, shard_file("weights", export.tp_rank, export.pp_rank))
                    write_shards(export_dir, export)
            except (OSError, RuntimeError) as e:
                failed = ((e.filename if isinstance(e, OSError) and e.filename else file), e)
        _agree_on_failure(failed, path, root, previous)  # a barrier: every shard is written
        if rank == 0:
            file = os.path.join(path, "config.yaml")
            try:
                atomic_write(file, config_yaml)
                copy_to = [path]
                if export is not None:
                    os.makedirs(export_dir, exist_ok=True)
                    file = os.path.join(export_dir, "config.yaml")
                    atomic_write(file, config_yaml)
                    copy_to.append(export_dir)
                if tokenizer_model and os.path.exists(tokenizer_model):
                    for dst in copy_to:
                        file = os.path.join(dst, "tokenizer.model")
                        shutil.copyfile(tokenizer_model, file)
                        sidecar = os.path.splitext(tokenizer_model)[0] + ".tokenizer.json"
                        if os.path.exists(sidecar):
                            file = os.path.join(dst, "tokenizer.tokenizer.json")
                            shutil.copyfile(sidecar, file)
                if export is not None:  # last in the export: its presence says the export is complete
                    file = os.path.join(export_dir, EXPORT_INDEX)
                    layout = {
                        "tensor_model_parallel_size": export.tp_size,
                        "pipeline_model_parallel_size": export.pp_size,
                        "data_parallel_size": client_state.get("data_parallel_size"),
                    }
                    write_index(export_dir, export.tp_size, export.pp_size, export.ema is not None, step, layout)
                files = {
                    os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
                    for d, _, names in os.walk(path)
                    for f in names
                }
                meta = {
                    "step": step,
                    "consumed_samples": client_state["consumed_samples"],
                    "data_parallel_size": client_state.get("data_parallel_size"),
                    "vocab_size": client_state.get("vocab_size"),  # the model's rows (train.init_from keeps its own)
                    **(meta_extra or {}),
                    "files": files,
                }
                file = os.path.join(path, "meta.json")
                atomic_write(file, json.dumps(meta, indent=1, sort_keys=True))
            except (OSError, RuntimeError, ValueError) as e:
                failed = (file, e)
        _agree_on_failure(failed, path, root, previous)

    try:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            if os.path.isdir(path):  # an unfinished save of this step (or a broken checkpoint `latest` names)
                shutil.rmtree(path)
        dist.barrier()
        write_files()
    except CheckpointSaveError:
        if rank == 0:  # never the directory `latest` names: a save never writes into that one
            shutil.rmtree(path, ignore_errors=True)
        raise
    except (OSError, RuntimeError) as e:
        raise _save_error((path, e), path, root, previous) from e
    if rank == 0:
        atomic_write(pointer, tag)
        _prune(root, keep_last)
    dist.barrier()
    return path


class CheckpointSaveError(OSError):
    """A checkpoint save failed on some rank; the message names the file and what is intact."""


def _agree_on_failure(failed: Optional[tuple[str, BaseException]], path: str, root: str, previous: str) -> None:
    """Collective: raises :class:`CheckpointSaveError` on every rank when any rank's write failed
    (``failed``: its file and error), with the first failing rank's file and error."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    mine = None
    if failed:
        file, e = failed
        mine = (file, _error_text(e), _is_disk_full(e, root))
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    file, text, full = next(r for r in reports if r)
    raise _save_error_text(file, text, full, path, root, previous)


def _error_chain(e: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _error_text(e: BaseException) -> str:
    return " / ".join(str(x).splitlines()[0] if str(x) else type(x).__name__ for x in _error_chain(e))


# torch's zip writer reports a short write (a full disk) as "unexpected pos N vs M" or "file write failed".
_SHORT_WRITE = ("unexpected pos", "write failed", "iostream error")
_NEARLY_FULL_BYTES = 16 * 2**20


def _is_disk_full(e: BaseException, root: str) -> bool:
    """Whether error ``e`` of a write under ``root`` means the disk (or quota) is full: ENOSPC or EDQUOT
    anywhere in its chain, or torch's short-write error with less than 16 MiB left on ``root``."""
    chain = _error_chain(e)
    if any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for x in chain):
        return True
    text = _error_text(e)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    return any(m in text for m in _SHORT_WRITE) and 0 <= _free_bytes(root) < _NEARLY_FULL_BYTES


def _free_bytes(root: str) -> int:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return -1


def _save_error(failed: tuple[str, BaseException], path: str, root: str, previous: str) -> CheckpointSaveError:
    file, e = failed
    return _save_error_text(file, _error_text(e), _is_disk_full(e, root), path, root, previous)


def _save_error_text(file: str, text: str, full: bool, path: str, root: str, previous: str) -> CheckpointSaveError:
    """The error of a failed save: the file, whether the disk is full, and what is intact."""
    intact = (
        f"the previous checkpoint {os.path.join(root, previous)} stays intact and a restart resumes from it"
        if previous
        else "there is no earlier checkpoint"
    )
    if full:
        free = _free_bytes(root)
        return CheckpointSaveError(
            errno.ENOSPC,
            f"No space left on device while writing {file} ({text}): checkpoint {path} was not saved and is "
            f"removed; {intact}. Free space on {root} ({max(free, 0) / 2**20:.1f} MiB left) or lower "
            "train.keep_last_checkpoints",
        )
    return CheckpointSaveError(
        errno.EIO, f"writing {file} failed ({text}): checkpoint {path} was not saved and is removed; {intact}"
    )


def _prune(root: str, keep_last: int) -> None:
    """Keeps the newest ``keep_last`` checkpoints, and the newest one with an export when none of those
    has one (``train.export_interval`` other than 1)."""
    tags = sorted(t for t in os.listdir(root) if is_checkpoint_tag(t))
    latest = open(os.path.join(root, "latest")).read().strip()
    done = [t for t in tags if t <= latest]
    exported = [t for t in done if has_export(os.path.join(root, t, "export"))]
    keep = set(done[-keep_last:]) | set(exported[-1:])  # the kept ones are the newest: holds one if any does
    for t in done:
        if t not in keep:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def export_due(step: int, train_iters: int, save_interval: int, export_interval: int) -> bool:
    """Whether the save at ``step`` writes the export (``train.export_interval``): 1 = every save; 0 = only
    the final one (``step >= train_iters``); N = the final one and the periodic saves at multiples of
    N x ``save_interval`` (a save on a signal or ``train.exit_interval`` writes none unless N is 1)."""
    if export_interval == 1 or step >= train_iters:
        return True
    return export_interval > 1 and save_interval > 0 and step % (save_interval * export_interval) == 0


def has_ema(path: str) -> bool:
    """Whether checkpoint ``path`` holds EMA files."""
    return any(_EMA_FILE.match(f) for f in os.listdir(path))


def load_ema_state(path: str, ema_file: str, layout_files: set[str]) -> Optional[dict]:
    """The EMA state in ``ema_file`` of checkpoint ``path``; None when the checkpoint has no EMA.

    ``layout_files`` are the EMA files that the current layout writes (the same set on every
    rank, so every rank decides alike). Raises ValueError when the checkpoint's EMA files are
    another set: the EMA was saved under another layout, and it is not resharded.
    """
    found = {f for f in os.listdir(path) if _EMA_FILE.match(f)}
    if not found:
        return None
    if found != layout_files:
        names = sorted(found)
        raise ValueError(
            f"{path} holds the EMA of another parallel layout ({len(names)} files: {', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}; this layout needs {len(layout_files)}). The EMA is not resharded: "
            "resume with the tensor and pipeline sizes (and, under ZeRO-3, the data-parallel size) that saved it"
        )
    return safe_load(os.path.join(path, ema_file), map_location="cpu")  # checked like every resume file


def saved_config(path: str) -> Optional[Config]:
    """The config that checkpoint ``path`` was saved with (its ``config.yaml``), or None without one."""
    file = os.path.join(path, "config.yaml")
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return config_from_dict(yaml.safe_load(f) or {})


def saved_meta(path: str) -> dict:
    """Checkpoint ``path``'s ``meta.json`` (step, consumed_samples, data_parallel_size, vocab_size); {} without one."""
    file = os.path.join(path, "meta.json")
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        return json.load(f)


# DeepSpeed's plain state classes that its checkpoints pickle (values, no behaviour on load).
_DEEPSPEED_STATE_CLASSES = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def safe_load(path: str, map_location=None, trust: bool = False, expected: Optional[Callable] = None) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's state classes allowlisted, then checked.

    Raises ValueError naming the file when it holds anything else (a planted payload, or an
    object this code never saves): the file is refused, nothing in it runs. ``trust`` loads with
    ``weights_only=False`` instead (train.trust_checkpoint=true: run directories you trust).
    Whatever loads is then checked by :func:`check_structure` (with ``trust``, other types pass) and,
    with ``expected`` (``expected(path, obj)``, e.g. :func:`check_against_engine`), against the layout
    the current model and optimizer need.
    """
    if trust:
        obj = torch.load(path, map_location=map_location, weights_only=False)
        check_structure(obj, path, (object,))
    else:
        obj = _load_weights_only(path, map_location)
        check_structure(obj, path, tuple(_DEEPSPEED_STATE_CLASSES))
    if expected is not None:
        expected(path, obj)
    return obj


def _load_weights_only(path: str, map_location) -> Any:
    try:
        with torch.serialization.safe_globals(_DEEPSPEED_STATE_CLASSES):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line), None)
        if detail is None:  # not a forbidden object: a damaged file
            what = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
            raise ValueError(
                f"{path} is corrupt ({what}); move {os.path.dirname(path)} out "
                "of the way to resume from the previous checkpoint"
            ) from None
        raise ValueError(
            f"refusing to load {path}: it holds an object outside the allowlist ({detail}), and loading it could "
            "run code. Checkpoints saved by this code hold none (those saved before the RNG states were stored as "
            "tensors hold NumPy arrays). If you trust the run directory, resume with train.trust_checkpoint=true"
        ) from None
    except (EOFError, RuntimeError) as e:
        raise ValueError(
            f"{path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"move {os.path.dirname(path)} out of the way to resume from the previous checkpoint"
        ) from None


class _SaveFailure:
    """Records the first file whose write failed during a DeepSpeed save, so that the save runs its
    collectives to the end on every rank and the failure is raised once, everywhere, naming the file."""

    def __init__(self) -> None:
        self.file: Optional[str] = None
        self.error: Optional[BaseException] = None


def install_safe_io(engine, trust: bool) -> _SaveFailure:
    """Makes ``engine`` (a DeepSpeed engine) read checkpoint files with :func:`safe_load` (checked
    against :func:`expected_layout`) and record, instead of raising, a failed write (:func:`save_checkpoint`
    turns it into one error naming the file). Returns the failure record."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(
            f"checkpoint loading is only made safe for DeepSpeed's TorchCheckpointEngine, this engine "
            f"uses {type(engine.checkpoint_engine).__name__}"
        )
    layout: dict = {}
    own = f"_mp_rank_{engine.checkpoint_mp_rank:02d}_"  # this rank's model-parallel files

    def expected(path: str, obj: Any) -> None:
        # DeepSpeed also reads other model-parallel ranks' files (the first one, for its metadata; a
        # pipeline stage's differs in shape): those get the structure checks only.
        if own not in "_" + os.path.basename(path):
            return
        if not layout:
            layout.update(expected_layout(engine))
        check_layout(path, obj, layout)

    engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location, trust, expected)
    failure = _SaveFailure()
    save = engine.checkpoint_engine.save

    def guarded_save(state_dict, path: str) -> None:
        if failure.error is not None:
            return  # the checkpoint is lost already: write nothing more, let the other ranks finish
        try:
            save(state_dict, path)
        except (OSError, RuntimeError) as e:
            failure.file, failure.error = path, e

    engine.checkpoint_engine.save = guarded_save
    engine._card_save_failure = failure
    return failure


def load_checkpoint(engine, path: str) -> dict:
    """Loads a DeepSpeed checkpoint directory saved by :func:`save_checkpoint`; returns the client state.

    The engine must read files through :func:`install_safe_io`."""
    root, tag = os.path.split(path.rstrip("/"))
    load_path, client_state = engine.load_checkpoint(
        root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    return client_state
