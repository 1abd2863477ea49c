"""Pre-launch check for job scripts: does this config fit this many processes?

``python -m card_megatron.launch_check --config FILE --world-size N [section.key=value ...]``
loads the config exactly as the trainer will (:func:`card_megatron.config.load_config`),
validates it against the world size (:func:`card_megatron.config.validate`), prints a
one-line summary of the parallel layout and exits 0; on a problem it prints the
message to stderr and exits 1. ``slurm/pretrain.sh`` runs it before anything is
launched, so a wrong tensor/pipeline size fails on the login node rather than after
a queue wait.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from card_megatron.config import Config, ConfigError, data_parallel_size, load_config, validate


def check_launch(config_path: str, overrides: list[str], world_size: int) -> Config:
    """Loads the config with overrides and validates it for ``world_size`` processes.

    Returns the resolved Config; raises ConfigError listing every problem.
    """
    if world_size < 1:
        raise ConfigError(f"world size ({world_size}) must be >= 1 (nodes x processes per node)")
    cfg = load_config(config_path, overrides)
    validate(cfg, world_size)
    return cfg


def summary(cfg: Config, world_size: int) -> str:
    """One line describing the layout, e.g. ``world size 8 = tensor 2 x pipeline 2 x data 2``."""
    par = cfg.parallel
    return (
        f"world size {world_size} = tensor {par.tensor_model_parallel_size} x pipeline "
        f"{par.pipeline_model_parallel_size} x data {data_parallel_size(cfg, world_size)}; "
        f"global batch {cfg.train.global_batch_size}, micro batch {cfg.train.micro_batch_size}; "
        f"run dir {cfg.train.run_dir}"
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m card_megatron.launch_check",
        description="Check that a config's parallel sizes fit a world size, without launching.",
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--world-size", type=int, required=True, help="total number of processes")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = check_launch(args.config, args.overrides, args.world_size)
    except ConfigError as e:
        print(f"launch check failed for {args.config} with world size {args.world_size}:\n{e}", file=sys.stderr)
        return 1
    print(f"launch check OK: {summary(cfg, args.world_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
