"""What a checkpoint of a run holds, and whether a run may resume one.

A checkpoint (``checkpoint.py`` writes the directory: DeepSpeed's files, failures agreed on every rank,
the manifest, ``latest``, pruning) holds, besides DeepSpeed's engine state and the client state:

* ``export/`` (``model.pt``: the canonical weights, and the EMA's, from ``model/export.py``'s gather;
  ``config.yaml``; the tokenizer): :func:`write_export_stage` and :func:`merge_export`, the one place
  that writes it;
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
from card_megatron.model.export import gather_canonical_state
from card_megatron.parallel.deepspeed_glue import resolve_dtype
from card_megatron.parallel.state import ParallelInfo
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


# ---------------------------------------------------------------------- the export (export/model.pt)


def write_export_stage(export_dir: str, stage_index: int, state: dict, ema_state: Optional[dict], writing) -> None:
    """One pipeline stage's canonical weights (and its EMA's, or None) into ``export_dir`` (its writer rank)."""
    os.makedirs(export_dir, exist_ok=True)
    with atomic_open(writing(os.path.join(export_dir, f"stage_{stage_index:03d}.pt")), "wb") as f:
        torch.save({"state_dict": state, "ema_state_dict": ema_state}, f)


def merge_export(export_dir: str, num_stages: int, step: int, writing) -> None:
    """Merges the stages' files into ``export_dir/model.pt`` (``state_dict``, ``step`` and, with an EMA,
    ``ema_state_dict``) and removes them (rank 0, after every stage wrote its file)."""
    file = writing(os.path.join(export_dir, "model.pt"))
    merged: dict[str, torch.Tensor] = {}
    merged_ema: dict[str, torch.Tensor] = {}
    for i in range(num_stages):
        part = torch.load(os.path.join(export_dir, f"stage_{i:03d}.pt"), weights_only=True)
        merged.update(part["state_dict"])
        merged_ema.update(part["ema_state_dict"] or {})
    blob = {"state_dict": merged, "step": step}
    if merged_ema:
        blob["ema_state_dict"] = merged_ema
    with atomic_open(file, "wb") as f:
        torch.save(blob, f)
    for i in range(num_stages):
        os.remove(os.path.join(export_dir, f"stage_{i:03d}.pt"))


# ---------------------------------------------------------------------- saving


class Checkpoints:
    """Saves this run's checkpoints (every rank calls :meth:`save`) with everything listed above."""

    def __init__(self, cfg: Config, info: ParallelInfo, engine, tokenizer, ema: RunEMA):
        self.cfg, self.info, self.engine, self.tokenizer, self.ema = cfg, info, engine, tokenizer, ema
        self.exports = info.dp_rank == 0 and info.tp_rank == 0  # writes its pipeline stage's export

    def _gather(self) -> dict[str, torch.Tensor]:
        """This stage's canonical weights (collective over the tensor-parallel group; ZeRO-3 gathers)."""
        return gather_canonical_state(
            self.engine.module,
            self.cfg.model.num_layers,
            self.info.tp_group,
            self.info.tp_size,
            zero3=self.cfg.parallel.zero_stage == 3,
        )

    def save(self, step: int, client_state: dict) -> str:
        """Saves checkpoint ``step`` with ``client_state`` (what an exact resume needs); returns its directory."""
        state = self._gather()
        ema_state = None
        if self.ema.ema is not None:
            with self.ema.weights():  # the EMA is gathered exactly as the weights are
                ema_state = self._gather()
        meta = {
            "step": step,
            "consumed_samples": client_state["consumed_samples"],
            "data_parallel_size": client_state.get("data_parallel_size"),
            "vocab_size": client_state.get("vocab_size"),  # the model's rows (train.init_from keeps its own)
            "resolved": resolved_settings(self.cfg, self.info),
            "tokenizer_sha256": self.tokenizer.sha256,
            "data": data_identity(self.cfg.data.data_path),
        }
        exported = (state, ema_state) if self.exports else (None, None)
        contents = _Contents(self, client_state, meta, *exported)
        return ckpt.save_checkpoint(
            self.engine, self.cfg.train.run_dir, step, contents, self.cfg.train.keep_last_checkpoints
        )


class _Contents:
    """The files of one checkpoint beyond DeepSpeed's (``checkpoint.save_checkpoint`` calls these)."""

    def __init__(self, owner: Checkpoints, client_state: dict, meta: dict, export: Optional[dict], ema_export):
        self.owner, self.client_state, self.meta = owner, client_state, meta  # client_state: DeepSpeed saves it
        self.export, self.ema_export = export, ema_export

    def write_rank_files(self, path: str, writing: Callable[[str], str]) -> None:
        """This rank's own files: its EMA state, its stage of the export."""
        own = self.owner.ema.file_to_save()
        if own is not None:
            file, state = own
            with atomic_open(writing(os.path.join(path, file)), "wb") as f:
                torch.save(state, f)
        if self.export is not None:
            write_export_stage(
                os.path.join(path, "export"), self.owner.info.pp_rank, self.export, self.ema_export, writing
            )

    def write_shared_files(self, path: str, writing: Callable[[str], str]) -> dict:
        """Rank 0, after every rank's files: the merged export, the config and the tokenizer; returns
        the fields of ``meta.json`` (the manifest is added by the caller)."""
        cfg, info, export_dir = self.owner.cfg, self.owner.info, os.path.join(path, "export")
        merge_export(export_dir, info.pp_size, self.meta["step"], writing)
        config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        for file in (os.path.join(path, "config.yaml"), os.path.join(export_dir, "config.yaml")):
            atomic_write(writing(file), config_yaml)
        tokenizer_model = cfg.data.tokenizer_model
        if tokenizer_model and os.path.exists(tokenizer_model):
            sidecar = os.path.splitext(tokenizer_model)[0] + ".tokenizer.json"
            for dst in (path, export_dir):
                shutil.copyfile(tokenizer_model, writing(os.path.join(dst, "tokenizer.model")))
                if os.path.exists(sidecar):
                    shutil.copyfile(sidecar, writing(os.path.join(dst, "tokenizer.tokenizer.json")))
        return self.meta
