"""Checkpoints: DeepSpeed engine state plus everything needed to continue exactly.

Layout of ``{run_dir}/checkpoints``::

    step_00000100/            DeepSpeed engine checkpoint (model, optimizer, ZeRO shards)
        client state            consumed samples, step, RNG states (inside DeepSpeed's files)
        config.yaml             the resolved config (a resume compares it: config.resume_changes)
        meta.json               step, consumed samples, data-parallel size
        tokenizer.model         the tokenizer the run used
        export/model.pt         consolidated weights, canonical names, loadable under any layout
                                (with an EMA, also ``ema_state_dict``: the EMA weights, gathered alike)
        ema_tp*_pp*_dp*.pt      with an EMA: the fp32 EMA of one rank's local parameters, one file
                                per (tensor, pipeline) rank; per data-parallel rank only under ZeRO-3
    latest                    names the newest *complete* checkpoint

``latest`` is replaced atomically only after every rank has finished writing, so a job
killed mid-save resumes from the previous checkpoint. Only the last N are kept.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from card_megatron.config import Config, config_from_dict

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step_(\d{8})$")
_EMA_FILE = re.compile(r"^ema_tp\d+_pp\d+_dp\d+\.pt$")


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: str, data: str | bytes) -> None:
    """Writes text or bytes to ``path`` so that readers see the old file or the whole new one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The path of the newest complete checkpoint of a run directory, or None."""
    pointer = os.path.join(checkpoints_dir(run_dir), "latest")
    if not os.path.exists(pointer):
        return None
    tag = open(pointer).read().strip()
    path = os.path.join(checkpoints_dir(run_dir), tag)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {tag!r}, but {path} does not exist")
    return path


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def ema_file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """The file of one rank's EMA state in a checkpoint directory (dp_rank 0 unless ZeRO-3)."""
    return f"ema_tp{tp_rank:02d}_pp{pp_rank:03d}_dp{dp_rank:05d}.pt"


def save_checkpoint(engine, run_dir: str, step: int, client_state: dict, *, config_yaml: str,
                    tokenizer_model: str, export_state: Optional[dict], export_writer: bool,
                    stage_index: int, num_stages: int, keep_last: int, rank: int,
                    export_ema_state: Optional[dict] = None, ema_state: Optional[dict] = None,
                    ema_file: Optional[str] = None) -> str:
    """Saves a checkpoint collectively (every rank calls it); returns its directory.

    ``export_state`` is this stage's canonical weights (from ``model.export``) on the ranks
    with ``export_writer`` True (data- and tensor-parallel rank 0 of each pipeline stage),
    and ``export_ema_state`` the same for the EMA weights (None without EMA). ``ema_state``
    is the EMA state that this rank writes to ``ema_file`` (None on ranks that write none).
    """
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    path = os.path.join(root, tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    if ema_state is not None:
        atomic_write(os.path.join(path, ema_file), _to_bytes(ema_state))
    export_dir = os.path.join(path, "export")
    if export_writer and export_state is not None:
        os.makedirs(export_dir, exist_ok=True)
        part = os.path.join(export_dir, f"stage_{stage_index:03d}.pt")
        torch.save({"state_dict": export_state, "ema_state_dict": export_ema_state}, part + ".tmp")
        os.replace(part + ".tmp", part)
    dist.barrier()
    if rank == 0:
        merged: dict[str, torch.Tensor] = {}
        merged_ema: dict[str, torch.Tensor] = {}
        for i in range(num_stages):
            part = torch.load(os.path.join(export_dir, f"stage_{i:03d}.pt"), weights_only=True)
            merged.update(part["state_dict"])
            merged_ema.update(part["ema_state_dict"] or {})
        blob = {"state_dict": merged, "step": step}
        if merged_ema:
            blob["ema_state_dict"] = merged_ema
        torch.save(blob, os.path.join(export_dir, "model.pt.tmp"))
        os.replace(os.path.join(export_dir, "model.pt.tmp"), os.path.join(export_dir, "model.pt"))
        for i in range(num_stages):
            os.remove(os.path.join(export_dir, f"stage_{i:03d}.pt"))
        atomic_write(os.path.join(path, "config.yaml"), config_yaml)
        atomic_write(os.path.join(export_dir, "config.yaml"), config_yaml)
        if tokenizer_model and os.path.exists(tokenizer_model):
            for dst in (path, export_dir):
                shutil.copyfile(tokenizer_model, os.path.join(dst, "tokenizer.model"))
                sidecar = os.path.splitext(tokenizer_model)[0] + ".tokenizer.json"
                if os.path.exists(sidecar):
                    shutil.copyfile(sidecar, os.path.join(dst, "tokenizer.tokenizer.json"))
        meta = {k: client_state[k] for k in ("step", "consumed_samples", "data_parallel_size") if k in client_state}
        atomic_write(os.path.join(path, "meta.json"), json.dumps(meta))
        atomic_write(os.path.join(root, "latest"), tag)
        _prune(root, keep_last)
    dist.barrier()
    return path


def _prune(root: str, keep_last: int) -> None:
    tags = sorted(t for t in os.listdir(root) if _TAG.match(t))
    latest = open(os.path.join(root, "latest")).read().strip()
    done = [t for t in tags if t <= latest]
    for t in done[:-keep_last]:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


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
    return torch.load(os.path.join(path, ema_file), map_location="cpu", weights_only=True)


def saved_config(path: str) -> Optional[Config]:
    """The config that checkpoint ``path`` was saved with (its ``config.yaml``), or None without one."""
    file = os.path.join(path, "config.yaml")
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return config_from_dict(yaml.safe_load(f) or {})


def saved_meta(path: str) -> dict:
    """Checkpoint ``path``'s ``meta.json`` (step, consumed_samples, data_parallel_size); {} without one."""
    file = os.path.join(path, "meta.json")
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        return json.load(f)


def load_checkpoint(engine, path: str) -> dict:
    """Loads a DeepSpeed checkpoint directory saved by :func:`save_checkpoint`; returns the client state."""
    root, tag = os.path.split(path.rstrip("/"))
    load_path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    return client_state
