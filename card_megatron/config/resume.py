"""Resume rules: which keys a resumed run may change (:data:`RESUMABLE`) and the list of changes it
may not make (:func:`resume_changes`; the trainer refuses them, docs/design.md "Resuming").
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from card_megatron.config.loading import config_to_dict
from card_megatron.config.schema import Config, LoggingConfig

# The keys a resumed run may change (docs/design.md "Resuming"); every other key must equal the
# checkpoint's. The optimizer's betas, eps and weight decay are not here: loading the optimizer
# state brings back the saved ones, so a new value would be ignored without a word.
RESUMABLE = frozenset(
    {
        "train.train_iters",
        "train.micro_batch_size",
        "train.run_dir",
        "train.save_interval",
        "train.export_interval",
        "train.keep_last_checkpoints",
        "train.exit_interval",
        "train.log_interval",
        "train.eval_interval",
        "train.eval_iters",
        "train.eval_ema",
        "train.max_nonfinite_steps",
        "train.trust_checkpoint",
        "train.drop_ema",
        "model.recompute_activations",
        "model.fused_kernels",
        "objective.eval_t_samples",
        "data.allow_missing_sidecar",
        "optim.lr",
        "optim.min_lr",
        "optim.lr_warmup_iters",
        "optim.lr_decay_style",
        "optim.lr_decay_iters",
        "optim.clip_grad",
        "optim.ema_decay",
        "optim.ema_warmup",
        "data.num_workers",
        "data.cache_dir",
        "data.valid_seed",  # which sequences validate, like train.eval_iters: not the training maths
        "parallel.distributed_backend",
        "parallel.distributed_timeout_minutes",
        "model.compile_layers",  # the same function, compiled or not
    }
) | {f"logging.{f.name}" for f in dataclasses.fields(LoggingConfig)}


def resume_changes(
    saved: Config,
    cfg: Config,
    saved_dp: Optional[int] = None,
    dp: Optional[int] = None,
    saved_resolved: Optional[dict[str, str]] = None,
    resolved: Optional[dict[str, str]] = None,
) -> list[str]:
    """Every change from the checkpoint's config ``saved`` to ``cfg`` that a resume may not make,
    as "section.key: saved -> new"; also a data-parallel size change (``saved_dp`` -> ``dp``)
    under ZeRO, whose optimizer state is partitioned by data-parallel rank. [] when none.

    ``saved_resolved`` and ``resolved`` ({"train.precision": "fp32", ...}: what a value such as
    ``auto`` or none became on the saving and on this machine) make those keys compare by what they
    resolve to: ``auto`` saved on a GPU (bf16) and resumed on a CPU (fp32) is a change, ``auto`` and
    ``fp32`` on a CPU are not. A checkpoint without the record compares the values as written."""
    old, new = config_to_dict(saved), config_to_dict(cfg)
    saved_resolved, resolved = saved_resolved or {}, resolved or {}
    changes = []
    for section, values in new.items():
        for key, value in values.items():
            name, before = f"{section}.{key}", old[section][key]
            if name in RESUMABLE:
                continue
            if name in saved_resolved and name in resolved:
                if saved_resolved[name] != resolved[name]:
                    changes.append(f"{name}: {before!r} ({saved_resolved[name]}) -> {value!r} ({resolved[name]})")
            elif value != before:
                changes.append(f"{name}: {before!r} -> {value!r}")
    if saved_dp is not None and dp is not None and saved_dp != dp and cfg.parallel.zero_stage > 0:
        changes.append(
            f"data-parallel size: {saved_dp} -> {dp} under parallel.zero_stage {cfg.parallel.zero_stage} "
            "(the ZeRO optimizer state is not re-partitioned; only ZeRO 0 resumes on another size)"
        )
    return changes
