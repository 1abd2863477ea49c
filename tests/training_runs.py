"""Launching small training runs from tests and reading what they logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.distributed import REPO, clean_env, torchrun_command

# Parity tolerances: one place, with their reasons (issue 24's audit, docs/design.md "Parity tests").
# Layouts sum in different orders (TP's all-reduce of partial products, ZeRO's reduce-scatter, PP's
# micro-batch accumulation), and which order a CPU kernel uses also depends on the CPU. Measured on the
# development machine (AMD EPYC, AVX-512), 6 steps of the TINY model in fp32 against one process: step
# losses within 6.2e-7 (relative; PP=2 the largest), every tensor within 2.8e-5 of its norm, single
# elements up to 1.9e-4 (embedding rows). OMP_NUM_THREADS 1 and 2 gave bit-identical runs; the same single
# process with AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2, how another CPU sums)
# moved the weights by 1.3e-5 of their norm: a change of CPU moves them as much as a change of layout.
# A single element is the wrong unit: Adam divides by sqrt(v), so a near-zero gradient whose rounding
# differs moves its weight by up to about lr per step (another machine measured 3.3e-4 on one element of a
# rarely seen embedding row and failed an elementwise atol of 1e-4). A real fault is far larger: one step
# skipped (steps 5 and 6 of the same run) moves the weight matrices by 1e-2 to 2.7e-2 of their norm (the
# norm weights by 3e-4) and the loss by 3.9e-3 or more; a wrong shard order or gather moves a tensor by
# about its whole norm.
LOSS_REL_TOL = 2e-5
"""Step losses and validation NLLs across layouts: 30x the largest measured gap, 200x below a skipped step."""
WEIGHT_REL_TOL = 1e-3
"""Per tensor, ||got - expected|| / ||expected||: 35x the largest measured gap, 10x below what a skipped step
does to the weight matrices."""


def read_export(path: str) -> dict:
    """The export at ``path`` (an export directory, checkpoint or run directory; sharded or an older
    model.pt) as one dict: state_dict, step and, with an EMA, ema_state_dict."""
    from card_megatron.model.sharded_export import open_export
    from card_megatron.rundir import resolve_export_dir

    with open_export(resolve_export_dir(path)) as export:
        blob = {"state_dict": export.state_dict(), "step": export.step}
        if export.has_ema:
            blob["ema_state_dict"] = export.state_dict(ema=True)
    return blob


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str = "") -> None:
    """The same names and shapes, and each tensor within WEIGHT_REL_TOL of ``expected`` in norm."""
    assert got.keys() == expected.keys(), what
    for name, want in expected.items():
        assert got[name].shape == want.shape, (what, name, got[name].shape, want.shape)
        gap = float((got[name].double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))
        assert gap <= WEIGHT_REL_TOL, f"{what} {name}: ||got - expected|| / ||expected|| = {gap:.2e}"


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
