"""Launching small training runs from tests and reading what they logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.distributed import REPO, clean_env, torchrun_command

TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "model.seq_length=32",
    "model.make_vocab_size_divisible_by=64",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.eval_iters=2",
    "train.log_interval=1",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.lr_warmup_iters=2",
    "data.split=90,10,0",
]


def overrides(corpus, run_dir, iters, *extra) -> list[str]:
    prefix, tokenizer = corpus
    return [
        *TINY,
        f"data.data_path={prefix}",
        f"data.tokenizer_model={tokenizer}",
        f"train.run_dir={run_dir}",
        f"train.train_iters={iters}",
        *extra,
    ]


def command(nproc: int, args: list[str]) -> list[str]:
    """torchrun for nproc > 1; a plain process (no launcher) for nproc == 1."""
    train = ["-m", "card_megatron.train", "--config", os.path.join(REPO, "configs", "tiny-cpu.yaml"), *args]
    if nproc == 1:
        return [sys.executable, *train]
    return torchrun_command(nproc, train)


def env() -> dict:
    return clean_env()


def train(nproc: int, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(nproc, args), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: str) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (re-run after a resume) keeps its last value."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


def records(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f]


def kill_tree(pid: int) -> None:
    """SIGKILLs ``pid`` and every process below it. torchrun starts each worker in a session of its
    own, so killing torchrun's process group leaves the workers running (and finishing the run)."""
    import signal

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
