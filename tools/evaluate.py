#!/usr/bin/env python
"""Perplexity of a checkpoint on held-out token shards, one row per dataset.

  python tools/evaluate.py --checkpoint runs/demo --data data/wiki_text_document data/code_text_document \\
      --names wiki code --output-json ppl.json --output-markdown ppl.md

Exact for causal checkpoints (ARM, CARD), an upper bound (ELBO) for MDLM and BD3LM, labelled
as such (card_megatron/eval/perplexity.py). The outputs and shards are checked before the
checkpoint is loaded; the markdown table is printed on stdout before the files are written.
Exit status 1 with a message on stderr for a user error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a run directory (latest checkpoint), a checkpoint directory or an export",
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PREFIX",
        help="token shards (PREFIX.bin/.idx, e.g. data/web_text_document) made with the checkpoint's tokenizer",
    )
    p.add_argument("--names", nargs="+", metavar="NAME", help="row names, one per --data prefix (default: file names)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward pass (default 8)")
    p.add_argument(
        "--max-windows",
        type=int,
        metavar="N",
        help="score at most the first N windows of seq_length + 1 tokens per dataset (default: all)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument(
        "--allow-missing-sidecar",
        action="store_true",
        help="evaluate a shard that has no tokenizer sidecar ({prefix}.tokenizer.json); nothing then checks that "
        "the checkpoint's tokenizer made it (default: refused)",
    )
    p.add_argument(
        "--output-json",
        metavar="FILE",
        help="write the results as JSON (atomically; checked to be writable before anything is loaded)",
    )
    p.add_argument(
        "--output-markdown",
        metavar="FILE",
        help="write the markdown table (atomically; checked to be writable before anything is loaded)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from card_megatron.eval.perplexity import check_outputs, evaluate_checkpoint, markdown_table, write_results
    from card_megatron.fileio import write_error_message

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size ({args.batch_size}) must be >= 1")
        if args.max_windows is not None and args.max_windows < 1:
            raise ValueError(f"--max-windows ({args.max_windows}) must be >= 1")
        check_outputs(args.output_json, args.output_markdown)  # before loading and evaluating, not after
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            args.names,
            args.batch_size,
            args.max_windows,
            args.device,
            args.ema,
            args.allow_missing_sidecar,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown_table(result), end="")  # first: a failed write below loses no result
    sys.stdout.flush()
    if not args.output_json:
        print(json.dumps(result), file=sys.stderr)
    try:
        write_results(result, args.output_json, args.output_markdown)
    except OSError as e:
        print(
            f"error: {write_error_message(e, args.output_json or args.output_markdown)} (the table is above)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
