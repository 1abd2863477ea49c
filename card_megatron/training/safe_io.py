"""Reading checkpoint files without running code, and DeepSpeed's checkpoint I/O made safe.

Loading runs no code from the files: every file is read with ``torch.load(weights_only=True)``
(DeepSpeed's own loader, ``TorchCheckpointEngine.load``, uses ``weights_only=False``; it is
replaced by :func:`install_safe_io`), the RNG states are stored as tensors and numbers,
and only DeepSpeed's plain state classes are allowlisted. ``train.trust_checkpoint=true``
loads with ``weights_only=False`` (checkpoints from elsewhere that hold other objects). Whatever
loads is checked before DeepSpeed uses it (:func:`check_structure`: depth, sharing, types, dense
tensors; :func:`check_layout`: every tensor's shape and dtype against :func:`expected_layout` of
the live engine) and refused naming the file and the key.

A failed write during DeepSpeed's save is recorded (:class:`SaveFailure`), not raised, so that the
save runs its collectives to the end and ``checkpoint.save_checkpoint`` raises one error naming the file.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Optional

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from card_megatron.training.checkpoint_checks import check_layout, check_structure, expected_layout

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


class SaveFailure:
    """Records the first file whose write failed during a DeepSpeed save, so that the save runs its
    collectives to the end on every rank and the failure is raised once, everywhere, naming the file."""

    def __init__(self) -> None:
        self.file: Optional[str] = None
        self.error: Optional[BaseException] = None


def install_safe_io(engine, trust: bool) -> SaveFailure:
    """Makes ``engine`` (a DeepSpeed engine) read checkpoint files with :func:`safe_load` (checked
    against :func:`expected_layout`) and record, instead of raising, a failed write (``checkpoint.save_checkpoint``
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
    failure = SaveFailure()
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
    """Loads a DeepSpeed checkpoint directory saved by ``checkpoint.save_checkpoint``; returns the client state.

    The engine must read files through :func:`install_safe_io`."""
    root, tag = os.path.split(path.rstrip("/"))
    load_path, client_state = engine.load_checkpoint(
        root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    return client_state
