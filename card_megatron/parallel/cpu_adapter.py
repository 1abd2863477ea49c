"""Makes Megatron-core and DeepSpeed run on CPU (gloo). Does nothing when CUDA is present.

Megatron-core assumes CUDA in a few places our code path reaches (measured with
megatron-core 0.16.1, see shared/PLATFORM.md):

* ``torch.cuda.current_device()`` is used as a device argument; on CPU it is made to
  return ``"cpu"``.
* The tensor-parallel RNG tracker forks the CUDA RNG state; on CPU it is replaced by
  Megatron's non-forking (inference) tracker. Dropout is then drawn from the CPU RNG.
* Megatron's activation checkpointing saves the CUDA RNG state; on CPU torch's own
  checkpoint is used instead (:func:`activation_checkpoint`).
* DeepSpeed picks its accelerator from ``DS_ACCELERATOR``; it is set to ``cpu`` before
  DeepSpeed is imported.
* On its first start DeepSpeed builds its CPU communication op (``deepspeed_shm_comm``) with
  torch's JIT extension loader, which waits for as long as a ``lock`` file exists in the build
  directory. The builder keeps that file open for the whole build (torch's ``FileBaton``); a
  build killed midway leaves it with no process holding it, and every later start would wait
  in silence: :func:`clear_stale_build_locks` removes every lock that no process on this
  machine holds open (whatever its age), and names the op being built and the process building
  it for the others.

The GPU path is untouched: NCCL, CUDA RNG tracker, bf16.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Optional

import torch

log = logging.getLogger(__name__)
_applied = False
STALE_BUILD_LOCK_S = 600.0  # without /proc (not Linux), a lock this old is taken as stale


def lock_holders(path: str) -> Optional[list[int]]:
    """The ids of the processes on this machine that hold ``path`` open (from ``/proc/*/fd``), or None
    when ``/proc`` cannot tell (not Linux). Processes whose descriptors this user cannot read are not
    counted: they belong to another user, who cannot build into this user's extension directory."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    try:
        target = os.stat(path)
    except OSError:
        return []
    holders = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # exited, or another user's
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                holders.append(int(pid))
                break
    return holders


def _describe_process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"pid {pid}" + (f" ({cmd[:120]})" if cmd else "")


def clear_stale_build_locks(now: float | None = None) -> list[str]:
    """Removes torch-extension build locks (``{TORCH_EXTENSIONS_DIR}/*/*/lock``) that no process holds
    open (:func:`lock_holders`; without ``/proc``, those older than STALE_BUILD_LOCK_S), warning about
    each and naming the op whose build was interrupted; warns naming the op and the building process
    for a lock that is held (the start waits for that build). Returns the removed paths."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    now = time.time() if now is None else now
    removed = []
    for lock in sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))):
        op = os.path.basename(os.path.dirname(lock))
        try:
            age = now - os.path.getmtime(lock)
        except OSError:
            continue  # released meanwhile
        holders = lock_holders(lock)
        stale = not holders if holders is not None else age > STALE_BUILD_LOCK_S
        if stale:
            try:
                os.remove(lock)
            except FileNotFoundError:
                continue  # another rank removed it
            removed.append(lock)
            log.warning(
                "removed %s, a torch-extension build lock (%.0f s old) that no process holds: a build of %s was "
                "interrupted (it is rebuilt now)",
                lock,
                age,
                op,
            )
        elif holders:
            log.warning(
                "%s is held by %s, building %s: startup waits until that build ends",
                lock,
                ", ".join(_describe_process(p) for p in holders),
                op,
            )
        else:
            log.warning(
                "%s exists (%.0f s old): startup waits until the build of %s that holds it ends. If no "
                "process on this machine is building it (a run killed during its first start), delete "
                "the file",
                lock,
                age,
                op,
            )
    return removed


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_adapter() -> bool:
    """Applies the CPU adaptations once if CUDA is absent; returns True if it did anything."""
    global _applied
    if cuda_available():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if _applied:
        return True
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    _applied = True
    log.debug("CPU adapter applied (no CUDA): gloo backend, non-forking RNG tracker")
    return True


def reset_rng_tracker() -> None:
    """Installs an RNG tracker that works on this device (called after parallel state is set up)."""
    from megatron.core import tensor_parallel

    if cuda_available():
        return
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def activation_checkpoint(function, *args):
    """Recomputes ``function(*args)`` in backward: Megatron's checkpoint on GPU (it restores the
    CUDA RNG tracker states), torch's non-reentrant checkpoint on CPU (Megatron's needs CUDA)."""
    if cuda_available():
        from megatron.core import tensor_parallel

        return tensor_parallel.checkpoint(function, False, *args)
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
