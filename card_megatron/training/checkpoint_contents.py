"""What a checkpoint of a run holds, and whether a run may resume one.

A checkpoint (``checkpoint.py`` writes the directory: DeepSpeed's files, failures agreed on every rank,
the manifest, ``latest``, pruning) holds, besides DeepSpeed's engine state and the client state:

* ``export/`` (``model/sharded_export.py``: one safetensors shard of the canonical weights, and of the
  EMA's, per tensor/pipeline rank, written by its data-parallel rank 0 with nothing gathered across
  ranks; ``config.yaml``; the tokenizer; the index ``model.index.json``, last) at the saves that
  ``train.export_interval`` picks (:func:`export_due`): :func:`write_export_shards` (every rank) and
  :func:`write_export_index` (rank 0), the one place that writes it;
* with an EMA, ``ema_tp*_pp*_dp*.pt`` (``ema.RunEMA`` says which rank writes which);
* ``config.yaml``, the tokenizer and ``meta.json`` (step, consumed samples, data-parallel size,
  vocabulary rows, and what a resume compares beyond the config: the resolved precision and
  backend, the tokenizer's sha256, the data's identity).

:func:`check_resume` compares a run with a checkpoint before anything is built and refuses, listing
every difference (docs/design.md "Resuming").
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Callable, Optional

import torch
import yaml

from card_megatron.config import Config, ConfigError, config_to_dict, resume_changes
from card_megatron.data.dataset import data_identity, data_identity_changes
from card_megatron.fileio import atomic_open, atomic_write
from card_megatron.model.sharded_export import ShardPart, local_pieces, shard_file, write_index, write_shards
from card_megatron.parallel.deepspeed_glue import resolve_dtype
from card_megatron.parallel.state import ParallelInfo
from card_megatron.rundir import EXPORT_INDEX
from card_megatron.tokenizers import load_tokenizer
from card_megatron.training import checkpoint as ckpt
from card_megatron.training.ema import RunEMA, has_ema


def resolved_settings(cfg: Config, info: ParallelInfo) -> dict[str, str]:
    """What the settings that resolve by machine became here (a resume compares them, not ``auto``)."""
    return {
        "train.precision": resolve_dtype(cfg.train.precision, info.device.type == "cuda"),
        "parallel.distributed_backend": info.backend,
    }


def check_resume(path: str, cfg: Config, info: ParallelInfo) -> None:
    """Raises ConfigError listing what this run changes that a resume of ``path`` may not: the config
    (config.RESUMABLE says what may change; settings such as ``auto`` compare by what they resolve
    to), the tokenizer's sha256 and the data's identity (the same paths holding other files), and an
    EMA dropped without train.drop_ema."""
    saved, meta = ckpt.saved_config(path), ckpt.saved_meta(path)
    changes = (
        resume_changes(
            saved,
            cfg,
            meta.get("data_parallel_size"),
            info.dp_size,
            meta.get("resolved"),
            resolved_settings(cfg, info),
        )  # fmt: skip
        if saved is not None
        else []
    )
    # Files that cannot be read are left to the builders, which name them; the config's own
    # changes (another data_path, say) are listed first.
    if "tokenizer_sha256" in meta and os.path.isfile(cfg.data.tokenizer_model):
        now = load_tokenizer(cfg.data.tokenizer_model).sha256
        if now != meta["tokenizer_sha256"]:
            changes.append(
                f"the tokenizer {cfg.data.tokenizer_model}: sha256 {meta['tokenizer_sha256'][:16]}... -> "
                f"{now[:16]}... (another file under the same path)"
            )
    if "data" in meta:
        with contextlib.suppress(ValueError):
            changes += data_identity_changes(meta["data"], data_identity(cfg.data.data_path))
    if cfg.optim.ema_decay == 0.0 and has_ema(path) and not cfg.train.drop_ema:
        changes.append(
            "optim.ema_decay: the checkpoint holds an EMA of the weights and optim.ema_decay is 0, which "
            "would drop it: set optim.ema_decay to continue it, or train.drop_ema=true to drop it"
        )
    if changes:
        raise ConfigError(
            f"cannot resume {path} with this config; it changes what a resume may not change:\n  - "
            + "\n  - ".join(changes)
            + f"\nRestore these values, or start a new run with another train.run_dir (now {cfg.train.run_dir}). "
            "docs/design.md 'Resuming' says what may change."
        )


# ---------------------------------------------------------------------- the export (export/: shards + index)


def export_due(step: int, train_iters: int, save_interval: int, export_interval: int) -> bool:
    """Whether the save at ``step`` writes the export (``train.export_interval``): 1 = every save; 0 = only
    the final one (``step >= train_iters``); N = the final one and the periodic saves at multiples of
    N x ``save_interval`` (a save on a signal or ``train.exit_interval`` writes none unless N is 1)."""
    if export_interval == 1 or step >= train_iters:
        return True
    return export_interval > 1 and save_interval > 0 and step % (save_interval * export_interval) == 0


def write_export_shards(export_dir: str, part: ShardPart, writing: Callable[[str], str]) -> None:
    """This rank's shard files of the export (its weights' pieces and its EMA's); none on the ranks that
    write nothing (``part.writes`` False). A failed write is an OSError naming the shard."""
    if part.writes:
        writing(os.path.join(export_dir, shard_file("weights", part.tp_rank, part.pp_rank)))
        write_shards(export_dir, part)


def write_export_index(
    export_dir: str, part: ShardPart, step: int, data_parallel_size: Optional[int], writing: Callable[[str], str]
) -> None:
    """``model.index.json`` from every shard's header (rank 0, after every rank wrote its shards, last in
    the export: its presence says the export is complete). FileNotFoundError names a missing shard,
    ValueError a tensor the shards do not cover."""
    writing(os.path.join(export_dir, EXPORT_INDEX))
    layout = {
        "tensor_model_parallel_size": part.tp_size,
        "pipeline_model_parallel_size": part.pp_size,
        "data_parallel_size": data_parallel_size,
    }
    write_index(export_dir, part.tp_size, part.pp_size, part.ema is not None, step, layout)


# ---------------------------------------------------------------------- saving


class Checkpoints:
    """Saves this run's checkpoints (every rank calls :meth:`save`) with everything listed above."""

    def __init__(self, cfg: Config, info: ParallelInfo, engine, tokenizer, ema: RunEMA):
        self.cfg, self.info, self.engine, self.tokenizer, self.ema = cfg, info, engine, tokenizer, ema

    def _export_part(self) -> ShardPart:
        """This rank's part of the export: its slice of the canonical weights (and EMA), nothing gathered
        across tensor or pipeline ranks; data-parallel rank 0 writes it. Collective under ZeRO-3."""
        info = self.info
        zero3 = self.cfg.parallel.zero_stage == 3
        part = ShardPart(info.tp_rank, info.pp_rank, info.tp_size, info.pp_size, writes=info.dp_rank == 0)
        if not (part.writes or zero3):
            return part
        named = list(self.engine.module.named_parameters())
        layers = self.cfg.model.num_layers
        if self.ema.ema is not None:
            with self.ema.weights():  # the EMA's pieces are taken exactly as the weights'
                part.ema, _ = local_pieces(named, layers, info.tp_rank, info.tp_size, zero3=zero3, copy=True)
        part.weights, part.pieces = local_pieces(named, layers, info.tp_rank, info.tp_size, zero3=zero3)
        if not part.writes:
            part.weights, part.ema, part.pieces = {}, None, {}
        return part

    def save(self, step: int, client_state: dict) -> str:
        """Saves checkpoint ``step`` with ``client_state`` (what an exact resume needs), with the export
        when :func:`export_due` (every rank decides alike); returns its directory."""
        t = self.cfg.train
        export = self._export_part() if export_due(step, t.train_iters, t.save_interval, t.export_interval) else None
        meta = {
            "step": step,
            "consumed_samples": client_state["consumed_samples"],
            "data_parallel_size": client_state.get("data_parallel_size"),
            "vocab_size": client_state.get("vocab_size"),  # the model's rows (train.init_from keeps its own)
            "resolved": resolved_settings(self.cfg, self.info),
            "tokenizer_sha256": self.tokenizer.sha256,
            "data": data_identity(self.cfg.data.data_path),
        }
        contents = _Contents(self, client_state, meta, export)
        return ckpt.save_checkpoint(self.engine, t.run_dir, step, contents, t.keep_last_checkpoints)


class _Contents:
    """The files of one checkpoint beyond DeepSpeed's (``checkpoint.save_checkpoint`` calls these)."""

    def __init__(self, owner: Checkpoints, client_state: dict, meta: dict, export: Optional[ShardPart]):
        self.owner, self.client_state, self.meta = owner, client_state, meta  # client_state: DeepSpeed saves it
        self.export = export  # None: this save writes no export

    def write_rank_files(self, path: str, writing: Callable[[str], str]) -> None:
        """This rank's own files: its EMA state, its shards of the export."""
        own = self.owner.ema.file_to_save()
        if own is not None:
            file, state = own
            with atomic_open(writing(os.path.join(path, file)), "wb") as f:
                torch.save(state, f)
        if self.export is not None:
            write_export_shards(os.path.join(path, "export"), self.export, writing)

    def write_shared_files(self, path: str, writing: Callable[[str], str]) -> dict:
        """Rank 0, after every rank's files: the config and the tokenizer (into the export too, when this
        save writes one), then the export's index; returns the fields of ``meta.json`` (the manifest is
        added by the caller)."""
        cfg, export_dir = self.owner.cfg, os.path.join(path, "export")
        copy_to = [path, export_dir] if self.export is not None else [path]
        if self.export is not None:
            os.makedirs(export_dir, exist_ok=True)
        config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        for dst in copy_to:
            atomic_write(writing(os.path.join(dst, "config.yaml")), config_yaml)
        tokenizer_model = cfg.data.tokenizer_model
        if tokenizer_model and os.path.exists(tokenizer_model):
            sidecar = os.path.splitext(tokenizer_model)[0] + ".tokenizer.json"
            for dst in copy_to:
                shutil.copyfile(tokenizer_model, writing(os.path.join(dst, "tokenizer.model")))
                if os.path.exists(sidecar):
                    shutil.copyfile(sidecar, writing(os.path.join(dst, "tokenizer.tokenizer.json")))
        if self.export is not None:
            write_export_index(export_dir, self.export, self.meta["step"], self.meta["data_parallel_size"], writing)
        return self.meta
