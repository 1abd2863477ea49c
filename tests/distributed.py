"""Runs a worker under torchrun with N processes on gloo, with a timeout (for multi-process tests)."""

from __future__ import annotations

import os
import subprocess
import sys

from card_megatron.parallel.ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def clean_env(**extra: str) -> dict:
    """The environment for a child run: no launcher variables inherited from this (test) process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    path = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """``torchrun --nproc-per-node nproc args...`` on this machine (a free rendezvous port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        *args,
    ]


def run_torchrun(
    args: list[str], nproc: int, timeout: int = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    """:func:`torchrun_command`, run; raises AssertionError with the output on failure."""
    cmd = torchrun_command(nproc, args)
    full_env = clean_env(**(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
