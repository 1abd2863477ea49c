"""Where things are in a run directory, for whoever reads one: its checkpoints, the newest complete
one, and the export that a path names.

``{run_dir}/checkpoints/step_00000100/`` holds one checkpoint (``training/checkpoint.py`` writes it
and describes its files); ``{run_dir}/checkpoints/latest`` names the newest complete one; a
checkpoint is *complete* when its ``meta.json`` (written last) exists and every file its manifest
lists has the recorded size. A checkpoint saved with an export (every one by default;
``train.export_interval``) holds ``export/``: safetensors shards of the canonical weights, their
index ``model.index.json`` (written last: the export is complete when it exists and every shard it
lists has the recorded size, :func:`export_problem`), ``config.yaml`` and ``tokenizer.model``.
That is what loading, ``train.init_from`` and the interop tools read
(``model/sharded_export.py``); an export written before the shards holds ``model.pt`` instead.

Nothing here imports torch, DeepSpeed or the config: the config (``train.init_from``), training,
inference, evaluation and the study all find checkpoints through this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step_(\d{8})$")


def is_checkpoint_tag(name: str) -> bool:
    """Whether ``name`` is a checkpoint directory's name (``step_00000100``)."""
    return _TAG.match(name) is not None


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_problem(path: str) -> Optional[str]:
    """None if checkpoint ``path`` is complete, else what is wrong, naming the file.

    Complete: ``meta.json`` (written last) exists and every file of its manifest has the
    recorded size. Checkpoints older than the manifest are checked for ``meta.json`` only.
    """
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        return f"{path} does not exist"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return f"{meta_path} is missing (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"{meta_path} is unreadable ({e})"
    return files_problem(path, meta.get("files", {}), f"the manifest {meta_path}")


def files_problem(root: str, files: dict, record: str, missing: str = "") -> Optional[str]:
    """What is wrong with the files a record (a checkpoint's manifest, an export's index) lists under
    ``root`` with their sizes: the first one missing or of another size, or None when all are there."""
    for name, size in files.items():
        file = os.path.join(root, name)
        if not os.path.exists(file):
            return f"{file} is missing{missing} ({record} names it)"
        if os.path.getsize(file) != size:
            return f"{file} holds {os.path.getsize(file)} bytes, {record} says {size}"
    return None


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The path of the newest complete checkpoint of a run directory, or None if it has none.

    Normally the one ``latest`` names. If that one is broken (or ``latest`` is empty or
    dangling), warns naming the broken file and returns the newest complete older one.
    Raises ValueError, naming every problem, when checkpoints exist but none is complete.
    """
    root = checkpoints_dir(run_dir)
    pointer = os.path.join(root, "latest")
    tags = sorted((t for t in os.listdir(root) if is_checkpoint_tag(t)), reverse=True) if os.path.isdir(root) else []
    problems = []
    named = None
    if os.path.exists(pointer):
        named = open(pointer).read().strip()
        if not is_checkpoint_tag(named):
            problems.append(f"{pointer} is empty or names no checkpoint ({named!r})")
            named = None
        else:
            problem = checkpoint_problem(os.path.join(root, named))
            if problem is None:
                return os.path.join(root, named)
            problems.append(problem)
    elif not tags:
        return None
    for tag in tags:
        if named is not None and tag >= named:
            continue  # newer than latest: a save that never finished
        path = os.path.join(root, tag)
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log.warning("%s; resuming from the newest complete checkpoint, %s", "; ".join(problems), path)
            return path
        problems.append(problem)
    if not os.path.exists(pointer):
        return None  # no latest and no complete checkpoint: a first save was interrupted
    raise ValueError(
        f"no complete checkpoint in {root}: {'; '.join(problems) or 'none has a meta.json'}. Move the broken "
        f"checkpoint directories out of {root} (and remove {pointer}) to start over, or restore a copy"
    )


EXPORT_INDEX = "model.index.json"  # the sharded export's index (model/sharded_export.py), written last
LEGACY_EXPORT = "model.pt"  # the single-file export of earlier versions (and of tools/import_hf.py)


def export_problem(export: str) -> Optional[str]:
    """None if directory ``export`` holds a complete export, else what is wrong, naming the file.

    Complete: ``model.index.json`` exists and every shard its ``files`` lists has the recorded
    size; or (an older export) ``model.pt`` exists."""
    index = os.path.join(export, EXPORT_INDEX)
    if not os.path.exists(index):
        if os.path.exists(os.path.join(export, LEGACY_EXPORT)):
            return None
        return f"{index} is missing (no export, or its save did not finish)"
    try:
        with open(index) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{index} is unreadable ({type(e).__name__}: {e})"
    return files_problem(export, files, f"the index {index}", missing=f": the export {export} is incomplete")


def has_export(path: str) -> bool:
    """Whether export directory ``path`` holds an export's weights (an index or an older ``model.pt``)."""
    return os.path.exists(os.path.join(path, EXPORT_INDEX)) or os.path.exists(os.path.join(path, LEGACY_EXPORT))


def newest_export(run_dir: str) -> Optional[str]:
    """The export directory of the newest complete checkpoint of ``run_dir`` that holds one (with
    ``train.export_interval`` != 1 the latest checkpoint may hold none); None if none does."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    root = checkpoints_dir(run_dir)
    latest_tag = os.path.basename(latest)
    for tag in sorted((t for t in os.listdir(root) if is_checkpoint_tag(t) and t <= latest_tag), reverse=True):
        path = os.path.join(root, tag)
        if has_export(os.path.join(path, "export")) and checkpoint_problem(path) is None:
            return os.path.join(path, "export")
    return None


def resolve_export_dir(path: str) -> str:
    """The export directory for a run dir, checkpoint dir, export dir or a file in it (index or model.pt).

    A run directory resolves to the newest complete checkpoint that holds an export. FileNotFoundError
    naming the path when it is none of these (or a run without a complete checkpoint with an export).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if has_export(path):
        return path
    if has_export(os.path.join(path, "export")):
        return os.path.join(path, "export")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        if latest_checkpoint(path) is None:
            raise FileNotFoundError(f"{path} is a run directory without a complete checkpoint (no checkpoints/latest)")
        export = newest_export(path)
        if export is None:
            raise FileNotFoundError(
                f"{path}: none of its complete checkpoints holds an export (train.export_interval other than 1 "
                "writes it only at some saves and at the end of the run); train to the end, or save with "
                "train.export_interval=1"
            )
        return export
    if os.path.exists(os.path.join(path, "meta.json")):
        raise FileNotFoundError(
            f"checkpoint {path} holds no export (train.export_interval other than 1 writes it only at some saves); "
            "load an earlier checkpoint that has export/, or the run directory (its newest export)"
        )
    raise FileNotFoundError(
        f"{path} is neither a run directory, a checkpoint directory nor an export "
        f"(no {EXPORT_INDEX} or {LEGACY_EXPORT} found)"
    )


def export_files(path: str, context: str = "checkpoint") -> tuple[str, str, str, str]:
    """(export directory, config.yaml, weights, tokenizer.model) of the export that ``path`` names (see
    :func:`resolve_export_dir`); the weights are the index ``model.index.json`` (or an older
    ``model.pt``). FileNotFoundError naming ``context`` and the first file missing (a shard included)."""
    export = resolve_export_dir(path)
    weights = os.path.join(export, EXPORT_INDEX)
    if not os.path.exists(weights) and os.path.exists(os.path.join(export, LEGACY_EXPORT)):
        weights = os.path.join(export, LEGACY_EXPORT)
    files = (os.path.join(export, "config.yaml"), weights, os.path.join(export, "tokenizer.model"))
    for needed in files:
        if not os.path.exists(needed):
            raise FileNotFoundError(f"{context}: {needed} is missing (not a complete export)")
    problem = export_problem(export)
    if problem is not None:
        raise FileNotFoundError(f"{context}: {problem}")
    return (export, *files)
