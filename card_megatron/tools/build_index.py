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

import argparse
import sys
import time

from card_megatron import cli
from card_megatron.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value (e.g. data.split=98,1,1)")
    p.add_argument("--config", help="YAML config file (as for training)")
    p.add_argument("--data-path", help="shard prefix, or 'w1 prefix1 w2 prefix2 ...' (data.data_path)")
    p.add_argument("--split", help="train,valid,test document weights (data.split), e.g. 969,30,1")
    p.add_argument("--cache-dir", help="index cache directory (data.cache_dir; default {first prefix}_index_cache)")
    p.add_argument("--seq-length", type=int, help="sequence length L; samples hold L+1 tokens (model.seq_length)")
    p.add_argument("--seed", type=int, help="global seed of the shuffles and noise seeds (train.seed)")
    p.add_argument("--train-samples", type=int, help="train samples (default train_iters x global_batch_size)")
    p.add_argument("--valid-samples", type=int, default=0, help="valid samples (default 0: not built)")
    p.add_argument("--test-samples", type=int, default=0, help="test samples (default 0: not built)")
    p.add_argument("--lock-timeout", type=float, default=3600.0, help="seconds to wait for another builder")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.start_logging(args.log_level.upper(), "%(asctime)s %(name)s: %(message)s")
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


if __name__ == "__main__":
    sys.exit(main())
