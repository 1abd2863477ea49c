"""Perplexity of a checkpoint on held-out token shards, one row per dataset.

  python tools/evaluate.py --checkpoint runs/demo --data data/wiki_text_document data/code_text_document \\
      --names wiki code --output-json ppl.json --output-markdown ppl.md

Exact for causal checkpoints (ARM, CARD), an upper bound (ELBO) for MDLM and BD3LM, labelled
as such (card_megatron/eval/perplexity.py). The outputs and shards are checked before the
checkpoint is loaded; the markdown table is printed on stdout before the files are written.
Exit status 1 with a message on stderr for a user error.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

from card_megatron import cli
from card_megatron.cli import at_least, option

DESCRIPTION, EPILOG = cli.doc_parts(__doc__)


@dataclass
class EvaluateOptions:
    """``python -m card_megatron.tools.evaluate``'s options (``card-evaluate``, ``tools/evaluate.py``)."""

    checkpoint: str = option(metavar="PATH")
    """A run directory (latest checkpoint), a checkpoint directory or an export."""
    data: list[str] = option(metavar="PREFIX", nargs="+")
    """Token shards (PREFIX.bin/.idx, e.g. data/web_text_document) made with the checkpoint's tokenizer."""
    names: Optional[list[str]] = option(None, metavar="NAME", nargs="+")
    """Row names, one per --data prefix (default: file names)."""
    batch_size: int = option(8, metavar="B", range=at_least(1))
    """Windows per forward pass."""
    max_windows: Optional[int] = option(None, metavar="N", range=at_least(1))
    """Score at most the first N windows of seq_length + 1 tokens per dataset (default: all)."""
    device: Optional[str] = None
    """cpu, cuda or cuda:N (default: cuda when available, else cpu)."""
    ema: bool = False
    """Evaluate the EMA weights."""
    allow_missing_sidecar: bool = False
    """Evaluate a shard that has no tokenizer sidecar ({prefix}.tokenizer.json); nothing then checks that the
    checkpoint's tokenizer made it (default: refused)."""
    output_json: Optional[str] = option(None, metavar="FILE")
    """Write the results as JSON (atomically; checked to be writable before anything is loaded)."""
    output_markdown: Optional[str] = option(None, metavar="FILE")
    """Write the markdown table (atomically; checked to be writable before anything is loaded)."""


def build_parser():
    """The command line, generated from :class:`EvaluateOptions`."""
    return cli.build_parser(EvaluateOptions, description=DESCRIPTION, epilog=EPILOG)


def run(args: EvaluateOptions) -> int:
    """Checks the outputs, evaluates, prints the table, writes the files."""
    from card_megatron.eval.perplexity import check_outputs, evaluate_checkpoint, markdown_table, write_results
    from card_megatron.fileio import write_error_message

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


def main(argv: list[str] | None = None) -> int:
    return cli.run_tool(EvaluateOptions, run, argv, description=DESCRIPTION, epilog=EPILOG)


if __name__ == "__main__":
    sys.exit(main())
