"""The run directory's checkpoints: how one is written (DeepSpeed engine state, then the files
``checkpoint_contents.py`` says a checkpoint holds, then the manifest and ``latest``) and how its files
are read safely.

Layout of ``{run_dir}/checkpoints``::

    step_00000100/            DeepSpeed engine checkpoint (model, optimizer, ZeRO shards)
        client state            consumed samples, step, RNG states (inside DeepSpeed's files)
        config.yaml             the resolved config (a resume compares it: config.resume_changes)
        meta.json               step, consumed samples, data-parallel size
        tokenizer.model         the tokenizer the run used
        export/                 canonical weights under any layout: safetensors shards per TP/PP rank
                                (and the EMA's), config, tokenizer, model.index.json last; at the saves
                                ``train.export_interval`` picks (``checkpoint_contents.py`` says more)
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
(``card_megatron/rundir.py``, which every reader of a run directory uses). Only the last N are kept,
and the newest one with an export.

Reading the files safely (``weights_only``, every file checked before DeepSpeed uses it) is
``safe_io.py``'s.

A write that fails during a save is raised on every rank as one :class:`CheckpointSaveError`
naming the file ("No space left on device while writing ..." for a full disk) and saying that the
previous checkpoint stays intact; the unfinished directory is removed. ``meta.json`` also records
what a resume compares beyond the config: the resolved precision and backend, the tokenizer's
sha256 and the data's identity (``data.dataset.data_identity``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
import yaml

from card_megatron.config import Config, config_from_dict
from card_megatron.fileio import atomic_write
from card_megatron.rundir import checkpoint_problem, checkpoints_dir, has_export, is_checkpoint_tag, tag_for
from card_megatron.training.checkpoint_checks import (  # noqa: F401 (re-exported: the checks of safe_load)
    MAX_DEPTH,
    CheckpointContentError,
    check_layout,
    check_structure,
    check_tensor,
    expected_layout,
)
from card_megatron.training.safe_io import (  # noqa: F401 (install_safe_io, load_checkpoint, safe_load re-exported)
    SaveFailure,
    install_safe_io,
    load_checkpoint,
    safe_load,
)

log = logging.getLogger(__name__)


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


class CheckpointContents(Protocol):
    """The files of one checkpoint beyond DeepSpeed's (``checkpoint_contents.py`` says what they are).

    ``client_state``: what DeepSpeed saves with the engine (step, consumed samples, RNG states). Each
    method passes every file it writes through ``writing(file)``, which returns it: a failed write is
    then named."""

    client_state: dict

    def write_rank_files(self, path: str, writing: Callable[[str], str]) -> None:
        """This rank's own files, after DeepSpeed's."""

    def write_shared_files(self, path: str, writing: Callable[[str], str]) -> dict:
        """Rank 0, after every rank's files; returns the fields of ``meta.json``."""


def save_checkpoint(engine, run_dir: str, step: int, contents: CheckpointContents, keep_last: int) -> str:
    """Saves checkpoint ``step`` of ``run_dir`` collectively (every rank calls it); returns its directory.

    DeepSpeed's files, then each rank's files of ``contents``, then rank 0's and ``meta.json`` (its
    fields, and the manifest: every file and its size), then ``latest``; only the last ``keep_last``
    are kept. A failed write raises :class:`CheckpointSaveError` on every rank, naming the file;
    ``latest`` then still names the previous checkpoint, and the unfinished directory is removed.
    """
    rank = dist.get_rank()
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    path = os.path.join(root, tag)
    pointer = os.path.join(root, "latest")
    previous = open(pointer).read().strip() if os.path.exists(pointer) else ""
    if previous == tag and checkpoint_problem(path) is None:
        if rank == 0:
            log.info("step %d is already saved in %s: not saving it again", step, path)
        return path  # every rank decides alike: latest was written before the last barrier
    try:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            if os.path.isdir(path):  # an unfinished save of this step (or a broken checkpoint `latest` names)
                shutil.rmtree(path)
        dist.barrier()
        _write_files(engine, root, tag, contents, previous)
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


def _write_files(engine, root: str, tag: str, contents: CheckpointContents, previous: str) -> None:
    """Writes every file of the checkpoint (collective). A failed write on any rank is raised on
    every rank (:func:`_agree_on_failure`), after the collectives it would have skipped."""
    path = os.path.join(root, tag)
    failure = getattr(engine, "_card_save_failure", None) or SaveFailure()
    failure.file, failure.error = None, None
    engine.save_checkpoint(root, tag=tag, client_state=contents.client_state, save_latest=False)
    failed: Optional[tuple[str, BaseException]] = (failure.file, failure.error) if failure.error else None
    current = [""]  # the file being written

    def writing(file: str) -> str:
        current[0] = file
        return file

    if failed is None:
        try:
            contents.write_rank_files(path, writing)
        except (OSError, RuntimeError) as e:
            failed = (_failed_file(e, current[0]), e)
    _agree_on_failure(failed, path, root, previous)
    if dist.get_rank() == 0:
        try:
            meta = contents.write_shared_files(path, writing)
            files = {
                os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
                for d, _, names in os.walk(path)
                for f in names
            }
            atomic_write(
                writing(os.path.join(path, "meta.json")), json.dumps({**meta, "files": files}, indent=1, sort_keys=True)
            )
        except (OSError, RuntimeError, ValueError) as e:  # ValueError: the export's shards do not make an index
            failed = (_failed_file(e, current[0]), e)
    _agree_on_failure(failed, path, root, previous)


def _failed_file(e: BaseException, current: str) -> str:
    """The file a failed write names: the error's own (one of several an export call writes), else ``current``."""
    return e.filename if isinstance(e, OSError) and e.filename else current


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
