"""Build the sample-index cache ahead of a run (so that no training rank waits on it).

Uses the same code and cache as training (``card_megatron.data.build_datasets``). Values
come from the flags, else from ``--config`` and ``section.key=value`` overrides, else from
the defaults. The cache key includes each split's sample count: pass the counts the run
will request (by default train = train.train_iters x train.global_batch_size; valid and
test are built only when their counts are given).

Example:
  python tools/build_index.py --data-path "0.7 data/web_text_document 0.3 data/code_text_document" \\
      --seq-length 2048 --seed 1234 --train-samples 10000000 --valid-samples 20000
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

from card_megatron import cli
from card_megatron.cli import at_least, option
from card_megatron.config import load_config


@dataclass
class BuildIndexOptions:
    """``python -m card_megatron.tools.build_index``'s options (``card-build-index``, ``tools/build_index.py``);
    unset values come from --config and the overrides, as for training."""

    overrides: list[str] = option(default_factory=list, positional=True)
    """Config overrides section.key=value (e.g. data.split=98,1,1)."""
    config: Optional[str] = None
    """YAML config file (as for training)."""
    data_path: Optional[str] = None
    """Shard prefix, or 'w1 prefix1 w2 prefix2 ...' (data.data_path)."""
    split: Optional[str] = None
    """train,valid,test document weights (data.split), e.g. 969,30,1."""
    cache_dir: Optional[str] = None
    """Index cache directory (data.cache_dir; default {first prefix}_index_cache)."""
    seq_length: Optional[int] = option(None, range=at_least(1))
    """Sequence length L; samples hold L+1 tokens (default: model.seq_length)."""
    seed: Optional[int] = None
    """Global seed of the shuffles and noise seeds (default: train.seed)."""
    train_samples: Optional[int] = option(None, range=at_least(0))
    """Train samples (default: train_iters x global_batch_size)."""
    valid_samples: int = option(0, range=at_least(0))
    """Valid samples (0: not built)."""
    test_samples: int = option(0, range=at_least(0))
    """Test samples (0: not built)."""
    lock_timeout: float = option(3600.0, range=at_least(0))
    """Seconds to wait for another builder."""
    log_level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    """Logging level."""


def build_parser():
    """The command line, generated from :class:`BuildIndexOptions`."""
    return cli.build_parser(BuildIndexOptions, description=__doc__)


def run(args: BuildIndexOptions) -> int:
    """Builds the index of every requested split and prints where it is."""
    cfg = load_config(args.config, args.overrides)
    data = cfg.data
    for flag, field in (("data_path", "data_path"), ("split", "split"), ("cache_dir", "cache_dir")):
        if getattr(args, flag) is not None:
            setattr(data, field, getattr(args, flag))
    seq_length = args.seq_length if args.seq_length is not None else cfg.model.seq_length
    seed = args.seed if args.seed is not None else cfg.train.seed
    train = args.train_samples
    if train is None:
        train = cfg.train.train_iters * cfg.train.global_batch_size
    num_samples = {"train": train, "valid": args.valid_samples, "test": args.test_samples}

    from card_megatron.data.dataset import build_datasets  # after logging is configured

    start = time.perf_counter()
    datasets = build_datasets(data, seq_length, seed, num_samples, lock_timeout_s=args.lock_timeout)
    for split, ds in datasets.items():
        where = ds.entry_dir or "(nothing requested)"
        print(f"{split:5s} {len(ds):>14,} samples of {seq_length}+1 tokens  {where}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_tool(
        BuildIndexOptions,
        run,
        argv,
        description=__doc__,
        log_level=logging.INFO,
        log_format="%(asctime)s %(name)s: %(message)s",
    )


if __name__ == "__main__":
    sys.exit(main())
