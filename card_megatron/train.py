"""Pretraining entry point.

    torchrun --nproc-per-node N -m card_megatron.train --config configs/tiny-cpu.yaml [section.key=value ...]

Also runs as a single process without a launcher. CPU runs use gloo automatically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from card_megatron import cli
from card_megatron.config import ConfigError, config_help, load_config
from card_megatron.fileio import atomic_write


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m card_megatron.train",
        description="Train CARD (or the ARM, MDLM, BD3LM baselines) with Megatron-core layers and DeepSpeed.",
        epilog="Overrides use dotted names, e.g. train.train_iters=100 objective.name=arm "
        "parallel.tensor_model_parallel_size=2. --help-config lists every key (also docs/config.md).",
    )
    p.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with its type, default and description, and exit",
    )
    p.add_argument("--config", help="YAML file overriding the defaults in card_megatron/config/schema.py")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied after the YAML file")
    p.add_argument("--summary-json", help="write a JSON summary (start/end step, evaluations) here (rank 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(config_help())
        return 0
    rank = int(os.environ.get("RANK", "0"))
    # logging, and the start-up note before anything imports Megatron-core (the one entry helper)
    cli.start_logging(
        logging.INFO if rank == 0 else logging.WARNING, f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from card_megatron.lock import LockHeldError
    from card_megatron.parallel.connect import ConnectError
    from card_megatron.training.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, ValueError, LockHeldError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConnectError as e:  # the ranks cannot reach each other: the message names the node and address
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        summary = trainer.train()
    except OSError as e:  # a failed save (disk full): the message says what is intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.summary_json and rank == 0:
        atomic_write(args.summary_json, json.dumps(summary, indent=2))
    from card_megatron.parallel.state import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
