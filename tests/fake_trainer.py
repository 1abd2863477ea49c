"""A stand-in for ``card_megatron.train`` that follows its run-directory contract.

Used by tests/test_slurm.py (``TRAIN_SCRIPT=tests/fake_trainer.py``) to test the
signal -> save -> requeue -> resume path of ``slurm/pretrain.sh`` without the real
trainer. Started by torchrun: it joins a gloo process group (so the template's
rendezvous settings are exercised), "trains" one step every ``FAKE_STEP_SECONDS``,
and honours the stop protocol: SIGUSR1/SIGTERM or ``{run_dir}/SAVE_AND_EXIT``
(agreed by all ranks through an all-reduce) -> checkpoint, ``preempted``, exit 0;
completion -> ``finished``. It resumes from ``checkpoints/latest``.

Arguments: ``--config FILE [section.key=value ...]``; it reads ``train.run_dir``
and ``train.train_iters`` from the overrides only. ``FAKE_EXIT_CODE=n`` makes it fail
at once with that status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch
import torch.distributed as dist


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    assert os.path.isfile(args.config), args.config
    kv = dict(o.split("=", 1) for o in args.overrides)
    run_dir = kv["train.run_dir"]
    train_iters = int(kv.get("train.train_iters", "20"))
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.2"))
    if os.environ.get("FAKE_EXIT_CODE"):  # a trainer that crashes at start-up
        raise SystemExit(int(os.environ["FAKE_EXIT_CODE"]))

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    signalled = {"stop": False}

    def on_signal(signum, frame):
        signalled["stop"] = True

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    step = 0
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        with open(os.path.join(ckpt_dir, name, "state.json")) as f:
            step = json.load(f)["step"]
        print(f"fake_trainer rank {rank}: resuming from {name} (step {step})", flush=True)
    else:
        print(f"fake_trainer rank {rank}: starting from scratch", flush=True)

    def save(at: int) -> None:
        if rank == 0:
            name = f"step_{at:08d}"
            os.makedirs(os.path.join(ckpt_dir, name), exist_ok=True)
            _atomic_write(os.path.join(ckpt_dir, name, "state.json"), json.dumps({"step": at}))
            _atomic_write(latest, name + "\n")
        dist.barrier()

    while step < train_iters:
        time.sleep(step_seconds)
        step += 1
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                record = {
                    "step": step,
                    "loss": 10.0 / step,
                    "lr": 1e-3,
                    "tokens_per_sec": 1.0,
                    "world_size": world,
                    "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                }
                f.write(json.dumps(record) + "\n")
        want_stop = signalled["stop"] or os.path.exists(os.path.join(run_dir, "SAVE_AND_EXIT"))
        flag = torch.tensor([1 if want_stop else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and step < train_iters:
            save(step)
            if rank == 0:
                _atomic_write(os.path.join(run_dir, "preempted"), f"{step}\n")
                try:
                    os.remove(os.path.join(run_dir, "SAVE_AND_EXIT"))
                except FileNotFoundError:
                    pass
                print(f"fake_trainer: saved at step {step} on request; exiting", flush=True)
            dist.destroy_process_group()
            return
    save(step)
    if rank == 0:
        _atomic_write(os.path.join(run_dir, "finished"), f"{step}\n")
        print(f"fake_trainer: finished at step {step}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
