"""Times each objective's batch corruption (``prepare``), on CPU by default.

Prints the median milliseconds per batch of ``prepare`` for every objective, and of
CARD's soft_tail_mask + context_aware_weights alone. No assertions on time.

    PYTHONPATH=. python tools/benchmark_objectives.py [--batch 64] [--seq-len 1024] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from card_megatron import noise
from card_megatron.config import ObjectiveConfig
from card_megatron.objectives import build_objective, context_aware_weights, soft_tail_mask

VOCAB = 32000
MASK_ID = VOCAB - 1


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(batch: int, seq_len: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MASK_ID, (batch, seq_len + 1), generator=g).to(device)
    ids = torch.arange(batch, dtype=torch.int64, device=device)
    return tokens, noise.noise_seeds(1234, 0, ids), ids


def time_prepare(objective_name: str, batch: int, seq_len: int, repeats: int, device: str = "cpu") -> float:
    """Median seconds of one ``prepare`` of a [batch, seq_len + 1] batch (default config).

    ``objective_name``: card | arm | mdlm | bd3lm, or ``card_mask_weights`` for
    soft_tail_mask + context_aware_weights alone (keys from the noise seeds included).
    """
    tokens, seeds, ids = _batch(batch, seq_len, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if objective_name == "card_mask_weights":
        cfg = ObjectiveConfig()
        t = noise.weyl_uniform(ids)  # CARD's low-discrepancy t
        counters = noise.POSITION_STREAM + torch.arange(seq_len, dtype=torch.int64, device=device)

        def run():
            keys = noise.uniform(seeds, counters)
            mask = soft_tail_mask(t, seq_len, cfg.tail_factor, keys=keys)
            context_aware_weights(mask, cfg.reweight_decay, cfg.reweight_beta)
            sync()

    else:
        cfg = ObjectiveConfig(name=objective_name, block_size=min(4, seq_len))
        objective = build_objective(cfg, seq_len, MASK_ID, VOCAB)

        def run():
            objective.prepare(tokens, seeds, ids)
            sync()

    return _median_seconds(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--config",
        default="configs/tiny-cpu.yaml",
        help="the model whose training step the corruption is compared with (the demo model)",
    )
    parser.add_argument("--no-step", action="store_true", help="skip timing the training step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"objectives prepare, batch {args.batch} x {args.seq_len}, {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    prepare_ms = {}
    for name in ("arm", "card", "card_mask_weights", "mdlm", "bd3lm"):
        prepare_ms[name] = 1e3 * time_prepare(name, args.batch, args.seq_len, args.repeats, args.device)
        print(f"  {name:<18} {prepare_ms[name]:8.2f} ms/batch")
    if args.no_step:
        return
    # One CARD training step of the demo model on a batch of the same shape (benchmark_train.py).
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        os.path.join(repo, "tools", "benchmark_train.py"),
        "--objectives",
        "card",
        "--config",
        args.config,
        "--micro-batch-size",
        str(args.batch),
        "--seq-length",
        str(args.seq_len),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--device",
        args.device,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo})
    if out.returncode != 0:
        sys.exit(f"training-step benchmark failed:\n{out.stderr[-3000:]}")
    step_ms = 1e3 * json.loads(out.stdout.strip().splitlines()[-1])["step_time_s"]["card"]
    print(
        f"  one CARD training step of the demo model ({args.config}) on {args.batch} x {args.seq_len}: "
        f"{step_ms:,.1f} ms"
    )
    print(
        f"  share of the step spent in corruption + weights: {prepare_ms['card'] / step_ms:.5f} "
        f"(mask + weights alone: {prepare_ms['card_mask_weights'] / step_ms:.5f}; target < 0.05)"
    )


if __name__ == "__main__":
    main()
